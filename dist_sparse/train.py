"""The training loop.

Launch (2 CPU processes or 2 GPUs; see launch/run.sh for every backend)::

    ACCELERATE_USE_CPU=true accelerate launch --config_file launch/ddp.yaml -m dist_sparse.train \\
        --config configs/tiny_resnet20_dense.yaml run.epochs=3
    python -m dist_sparse.train --config configs/tiny_resnet20_dense.yaml      # one process

The loop reads top to bottom: for every optimizer step, micro-batches run forward/backward under
``accelerator.accumulate``; once the gradient is complete the method sees it (``after_backward``),
the gradient is clipped, the optimizer and the schedule step, and the method updates its state
(``after_step``). At the end of an epoch the model is evaluated, the method may ask for a rebuild, and a
checkpoint is written. The trainer never asks which method runs or how parameters are sharded.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import signal
import sys
import time
import warnings
from typing import Any

import torch
import yaml

from . import checkpoint as ckpt
from . import distributed as dist
from .backend import (backend_name, build_accelerator, engine_settings, input_dtype, launched_world_size, reprepare,
                      resolve_mixed_precision)
from .config import Config, ConfigError, config_to_dict, load_config
from .data import CastLoader, build_data, calibration_batches
from .driver import Driver, run_surgery
from .ema import WeightEMA
from .errors import RunError
from .metrics.layer_stats import count_parameters
from .methods import Rebuild, create_method
from .methods.base import OptimizerInfo, RunContext
from .models.norms import convert_sync_batchnorm
from .tasks import build_model, make_task, model_kwargs

__all__ = ["Trainer", "run", "main", "PREEMPT_MARKER"]

log = logging.getLogger("dist_sparse")
PREEMPT_MARKER = "PREEMPTED"  # written into the run directory when a preemption signal stopped the run


# ------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ------------------------------------------------------------------------------------------------


def build_optimizer(cfg: Config, model: torch.nn.Module, overrides: dict[str, dict]) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW; norms and biases (ndim <= 1) and the names a model lists in
    ``no_weight_decay()`` get no weight decay (norms and biases: unless configured).

    A method's per-parameter override (``overrides[name]``) inherits every option it does not name
    from the group the parameter would have joined (so ``{"lr": 0.01}`` keeps the run's weight decay).
    """
    o = cfg.optim
    decay, no_decay, special = [], [], []
    # Models may name parameters that the recipe never decays (DeiT: class token, position embedding).
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    unknown = set(overrides) - {n for n, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"param_group_overrides names parameters the model does not have: {sorted(unknown)[:5]}")
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        plain_decay = not ((p.ndim <= 1 and not o.decay_norm_and_bias) or name in skip
                           or name.rsplit(".", 1)[-1] in skip)
        if name in overrides:
            special.append({"params": [p], "weight_decay": o.weight_decay if plain_decay else 0.0,
                            **overrides[name]})
        elif plain_decay:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [g for g in ({"params": decay, "weight_decay": o.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]] + special
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def lr_factor(cfg: Config, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (linear warm-up, then the schedule)."""
    s = cfg.schedule
    warm = s.warmup_steps or int(round(s.warmup_epochs * steps_per_epoch))
    if s.name == "inverse_sqrt":
        warm = max(warm, 1)
        return (step + 1) / warm if step + 1 < warm else math.sqrt(warm / (step + 1))
    if warm and step < warm:
        return (step + 1) / warm
    if s.name == "constant":
        return 1.0
    if s.name == "step":
        return s.gamma ** sum(step >= int(m * total_steps) for m in s.milestones)
    progress = min(1.0, (step - warm) / max(1, total_steps - warm))  # cosine
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(cfg: Config, optimizer, total_steps: int, steps_per_epoch: int, start_step: int = 0,
                    scale: Any = None):
    """The run's schedule as a LambdaLR; ``scale()`` (a method's ``lr_scale``) multiplies every value."""
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(cfg, s, total_steps, steps_per_epoch) * (scale() if scale else 1.0))
    with warnings.catch_warnings():  # fast-forwarded before any optimizer step: torch's warning is moot
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(start_step):  # continue from the global step (after a rebuild)
            sched.step()
    return sched


# ------------------------------------------------------------------------------------------------
# Logging helpers
# ------------------------------------------------------------------------------------------------


class MetricsLog:
    """JSONL metrics (rank 0), optionally mirrored to TensorBoard."""

    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ConfigError("logging.tensorboard", True, f"false, or install tensorboard ({err})") from None
            self.tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def write(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        rec = {"event": event, "time": round(time.time(), 3), **fields}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, sort_keys=True) + "\n")
        if self.tb is not None and "step" in fields:
            for k, v in fields.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{event}/{k}", v, fields["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _setup_logging(run_dir: str, rank: int, rank_logs: bool) -> None:
    log.setLevel(logging.INFO)
    log.handlers.clear()
    log.propagate = False
    if rank == 0:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter("[dist_sparse] %(message)s"))
        log.addHandler(h)
    if rank_logs:
        fh = logging.FileHandler(os.path.join(run_dir, f"rank{rank}.log"))
        fh.setFormatter(logging.Formatter("%(asctime)s rank" + str(rank) + " %(levelname)s %(message)s"))
        fh.setLevel(logging.DEBUG)
        log.addHandler(fh)
        log.setLevel(logging.DEBUG)




# ------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------


class Trainer:
    """One training run: build everything from the config, then :meth:`train`.

    Features (config flags): SGD/Adam/AdamW (``optim.name``), cosine/step/inverse-sqrt schedules with
    warm-up (``schedule.*``), label smoothing, gradient accumulation and clipping, mixed precision
    (``run.mixed_precision``), evaluation every ``run.eval_every_epochs``, checkpoints every
    ``checkpoint.every_steps`` and each epoch with exact resume (``checkpoint.resume``), a method from
    the registry (``method.name``), preemption by SIGUSR1 (checkpoint at the next step, then exit).
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        r = cfg.run
        if r.threads:
            torch.set_num_threads(r.threads)
        if r.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        torch.manual_seed(r.seed)

        self.precision = resolve_mixed_precision(r.mixed_precision)
        self.acc = build_accelerator(self.precision, cfg.optim.grad_accum_steps,
                                     per_rank_batch=max(1, cfg.data.batch_size // launched_world_size()),
                                     grad_clip=cfg.optim.grad_clip)
        self._preempt = False
        self._install_signal_handlers()  # early: a signal during start-up still stops at the first step
        self.world = self.acc.num_processes
        if r.num_processes and r.num_processes != self.world:
            raise ConfigError("run.num_processes", r.num_processes,
                              f"the number of processes this run was launched with ({self.world}); "
                              "check the launch command (accelerate launch --cpu starts only one process)")
        self.run_dir = cfg.run_dir
        if self.acc.is_main_process:
            os.makedirs(self.run_dir, exist_ok=True)
        self.acc.wait_for_everyone()
        _setup_logging(self.run_dir, self.acc.process_index, cfg.logging.rank_logs)
        self.backend = backend_name(self.acc)
        log.info("backend=%s processes=%d device=%s mixed_precision=%s run_dir=%s", self.backend, self.world,
                 self.acc.device, self.precision + (" (auto)" if r.mixed_precision == "auto" else ""), self.run_dir)
        if self.acc.is_main_process:
            with open(os.path.join(self.run_dir, "config.yaml"), "w", encoding="utf-8") as fh:
                yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False)

        self.data = build_data(cfg, rank=self.acc.process_index, world_size=self.world, device=self.acc.device,
                               run_dir=self.run_dir)
        cast = input_dtype(self.acc)
        if cast is not None:  # the DeepSpeed engine holds the model in bf16/fp16: inputs must match
            self.data.train, self.data.val = CastLoader(self.data.train, cast), CastLoader(self.data.val, cast)
        self.task = make_task(self.data.task, cfg, self.data.info, self.world)
        if cfg.model.distillation != "none":
            from .tasks import load_teacher

            self.task.teacher = load_teacher(cfg, self.data.info).to(self.acc.device)
        accum = cfg.optim.grad_accum_steps
        self.steps_per_epoch = len(self.data.train) // accum
        if self.steps_per_epoch < 1:
            raise ConfigError("optim.grad_accum_steps", accum,
                              f"at most the number of batches per epoch ({len(self.data.train)})")
        self.total_steps = self.steps_per_epoch * r.epochs
        if r.max_steps:
            self.total_steps = min(self.total_steps, r.max_steps)
        self.ckpt_dir = cfg.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")
        self.metrics = MetricsLog(self.run_dir, self.acc.is_main_process, cfg.logging.tensorboard)

        # Training position (all counted in optimizer steps / batches of the epoch).
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.acc.device)  # this epoch, reduced
        self.loss_count = 0
        self._t0 = time.time()
        self._window: list[torch.Tensor] = []  # this rank's micro-batch losses since the last sync
        self._window_steps: list[tuple[int, int, float]] = []  # (optimizer step, its last micro-batch, time.time())
        self.best_acc, self.last_eval = 0.0, {}
        self.rebuilds: list[dict] = []

        self.ema: WeightEMA | None = None  # the weight EMA (model.ema_decay > 0)
        self.method = create_method(cfg.method, seed=r.seed)
        self.method.setup(self._run_context())
        self.driver = Driver(self.method, self.acc, self.task.loss, grad_clip=cfg.optim.grad_clip)
        resume_from = self._resume_path()
        meta = None
        if resume_from:
            meta = ckpt.read_meta(resume_from)
            self._check_resharding(resume_from, meta)
            self.method.load_state_dict(ckpt.load_method_state(resume_from))
        self._build_model_and_optimizer(start_step=0)
        if resume_from:
            self._load(resume_from, meta)

    # -- construction -------------------------------------------------------------------------
    def _run_context(self) -> RunContext:
        o = self.cfg.optim
        first = next(iter(calibration_batches(self.data.train, 1)))
        example = tuple(x.detach().cpu().float() if x.is_floating_point() else x.detach().cpu()
                        for x in self.task.model_input(first))
        return RunContext(total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch, world_size=self.world,
                          rank=self.acc.process_index, seed=self.cfg.run.seed,
                          optimizer=OptimizerInfo(name=o.name, lr=o.lr, weight_decay=o.weight_decay,
                                                  momentum=o.momentum if o.name == "sgd" else 0.0),
                          example_input=example, calibration=lambda n: calibration_batches(self.data.train, n),
                          forward=self.task.forward, device=self.acc.device, run_dir=self.run_dir)

    def _registered_model(self) -> torch.nn.Module:
        """The registered architecture with the run's initial weights (identical on every rank)."""
        with torch.random.fork_rng(devices=[]):  # identical initial weights, global RNG untouched
            torch.manual_seed(self.cfg.run.seed)
            model = build_model(self.cfg, self.data.info)
        if self.cfg.model.sync_bn:
            if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
                raise ConfigError("model.sync_bn", True, f"false: {self.cfg.model.name} with these settings has no "
                                  "BatchNorm layer (model.norm=gn/none, or a ViT/Transformer)")
            model = convert_sync_batchnorm(model)
        if self.cfg.model.distillation != "none":
            model.train_both_heads = True  # the loss needs both heads (exports and eval use their mean)
        if self.cfg.run.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _plain_model(self) -> torch.nn.Module:
        """The current architecture as a plain module: the registered model + the method's surgery."""
        return self.method.prepare(self._registered_model())

    def _build_model_and_optimizer(self, start_step: int, state_dict: dict | None = None) -> None:
        model = self._plain_model()
        if state_dict is not None:
            model.load_state_dict(state_dict, strict=True)
        optimizer = build_optimizer(self.cfg, model, self.method.param_group_overrides(model))
        scheduler = build_scheduler(self.cfg, optimizer, self.total_steps, self.steps_per_epoch, start_step,
                                    scale=lambda: self.method.lr_scale)
        # Model and optimizer go through prepare together (FSDP2 needs both in one call). The scheduler
        # is stepped by the driver once per optimizer step, so it is only registered for checkpointing.
        self.model, self.optimizer = reprepare(self.acc, model, optimizer)
        self.scheduler = scheduler
        self.acc._custom_objects = [o for o in self.acc._custom_objects  # drop a pre-rebuild scheduler
                                    if not isinstance(o, torch.optim.lr_scheduler.LRScheduler)]
        self.acc.register_for_checkpointing(self.scheduler)
        self.driver.attach(self.model, self.optimizer, self.scheduler)
        m = self.cfg.model
        if m.ema_decay > 0:
            if self.ema is None:
                self.ema = WeightEMA(self.unwrapped, m.ema_decay, m.ema_warmup)
            else:  # a rebuild changed the architecture: the average starts again from its weights
                self.ema.reset(self.unwrapped)
                log.info("weight EMA restarted from the rebuilt model")
            self.driver.ema = self.ema
        total, nonzero = count_parameters(self.unwrapped)
        self.n_params, self.n_nonzero = total, nonzero
        log.info("model=%s method=%s params=%d nonzero=%d steps/epoch=%d total steps=%d", self.cfg.model.name,
                 self.cfg.method.name, total, nonzero, self.steps_per_epoch, self.total_steps)

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.model)

    # -- checkpoints --------------------------------------------------------------------------
    def _resume_path(self) -> str | None:
        res = self.cfg.checkpoint.resume
        if res == "never":
            return None
        if res == "auto":
            return ckpt.find_latest(self.ckpt_dir)
        if os.path.isfile(os.path.join(res, "meta.json")):
            return res
        latest = ckpt.find_latest(res)
        if latest is None:
            raise ConfigError("checkpoint.resume", res, "a checkpoint directory (with meta.json) or a directory of them")
        return latest

    def save(self) -> str:
        self._sync()  # the epoch's loss sums in the checkpoint must be complete
        meta = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "loss_sum": float(self.loss_sum.item()), "loss_count": self.loss_count, "best_acc": self.best_acc,
                "world_size": self.world, "backend": self.backend, "rebuilds": self.rebuilds,
                "model": self.cfg.model.name, "method": self.cfg.method.name}
        extra = None if self.ema is None else (lambda d: self.ema.save(d, self.unwrapped))
        path = ckpt.save_checkpoint(self.acc, self.ckpt_dir, self.step, meta, self.method.state_dict(),
                                    self.cfg.checkpoint.keep_last, extra=extra)
        log.debug("checkpoint written: %s", path)
        return path

    def _check_resharding(self, path: str, meta: dict) -> None:
        """A DDP/single checkpoint (full weights and optimizer state) resumes on any number of processes:
        the data order is a list of global batches. A sharded one (FSDP, ZeRO) only on the same layout."""
        saved_world, saved_backend = int(meta.get("world_size", self.world)), meta.get("backend", self.backend)
        sharded = ("fsdp2", "fsdp1", "zero1", "zero2", "zero3")
        if (saved_backend in sharded or self.backend in sharded) and \
                (saved_world != self.world or saved_backend != self.backend):
            raise ConfigError("checkpoint.resume", path,
                              f"a checkpoint of this layout: it was written by {saved_backend} x {saved_world} and "
                              f"this run is {self.backend} x {self.world}; sharded checkpoints cannot be re-sharded "
                              f"here: resume with the same launch, or export it and start from the weights")
        if saved_world != self.world:
            log.info("resuming a %d-process checkpoint on %d processes (same global batches)", saved_world,
                     self.world)

    def _load(self, path: str, meta: dict) -> None:
        self.acc.load_state(path)
        if self.ema is not None:
            try:
                self.ema.load(path, self.unwrapped)
            except FileNotFoundError as err:  # EMA switched on for a run that had none: start it here
                log.warning("%s; the weight EMA starts from the resumed weights", err)
                self.ema.reset(self.unwrapped)
        self.step, self.epoch, self.batch_in_epoch = meta["step"], meta["epoch"], meta["batch_in_epoch"]
        self.loss_sum.fill_(meta["loss_sum"])
        self.loss_count, self.best_acc, self.rebuilds = meta["loss_count"], meta["best_acc"], meta["rebuilds"]
        self.acc.step = self.step * self.cfg.optim.grad_accum_steps  # keeps accumulate() in phase
        self.driver.step = self.step
        log.info("resumed from %s (step %d, epoch %d, batch %d)", path, self.step, self.epoch, self.batch_in_epoch)
        if self.acc.is_main_process:
            marker = os.path.join(self.run_dir, PREEMPT_MARKER)
            if os.path.exists(marker):
                os.remove(marker)

    # -- preemption ---------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):  # only sets a flag: the checkpoint is written at a step boundary
            self._preempt = True

        try:
            signal.signal(signal.SIGUSR1, handler)
        except (ValueError, AttributeError):  # not the main thread / not POSIX
            pass

    # -- rebuild ------------------------------------------------------------------------------
    def rebuild(self, req: Rebuild, epoch: int | None = None) -> None:
        """Apply ``req.surgery`` to the full model and re-prepare model, optimizer and schedule.

        ``epoch``: the epoch whose end asked for it (default: the current one).
        """
        epoch = self.epoch if epoch is None else epoch
        before = self.evaluate()  # right before and right after the surgery: both logged
        dist.broadcast_buffers(self.unwrapped)  # BatchNorm statistics: rank 0's everywhere (FSDP2/ZeRO)
        new_sd = run_surgery(self.unwrapped, req, self._plain_model)
        self.model = self.optimizer = None
        gc.collect()
        self._build_model_and_optimizer(start_step=self.step, state_dict=new_sd)
        after = self.evaluate()
        self.rebuilds.append({"step": self.step, "epoch": epoch, "reason": req.reason})
        self.metrics.write("rebuild", step=self.step, epoch=epoch, reason=req.reason, params=self.n_params,
                           nonzero=self.n_nonzero, **{f"before/{k}": v for k, v in before.items()},
                           **{f"after/{k}": v for k, v in after.items()})
        log.info("rebuilt the model at the end of epoch %d: %s (params %d); val_loss %.4f -> %.4f", epoch,
                 req.reason, self.n_params, before.get("val_loss", float("nan")), after.get("val_loss", float("nan")))

    # -- the loop -----------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.acc
        accum = cfg.optim.grad_accum_steps
        start = self._t0 = time.time()  # train rows carry ``time``: seconds since here
        ds = engine_settings(self.acc)
        self.metrics.write("start", step=self.step, backend=self.backend, processes=self.world,
                           params=self.n_params, nonzero=self.n_nonzero, **({"deepspeed": ds} if ds else {}))
        stop = self.step >= self.total_steps
        while self.epoch < cfg.run.epochs and not stop:
            epoch_start = time.time()
            self.model.train()
            n_batches = self.steps_per_epoch * accum
            bar = _progress(cfg, acc, n_batches // accum, self.batch_in_epoch // accum, self.epoch)
            for batch in self.data.train.iter_from(self.epoch, self.batch_in_epoch):
                if self.batch_in_epoch >= n_batches:
                    break
                res = self.driver.micro_step(batch)
                self.batch_in_epoch += 1
                self._window.append(res.loss.double())  # stays on the device: no host sync per step
                if not res.synced:
                    continue
                self.step = self.driver.step
                self._window_steps.append((self.step, len(self._window), time.time()))
                if bar is not None:
                    bar.update(1)
                last = self.step >= self.total_steps or self.batch_in_epoch >= n_batches
                save = bool(cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0)
                if not (last or save or self.step % cfg.logging.sync_every_steps == 0):
                    continue
                if self._sync(bar):  # any rank got the signal: all stop at this same step
                    self.save()
                    if acc.is_main_process:
                        with open(os.path.join(self.run_dir, PREEMPT_MARKER), "w") as fh:
                            fh.write(f"{self.step}\n")
                    log.info("preempted: checkpoint at step %d written; exiting", self.step)
                    self.metrics.write("preempted", step=self.step, epoch=self.epoch)
                    if bar is not None:
                        bar.close()
                    return {"preempted": True, "step": self.step}
                if self.step >= self.total_steps:
                    stop = True
                    break
                if save:
                    self.save()
            if bar is not None:
                bar.close()
            self._end_epoch(time.time() - epoch_start, final=stop)
        return self._finish(time.time() - start)

    def _sync(self, bar=None) -> bool:
        """One collective for the window of steps since the last sync: every micro-batch's global loss
        and the preemption flag. Writes the window's train rows; returns whether any rank was signalled.

        Reducing every ``logging.sync_every_steps`` steps instead of every micro-batch keeps the loop
        free of per-step host syncs (each one stalls a GPU stream) and collectives."""
        cfg = self.cfg
        if not self._window:
            return False
        flag = torch.tensor([float(self._preempt)], dtype=torch.float64, device=self._window[0].device)
        red = self.acc.reduce(torch.cat([torch.stack(self._window), flag]), reduction="sum").cpu()
        losses = red[:-1] / self.world
        self.loss_sum += losses.sum().to(self.loss_sum.device)
        self.loss_count += len(losses)
        for step, end, when in self._window_steps:
            loss = float(losses[end - 1])
            if cfg.logging.log_every_steps and step % cfg.logging.log_every_steps == 0:
                self.metrics.write("train", step=step, epoch=self.epoch, loss=loss,
                                   lr=self.scheduler.get_last_lr()[0], time=round(when - self._t0, 4))
        if bar is not None and self._window_steps:
            bar.set_postfix(loss=f"{float(losses[self._window_steps[-1][1] - 1]):.4f}", refresh=False)
        self._window, self._window_steps = [], []
        return bool(red[-1] > 0)

    def _end_epoch(self, seconds: float, final: bool = False) -> None:
        cfg = self.cfg
        self._sync()
        train_loss = float(self.loss_sum.item()) / max(1, self.loss_count)
        row: dict[str, Any] = {"epoch": self.epoch, "step": self.step, "train_loss": train_loss,
                               "lr": self.scheduler.get_last_lr()[0], "epoch_time": round(seconds, 2)}
        last = final or self.epoch + 1 >= cfg.run.epochs or self.step >= self.total_steps
        if last:  # e.g. prune physically: before the final evaluation and export
            req = self.driver.end_train()
            if req is not None:
                self.rebuild(req)
        if last or (self.epoch + 1) % cfg.run.eval_every_epochs == 0:
            self.last_eval = self.evaluate()
            row.update(self.last_eval)
            self.best_acc = max(self.best_acc, self.last_eval.get("val_acc", 0.0))
        report = self.method.report()
        if report:
            row["method"] = report
        log.info("epoch %d | step %d | train_loss %.4f | %s | %.1fs", self.epoch, self.step, train_loss,
                 " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in self.last_eval.items()
                            if k in row), seconds)
        self.metrics.write("epoch", **row)
        ended = self.epoch
        req = None if last else self.driver.end_epoch(ended, {k: v for k, v in row.items() if k != "method"})
        # A run stopped by run.max_steps inside an epoch keeps its place: a resume with more steps
        # finishes this epoch instead of skipping its remaining batches.
        if self.batch_in_epoch >= self.steps_per_epoch * cfg.optim.grad_accum_steps:
            self.epoch += 1
            self.batch_in_epoch = 0
            self.loss_sum.zero_()
            self.loss_count = 0
        if req is not None:
            self.rebuild(req, epoch=ended)
        if cfg.checkpoint.every_epoch:
            self.save()

    def evaluate(self) -> dict[str, Any]:
        """Validation metrics, reduced exactly over ranks (BatchNorm statistics of rank 0 everywhere);
        with a weight EMA also those of the averaged weights (``ema_`` + the same keys)."""
        dist.broadcast_buffers(self.unwrapped)
        self.model.eval()
        out = self.task.evaluate(self.model, self.data.val, self.acc, self.epoch)
        if self.ema is not None:
            with self.ema.swapped_in(self.unwrapped, self.method.constrain):
                dist.broadcast_buffers(self.unwrapped)
                out.update({f"ema_{k}": v for k, v in
                            self.task.evaluate(self.model, self.data.val, self.acc, self.epoch).items()})
        self.model.train()
        return out

    def finalized_model(self) -> torch.nn.Module:
        """The inference model (``method.finalize`` of the full weights) as a plain module, on every rank.

        Collective: every rank gathers the full weights.
        """
        dist.broadcast_buffers(self.unwrapped)
        full = dist.full_state_dict(self.unwrapped, fp32_master=True)
        return self._finalize(full)

    def _finalize(self, full: dict[str, torch.Tensor]) -> torch.nn.Module:
        plain = self._plain_model()
        plain.load_state_dict(full, strict=True)
        return self.method.finalize(plain).eval()

    def export(self, path: str) -> str | None:
        """Write the finalized model to ``path`` (safetensors, with what ``load_exported`` needs)."""
        model = self.finalized_model()
        meta = export_metadata(self.cfg, self.data.info, self.method, self.step)
        out = ckpt.save_exported(model, path, meta) if self.acc.is_main_process else None
        self.acc.wait_for_everyone()
        return out

    def _finish(self, seconds: float) -> dict[str, Any]:
        final = self.finalized_model()
        total, nonzero = count_parameters(final)
        result = {"model": self.cfg.model.name, "method": self.cfg.method.name, "backend": self.backend,
                  "processes": self.world, "steps": self.step, "epochs": self.epoch, "params": total,
                  "nonzero_params": nonzero, "time_s": round(seconds, 1), **self.last_eval,
                  "best_acc": self.best_acc}
        try:  # inference FLOPs of the finalized model vs the registered dense architecture
            from .metrics.flops import flops_summary

            fl = flops_summary(final, self.method.ctx.example_input, dense_reference=self._registered_model())
            result.update({k: v for k, v in fl.items() if isinstance(v, (int, float))})
        except Exception as err:  # FLOPs are a report, never a reason to lose a finished run
            log.warning("FLOPs not counted: %s", err)
        extra = self.task.final_metrics(self.model, self.data, self.acc, self.run_dir) \
            if hasattr(self.task, "final_metrics") else {}
        result.update(extra)
        if self.cfg.checkpoint.save_final:
            if self.acc.is_main_process:
                ckpt.save_exported(final, os.path.join(self.run_dir, "model.safetensors"),
                                   export_metadata(self.cfg, self.data.info, self.method, self.step))
            if self.ema is not None:  # the averaged weights, finalized the same way (masks folded)
                # the average covers every floating tensor; the rest (step counters, extra state) is
                # never sharded and is taken from this rank's module as it is
                full = {dist.plain_name(k): v.detach().cpu() if isinstance(v, torch.Tensor) else v
                        for k, v in self.unwrapped.state_dict().items()
                        if not (isinstance(v, torch.Tensor) and v.is_floating_point())}
                full.update(self.ema.full_state(self.unwrapped))
                averaged = self._finalize(full)
                if self.acc.is_main_process:
                    ckpt.save_exported(averaged, os.path.join(self.run_dir, "model_ema.safetensors"),
                                       export_metadata(self.cfg, self.data.info, self.method, self.step))
                del averaged
            self.acc.wait_for_everyone()
        del final
        self.metrics.write("end", **result)
        if self.acc.is_main_process and self.cfg.logging.plots:
            for path in self.method.plot(self.run_dir):
                log.info("plot: %s", path)
        if self.acc.is_main_process:
            print(format_result_table(result), flush=True)
        self.metrics.close()
        return result


