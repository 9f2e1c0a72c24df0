"""A small, complete training loop around :class:`dist_sparse.driver.Driver` for the method contract suite.

It does what the trainer does that matters to a method - setup, prepare, bind, the step order, epoch
ends with metrics, rebuilds, the end of training, checkpoints (weights_only) and resume - on a narrow
ResNet-20 and seeded synthetic batches, in one process or (``world > 1``) under DDP on gloo, with each
rank taking its rows of the same global batch.
"""
from __future__ import annotations

import hashlib
import io
import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dist_sparse import distributed as D
from dist_sparse.config import config_from_dict
from dist_sparse.driver import Driver, PlainLoop, run_surgery
from dist_sparse.methods import create_method, method_names
from dist_sparse.methods.base import Method, OptimizerInfo, RunContext
from dist_sparse.models import create_model

import tests.methods.example_method  # noqa: F401  (registers "oneshot", the docs' example)

MODEL = "resnet20"
MODEL_KW = dict(num_classes=10, in_chans=1, img_size=28, width_mult=0.25)
STEPS_PER_EPOCH = 5
EPOCHS = 3
GLOBAL_BATCH = 16
LR, WD = 0.05, 5e-4

# Settings that make each method take decisions inside a 15-step run. A new method joins the suite by
# registering; add its small settings here if its defaults decide nothing that early.
FIELDS: dict[str, dict[str, Any]] = {
    "static": {"sparsity": 0.7},
    "set": {"sparsity": 0.7, "delta_t": 3},
    "rigl": {"sparsity": 0.7, "delta_t": 3},
    "gmp": {"sparsity": 0.7, "t_start": 2, "t_end": 11, "delta_t": 3},
    "oneshot": {"sparsity": 0.5, "at_step": 4},
    # window 2 / threshold 1e6: every layer is flagged at check 2, so the switch comes at the end of epoch 1
    "cuttlefish": {"window": 2, "last_m": 2, "threshold": 1e6, "eval_batches": 1},
    # gates start half open (bias 0, spread weights) and polarize; pruned after epoch 1, then fine-tuned
    "polarization": {"finetune_epochs": 1, "calibration_batches": 2, "lambda_polar": 3.0, "lambda_act": 0.3,
                     "gate_init_bias": 0.0, "gate_init_std": 0.5},
}


def contract_methods() -> list[str]:
    """Every registered method except the ones tests register for their own purposes."""
    return [n for n in method_names() if not n.startswith("test_")]


def make_method(name: str, seed: int = 0) -> Method:
    cfg = config_from_dict({"model": {"name": MODEL}, "method": {"name": name, **FIELDS.get(name, {})}}).method
    return create_method(cfg, seed=seed)


def registered_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return create_model(MODEL, **MODEL_KW)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + step)
    y = torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)
    x = torch.randn(GLOBAL_BATCH, 1, 28, 28, generator=g) * 0.5
    x[:, :, :4, :4] += y.view(-1, 1, 1, 1).float() / 5  # a learnable signal
    return x, y


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def digest(obj: Any) -> str:
    """SHA-1 of a nested structure of tensors and plain values (bit-exact)."""
    h = hashlib.sha1()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(f"K{k!r}".encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                walk(v)
        else:
            h.update(repr(x).encode())

    walk(obj)
    return h.hexdigest()


def roundtrip(obj: Any) -> Any:
    """torch.save then torch.load(weights_only=True): what a checkpoint gives back."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


class _DDPLoop(PlainLoop):
    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class Run:
    """One training run of ``method`` (a fresh one, or resumed from :meth:`checkpoint`)."""

    def __init__(self, name: str, seed: int = 0, world: int = 1, rank: int = 0, state: dict | None = None):
        self.name, self.world, self.rank = name, world, rank
        self.method = make_method(name, seed)
        total = STEPS_PER_EPOCH * EPOCHS
        example = (global_batch(0)[0][:2],)
        self.method.setup(RunContext(total_steps=total, steps_per_epoch=STEPS_PER_EPOCH, world_size=world, rank=rank,
                                     seed=seed, optimizer=OptimizerInfo("sgd", lr=LR, weight_decay=WD, momentum=0.9),
                                     example_input=example, calibration=self._calibration, forward=lambda m, b: m(b[0])))
        self.losses: list[float] = []
        self.rebuilds = 0
        self.driver = Driver(self.method, _DDPLoop(), loss_fn)
        sd = None
        if state is not None:
            self.method.load_state_dict(state["method"])
            self.losses, self.rebuilds = list(state["losses"]), int(state["rebuilds"])
            sd = state["model"]
        self._build(int(state["step"]) if state else 0, sd)
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.driver.step = int(state["step"])

    # -- construction ------------------------------------------------------------------------------
    def _calibration(self, n: int):
        for i in range(n):
            x, y = global_batch(100_000 + i)
            yield self._rows((x, y))

    def _rows(self, batch):
        per = GLOBAL_BATCH // self.world
        return tuple(t[self.rank * per:(self.rank + 1) * per] for t in batch)

    def plain(self) -> nn.Module:
        return self.method.prepare(registered_model())

    def _build(self, start_step: int, state_dict: dict | None) -> None:
        model = self.plain()
        if state_dict is not None:
            model.load_state_dict(state_dict, strict=True)
        self.module = model
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=WD)
        total = STEPS_PER_EPOCH * EPOCHS
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)) * self.method.lr_scale)
        with warnings.catch_warnings():  # stepped to the global step before any optimizer step
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start_step):
                sched.step()
        wrapped = nn.parallel.DistributedDataParallel(model) if self.world > 1 else model
        self.model, self.optimizer, self.scheduler = wrapped, opt, sched
        self.driver.attach(wrapped, opt, sched)

    def rebuild(self, req) -> None:
        new_sd = run_surgery(self.module, req, self.plain)
        self._build(self.driver.step, new_sd)
        self.rebuilds += 1

    # -- training ----------------------------------------------------------------------------------
    def train(self, until: int = STEPS_PER_EPOCH * EPOCHS) -> "Run":
        total = STEPS_PER_EPOCH * EPOCHS
        while self.driver.step < until:
            step = self.driver.step
            res = self.driver.micro_step(self._rows(global_batch(step)))
            loss = res.loss.double().reshape(1)
            if self.world > 1:
                torch.distributed.all_reduce(loss)
                loss /= self.world
            self.losses.append(float(loss))
            if self.driver.step % STEPS_PER_EPOCH == 0:
                epoch = self.driver.step // STEPS_PER_EPOCH - 1
                mean = sum(self.losses[-STEPS_PER_EPOCH:]) / STEPS_PER_EPOCH
                req = self.driver.end_train() if self.driver.step >= total else \
                    self.driver.end_epoch(epoch, {"epoch": epoch, "train_loss": mean})
                if req is not None:
                    self.rebuild(req)
        return self

    def checkpoint(self) -> dict:
        """What a checkpoint holds, through torch.save / torch.load(weights_only=True)."""
        return roundtrip({"model": D.full_state_dict(self.module), "optimizer": self.optimizer.state_dict(),
                          "scheduler": self.scheduler.state_dict(), "method": self.method.state_dict(),
                          "step": self.driver.step, "losses": self.losses, "rebuilds": self.rebuilds})

    def eval_outputs(self, x: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        with torch.no_grad():
            out = self.module(x)
        self.module.train()
        return out