def export_metadata(cfg: Config, info: dict[str, Any], method, step: int) -> dict[str, str]:
    """What an exported file carries besides its tensors (all strings, as safetensors wants)."""
    return {"format": "dist_sparse.export/1", "model": cfg.model.name,
            "model_kwargs": json.dumps(model_kwargs(cfg, info), sort_keys=True), "method": cfg.method.name,
            "architecture": json.dumps(method.architecture(), sort_keys=True), "step": str(step)}


def _progress(cfg: Config, acc, total: int, initial: int, epoch: int):
    if not (cfg.logging.progress_bar and acc.is_main_process):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
                mininterval=1.0, file=sys.stderr)


def format_result_table(r: dict[str, Any]) -> str:
    """The closing table: accuracy, time and parameter count of the run."""
    acc = r.get("val_acc")
    rows = [("model", r["model"]), ("method", r["method"]), ("backend", f"{r['backend']} x {r['processes']}"),
            ("epochs / steps", f"{r['epochs']} / {r['steps']}"),
            ("val top-1" if "val_top5" in r else "val token acc", f"{100 * acc:.2f} %" if acc is not None else "-"),
            ("val top-5", f"{100 * r['val_top5']:.2f} %" if "val_top5" in r else "-"),
            ("val loss", f"{r['val_loss']:.4f}" if "val_loss" in r else "-"),
            *([("val top-1 (weight EMA)" if "val_top5" in r else "val token acc (EMA)", f"{100 * r['ema_val_acc']:.2f} %")]
              if "ema_val_acc" in r else []),
            ("params (total)", f"{r['params']:,}"),
            ("params (nonzero)", f"{r['nonzero_params']:,} ({100 * r['nonzero_params'] / max(1, r['params']):.1f} %)"),
            ("train time", f"{r['time_s']:.1f} s")]
    if "flops/forward_fraction" in r:
        rows.insert(-1, ("inference FLOPs vs dense", f"{100 * r['flops/forward_fraction']:.1f} %"))
    if "bleu" in r:
        rows.insert(5, ("BLEU", f"{r['bleu']:.2f}"))
    w = max(len(k) for k, _ in rows)
    v = max(len(str(x)) for _, x in rows)
    line = "+" + "-" * (w + 2) + "+" + "-" * (v + 2) + "+"
    body = "\n".join(f"| {k:<{w}} | {x:>{v}} |" for k, x in rows)
    return f"{line}\n{body}\n{line}"


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------


def _say(line: str) -> None:
    """One line to stderr in ONE write: the ranks' lines must not interleave in a shared pipe."""
    sys.stderr.flush()
    os.write(sys.stderr.fileno(), (line + "\n").encode("utf-8", "replace"))


def run(cfg: Config) -> dict[str, Any]:
    """Train with ``cfg``; returns the final metrics (on every rank)."""
    ok = False
    try:
        trainer = Trainer(cfg)
        result = trainer.train()
        trainer.acc.wait_for_everyone()
        trainer.acc.end_training()
        ok = True
        return result
    except RunError as err:  # raised on every rank alike (a failed rebuild): the ranks still meet
        # Print before the ranks meet in shutdown: a rank that exits first would have the launcher
        # kill the others before they print their line.
        _say(f"error: {err}")
        err.printed = True
        ok = True
        raise
    finally:
        dist.shutdown(wait=ok)


def parse_args(argv: list[str] | None = None):
    import argparse

    p = argparse.ArgumentParser(prog="dist-sparse train", description="Train a model with a sparse/low-rank method.")
    p.add_argument("--config", "-c", required=False, help="YAML config (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint (checkpoint.resume=auto)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=0.05")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides) + (["checkpoint.resume=auto"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
        result = run(cfg)
    except ConfigError as err:
        print(str(err), file=sys.stderr, flush=True)
        return 2
    except RunError as err:
        if not getattr(err, "printed", False):
            _say(f"error: {err}")
        return 1
    return 0 if result is not None else 1


if __name__ == "__main__":
    sys.exit(main())
