"""Cuttlefish: train full rank, switch to factorized layers once every stable rank has settled.

Wang et al., "Cuttlefish: Low-rank model training without all the tuning", MLSys 2023
(arXiv 2305.02538). docs/cuttlefish.md describes the method, the configuration and what was measured.

Pieces (pure functions first, so each rule is unit-testable on synthetic data):

* :func:`converged` - the switch detector for one layer's stable-rank history (``reference``: moving
  average, central differences, mean over the last M points, threshold relaxed by the number of layers
  still moving; ``raw``: the paper's literal |h_t - h_{t-1}| < eps);
* :class:`SwitchController` - histories, sticky flags, beta per layer, ``immediate`` / ``lagged`` timing;
* :func:`select_rank` - ``min(rank, ceil(beta * srank))`` (``scaled``) or ``ceil(srank)`` (``vanilla``);
* :func:`dense_stacks` / :func:`time_forward` - the speed-profiling rule that decides which leading
  stacks stay full rank (K);
* :class:`Cuttlefish` - the method: measures stable ranks at initialization and after every full-rank
  epoch (one collective for all layers), asks for a :class:`Rebuild` at the switch, applies Frobenius
  decay to the factors, and divides the learning rate by ``post_switch_lr_divisor`` afterwards.
"""
from __future__ import annotations

import fnmatch
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np
import torch
from torch import nn

from dist_sparse import distributed as D
from dist_sparse.errors import check_range
from dist_sparse.metrics.layer_stats import iter_weight_layers, stable_ranks
from dist_sparse.methods.base import Method, MethodConfig, Rebuild, register_method
from dist_sparse.surgery import lowrank as LR

log = logging.getLogger("dist_sparse")

__all__ = ["CuttlefishConfig", "Cuttlefish", "DetectorConfig", "PRESETS", "converged", "relaxation_factor",
           "SwitchController", "select_rank", "dense_stacks", "time_forward", "find_stacks"]


# ------------------------------------------------------------------------------------------------
# The switch detector
# ------------------------------------------------------------------------------------------------


@dataclass
class DetectorConfig:
    """Constants of the switch detector (see :data:`PRESETS`)."""

    mode: str = "reference"  # reference (EMA + window + relaxation) or raw (|h_t - h_{t-1}| < threshold)
    window: int = 15  # N: EMA span (weight 2/(N+1)) and first check index that is tested
    last_m: int = 11  # M: mean |derivative| over the last M points
    threshold: float = 0.1  # base threshold (epsilon)
    relaxation: tuple = ((2, 2, 2.5), (1, 1, 5.0))  # (lo, hi, factor): threshold x factor if lo <= remaining <= hi


# The three task families' constants (window, last M, base threshold, relaxation by remaining layers).
PRESETS: dict[str, DetectorConfig] = {
    "cifar": DetectorConfig("reference", 15, 11, 0.1, ((2, 2, 2.5), (1, 1, 5.0))),
    "imagenet_cnn": DetectorConfig("reference", 5, 5, 0.33, ((4, 6, 2.5), (0, 3, 5.0))),
    "vit": DetectorConfig("reference", 5, 5, 0.411, ((5, 9, 2.5), (0, 4, 5.0))),
}


def relaxation_factor(n_remaining: int, relaxation: Sequence[Sequence[float]]) -> float:
    """The multiplier of the threshold when ``n_remaining`` layers are not yet flagged (1 if none applies)."""
    for lo, hi, factor in relaxation:
        if lo <= n_remaining <= hi:
            return float(factor)
    return 1.0


def smoothed_gradient(history: Sequence[float], window: int) -> np.ndarray:
    """|central differences| (numpy.gradient) of the EMA (weight 2/(window+1), s_0 = h_0) of ``history``."""
    h = np.asarray(history, dtype=np.float64)
    w = 2.0 / (window + 1)
    s = np.empty_like(h)
    s[0] = h[0]
    for i in range(1, len(h)):
        s[i] = w * h[i] + (1 - w) * s[i - 1]
    if len(s) < 2:
        return np.zeros_like(s)
    return np.abs(np.gradient(s))


def converged(history: Sequence[float], epoch: int, n_remaining: int, cfg: DetectorConfig) -> bool:
    """Whether one layer's stable rank has settled at check ``epoch`` (history ``h_0 .. h_epoch``).

    ``reference``: never before check ``window``; else mean of the last ``last_m`` |EMA gradient|
    values <= threshold x :func:`relaxation_factor` (``n_remaining`` = layers unflagged at the start of
    the check). ``raw``: |h_epoch - h_(epoch-1)| < threshold, no smoothing or relaxation.
    """
    h = list(history)[: epoch + 1]
    if len(h) < epoch + 1 or epoch < 1:
        return False
    if cfg.mode == "raw":
        return abs(h[-1] - h[-2]) < cfg.threshold
    if epoch < cfg.window:
        return False
    g = smoothed_gradient(h, cfg.window)
    return float(np.mean(g[-cfg.last_m:])) <= cfg.threshold * relaxation_factor(n_remaining, cfg.relaxation)


class SwitchController:
    """Histories, sticky flags and the switch decision for a set of layers.

    ``update(values)`` appends one check (``values``: layer -> stable rank; the first call is the
    initialization measurement, check 0) and returns True when the model should be factorized now.
    ``immediate``: at the first check where every flag is set; ``lagged`` (reference code): one check
    later, with that later measurement.
    """

    def __init__(self, detector: DetectorConfig, timing: str = "immediate", truncate_int: bool = False):
        self.detector, self.timing, self.truncate_int = detector, timing, bool(truncate_int)
        self.history: dict[str, list[float]] = {}
        self.flags: dict[str, int] = {}  # layer -> the check at which it was flagged
        self.switch_at: Optional[int] = None  # lagged mode: the check at which to switch

    @property
    def checks(self) -> int:
        """Index of the last check (-1 before the first measurement)."""
        return len(next(iter(self.history.values()))) - 1 if self.history else -1

    def update(self, values: dict[str, float]) -> bool:
        first = not self.history
        for name, v in values.items():
            self.history.setdefault(name, []).append(float(int(v)) if self.truncate_int else float(v))
        j = self.checks
        if first:
            return False
        if self.switch_at is not None:
            return j >= self.switch_at
        n_remaining = sum(1 for n in self.history if n not in self.flags)  # counted before this check's updates
        for name, h in self.history.items():
            if name not in self.flags and converged(h, j, n_remaining, self.detector):
                self.flags[name] = j
        if len(self.flags) == len(self.history):
            if self.timing == "lagged":
                self.switch_at = j + 1
                return False
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: list(v) for k, v in self.history.items()}, "flags": dict(self.flags),
                "switch_at": self.switch_at}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.history = {str(k): [float(x) for x in v] for k, v in s["history"].items()}
        self.flags = {str(k): int(v) for k, v in s["flags"].items()}
        self.switch_at = None if s.get("switch_at") is None else int(s["switch_at"])


def select_rank(full: int, srank: float, srank0: float | None = None, metric: str = "scaled") -> int:
    """The factorization rank: ``min(full, ceil(beta * srank))`` with ``beta = full / srank0`` (``scaled``)
    or ``min(full, ceil(srank))`` (``vanilla``), at least 1."""
    if metric == "scaled":
        if not srank0:
            return full
        x = full * srank / srank0  # = beta * srank, with one rounding
    else:
        x = srank
    return int(max(1, min(full, math.ceil(x - 1e-9))))


# ------------------------------------------------------------------------------------------------
# Profiling: which leading stacks stay full rank
# ------------------------------------------------------------------------------------------------


def dense_stacks(timings: Sequence[tuple[float, float]], tau: float = 1.5, rule: str = "prefix") -> list[int]:
    """Indices of the stacks kept dense, from per-stack ``(t_dense, t_factorized)`` timings.

    A stack is worth factorizing iff ``t_dense > tau * t_factorized`` (strict). ``prefix``: every stack
    up to and including the last failing one is dense; ``per_stack``: exactly the failing ones.
    """
    fails = [i for i, (td, tf) in enumerate(timings) if not td > tau * tf]
    if rule == "per_stack":
        return fails
    return list(range(max(fails) + 1)) if fails else []


def time_forward(fn: Callable[[], Any], zeta: int = 11, device: torch.device | None = None) -> float:
    """Mean seconds of ``fn()`` over ``zeta`` runs, the first (warm-up) discarded."""
    times = []
    for _ in range(zeta):
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    rest = times[1:] if len(times) > 1 else times
    return float(sum(rest) / len(rest))


def find_stacks(model: nn.Module, names: Sequence[str], example_input: Any) -> list[list[str]]:
    """Consecutive layers (in ``names`` order) whose weight shape and input shape are identical."""
    shapes: dict[str, tuple] = {}
    mods = {n: m for n, _, m, _ in iter_weight_layers(model)}
    hooks = [mods[n].register_forward_pre_hook(lambda m, a, n=n: shapes.__setitem__(n, tuple(a[0].shape[1:])))
             for n in names]
    try:
        with torch.no_grad():
            model(*example_input) if isinstance(example_input, (tuple, list)) else model(example_input)
    finally:
        for h in hooks:
            h.remove()
    stacks: list[list[str]] = []
    prev = None
    for n in names:
        key = (tuple(mods[n].weight.shape), shapes.get(n))
        if stacks and key == prev:
            stacks[-1].append(n)
        else:
            stacks.append([n])
        prev = key
    return stacks


# ------------------------------------------------------------------------------------------------
# The method
# ------------------------------------------------------------------------------------------------


@dataclass
class CuttlefishConfig(MethodConfig):
    """Cuttlefish: automatic full-rank -> low-rank switch (see docs/cuttlefish.md)."""

    name: str = "cuttlefish"  # method name
    preset: Literal["cifar", "imagenet_cnn", "vit"] = "cifar"  # detector constants of a task family
    detector: Literal["reference", "raw"] = "reference"  # smoothed windowed rule, or the paper's literal rule
    window: int = 0  # N: EMA span and first tested check (0: the preset's)
    last_m: int = 0  # M: points averaged (0: the preset's)
    threshold: float = 0.0  # base threshold epsilon (0: the preset's)
    switch_timing: Literal["immediate", "lagged"] = "immediate"  # switch at the first all-flagged check, or one later
    history_truncate_int: bool = False  # store int(srank) in the history (reproduces the reference code)
    rank_metric: Literal["scaled", "vanilla"] = "scaled"  # rank = ceil(beta * srank), or ceil(srank)
    rank_from_smoothed: bool = False  # rank from the EMA of the history instead of the last raw value
    include: list = field(default_factory=lambda: ["*"])  # FQN globs of candidate Conv2d/Linear layers
    exclude: list = field(default_factory=lambda: ["*downsample*"])  # globs kept dense (after include)
    keep_first_last: bool = True  # the first layer (stem/embedding) and the last (classifier) stay dense
    profile: bool = False  # choose the leading dense stacks (K) by timing on rank 0 (needs example_input)
    profile_alpha: float = 0.25  # rank ratio of the factorized variant when profiling
    profile_tau: float = 1.5  # a stack is factorized iff t_dense > tau * t_factorized
    profile_zeta: int = 11  # timed forward passes per variant (the first is discarded)
    profile_rule: Literal["prefix", "per_stack"] = "prefix"  # dense stacks: a prefix, or exactly the failing ones
    frob_decay: bool = True  # Frobenius decay on the factors (their weight decay is then 0)
    frob_lambda: float = -1.0  # FD coefficient (< 0: the run's weight decay)
    extra_bn: bool = False  # a fresh BatchNorm between conv factors (not with frob_decay)
    min_rank_guard: bool = False  # keep a layer dense when its factorized form would not save parameters
    post_switch_lr_divisor: float = 1.0  # learning rate divided by this after the switch (DeiT: 3)
    eval_batches: int = 4  # calibration batches scored right before and right after the switch (0: off)

    def validate(self) -> None:
        check_range("method.window", self.window, self.window >= 0, "an integer >= 0 (0: the preset's)")
        check_range("method.last_m", self.last_m, self.last_m >= 0, "an integer >= 0 (0: the preset's)")
        check_range("method.threshold", self.threshold, self.threshold >= 0, "a number >= 0 (0: the preset's)")
        check_range("method.include", self.include, bool(self.include) and all(isinstance(p, str) and p
                                                                               for p in self.include),
                    "a non-empty list of FQN globs")
        check_range("method.exclude", self.exclude, all(isinstance(p, str) and p for p in self.exclude),
                    "a list of FQN globs")
        check_range("method.profile_alpha", self.profile_alpha, 0 < self.profile_alpha <= 1, "a number in (0, 1]")
        check_range("method.profile_tau", self.profile_tau, self.profile_tau > 0, "a number > 0")
        check_range("method.profile_zeta", self.profile_zeta, self.profile_zeta >= 2, "an integer >= 2")
        check_range("method.extra_bn", self.extra_bn, not (self.extra_bn and self.frob_decay),
                    "false while method.frob_decay is true (Frobenius decay needs plain factors)")
        check_range("method.post_switch_lr_divisor", self.post_switch_lr_divisor, self.post_switch_lr_divisor > 0,
                    "a number > 0")
        check_range("method.eval_batches", self.eval_batches, self.eval_batches >= 0, "an integer >= 0")

    def detector_config(self) -> DetectorConfig:
        p = PRESETS[self.preset]
        return DetectorConfig(self.detector, self.window or p.window, self.last_m or p.last_m,
                              self.threshold or p.threshold, p.relaxation)


def _matches(name: str, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


@register_method
class Cuttlefish(Method):
    """Full-rank training until the stable ranks settle, then a Rebuild into factorized layers."""

    name = "cuttlefish"
    Config = CuttlefishConfig

    def __init__(self, cfg: CuttlefishConfig, *, seed: int = 0):
        super().__init__(cfg, seed=seed)
        self.controller = SwitchController(cfg.detector_config(), cfg.switch_timing, cfg.history_truncate_int)
        self.candidates: list[str] | None = None  # layers watched and factorized (decided at the first bind)
        self.full_ranks: dict[str, int] = {}  # layer -> min(rows, cols)
        self.shapes: dict[str, list[int]] = {}  # layer -> dense weight shape
        self.dense_stack_layers: list[str] = []  # candidates kept dense by profiling
        self.profile_times: list[list[float]] = []  # per stack (t_dense, t_factorized)
        self.ranks: dict[str, int] | None = None  # layer -> rank, once switched
        self.switch_epoch: int | None = None  # full-rank epochs trained before the switch
        self.srank_seconds: list[float] = []  # wall time of each measurement (logged, not part of the state)
        self.evals: dict[str, float] = {}  # calibration loss/accuracy right before / after the switch
        self.flops: dict[str, float] = {}  # forward FLOPs per sample of the dense / factorized model
        self._eval_after = False

    # -- architecture --------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        if self.ranks:
            model = LR.factorize_model(model, self.ranks, extra_bn=self.cfg.extra_bn)
        return model

    def finalize(self, model: nn.Module) -> nn.Module:
        return model  # the factors are the inference model

    def architecture(self) -> dict[str, Any]:
        if not self.ranks:
            return {}
        return {"ranks": {k: int(v) for k, v in sorted(self.ranks.items())}, "extra_bn": bool(self.cfg.extra_bn)}

    @classmethod
    def build_exported(cls, model: nn.Module, arch: dict[str, Any]) -> nn.Module:
        if not arch:
            return model
        return LR.factorize_model(model, {k: int(v) for k, v in arch["ranks"].items()},
                                  extra_bn=bool(arch.get("extra_bn", False)), init=False)

    def _factor_modules(self, model: nn.Module) -> dict[str, nn.Sequential]:
        mods = dict(model.named_modules())
        from dist_sparse.metrics.layer_stats import clean_name

        clean = {clean_name(k): v for k, v in mods.items()}
        return {n: clean[n] for n in (self.ranks or {}) if n in clean}

    def param_group_overrides(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        if not (self.ranks and self.cfg.frob_decay):
            return {}
        out = {}
        for n, seq in self._factor_modules(model).items():
            out[f"{n}.0.weight"] = {"weight_decay": 0.0}
            out[f"{n}.{len(seq) - 1}.weight"] = {"weight_decay": 0.0}
        return out

    # -- candidates and the first measurement ---------------------------------------------------
    def select_layers(self, model: nn.Module) -> list[str]:
        """The Conv/Linear layers this config makes candidates for factorization (model order; the first
        and last layer left out with ``keep_first_last``, ``include``/``exclude`` globs applied, grouped convs skipped).
        Reads only the config and the model."""
        layers = [(n, m, w) for n, kind, m, w in iter_weight_layers(model) if kind in ("conv", "linear")]
        first_last = {layers[0][0], layers[-1][0]} if (self.cfg.keep_first_last and layers) else set()
        out = []
        for n, m, w in layers:
            if n in first_last or not _matches(n, self.cfg.include) or _matches(n, self.cfg.exclude):
                continue
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                continue
            if not isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
            out.append(n)
        return out

    def _profile(self, model: nn.Module, names: list[str]) -> tuple[list[str], list[list[float]]]:
        """The candidates kept dense and the per-stack timings, decided on rank 0 and broadcast."""
        if any(D.layout(p) != "plain" for p in model.parameters()):
            raise ValueError("method.profile times a plain copy of the model: run it under plain/DDP/ZeRO-1/2 "
                             "(or list the dense stacks in method.exclude)")
        result: Any = None
        if D.is_main():
            try:
                result = ("ok", self._profile_here(model, names))
            except Exception as err:  # reported on every rank below, never a hang
                result = ("error", f"{type(err).__name__}: {err}".splitlines()[0])
        result = D.broadcast_object(result, src=0)
        if result[0] == "error":
            raise RuntimeError(f"cuttlefish profiling failed on rank 0: {result[1]}")
        dense, times = result[1]
        return list(dense), [list(t) for t in times]

    def _profile_here(self, model: nn.Module, names: list[str]) -> tuple[list[str], list[list[float]]]:
        """Time the dense model against the model with one stack factorized at profile_alpha (a copy,
        so the BatchNorm statistics of the live model are untouched)."""
        import copy

        ex = self.ctx.example_input if self.ctx is not None else None
        if ex is None:
            raise ValueError("method.profile needs RunContext.example_input")
        dev = self.ctx.device or torch.device("cpu")
        base = copy.deepcopy(model).to(dev).train()
        ex = tuple(t.to(dev) for t in ex) if isinstance(ex, (tuple, list)) else (ex.to(dev),)
        stacks = find_stacks(base, names, ex)

        def timed(m):
            with torch.no_grad():
                return time_forward(lambda: m(*ex), self.cfg.profile_zeta, dev)

        times = []
        for st in stacks:  # the dense model is timed again next to each variant (the same conditions)
            ranks = {n: max(1, int(LR.full_rank(dict(base.named_modules())[n].weight) * self.cfg.profile_alpha))
                     for n in st}
            var = LR.factorize_model(copy.deepcopy(base), ranks, init=False)
            times.append([timed(base), timed(var)])
        dense_idx = dense_stacks([tuple(t) for t in times], self.cfg.profile_tau, self.cfg.profile_rule)
        return [n for i in dense_idx for n in stacks[i]], times

    def bind(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().bind(model, optimizer)
        if self.candidates is None:
            names = self.select_layers(model)
            if self.cfg.profile:
                self.dense_stack_layers, self.profile_times = self._profile(model, names)
                names = [n for n in names if n not in self.dense_stack_layers]
            shapes = {n: list(D.full_shape(w)) for n, _, _, w in iter_weight_layers(model)}
            t0 = time.perf_counter()
            values = self._measure(model, names)
            self.srank_seconds.append(round(time.perf_counter() - t0, 6))
            names = [n for n in names if values[n] > 0]  # an all-zero layer is never factorized
            self.candidates = names
            self.shapes = {n: shapes[n] for n in names}
            self.full_ranks = {n: LR.full_rank(shapes[n]) for n in names}
            self.controller.update({n: values[n] for n in names})
        if self._eval_after:
            self._eval_after = False
            self.evals.update({f"after_{k}": v for k, v in self._calibration_eval(model).items()})

    def _measure(self, model: nn.Module, names: list[str]) -> dict[str, float]:
        values = stable_ranks(model, names)  # one collective for all layers; equal on every rank
        D.assert_same_across_ranks(values, "cuttlefish stable ranks")
        return values

    def _calibration_eval(self, model: nn.Module) -> dict[str, float]:
        """Mean loss and accuracy over ``eval_batches`` calibration batches (global, all ranks)."""
        ctx = self.ctx
        if not self.cfg.eval_batches or ctx is None or ctx.calibration is None or ctx.forward is None:
            return {}
        was = model.training
        model.eval()
        tot = torch.zeros(3, dtype=torch.float64)
        with torch.no_grad():
            for batch in ctx.calibration(self.cfg.eval_batches):
                if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                    break
                out = ctx.forward(model, batch)
                y = batch[1].to(out.device)
                if out.ndim != 2 or y.ndim != 1:
                    break
                loss = torch.nn.functional.cross_entropy(out.float(), y, reduction="sum")
                tot += torch.stack([loss.double().cpu(), (out.argmax(1) == y).sum().double().cpu(),
                                    torch.tensor(float(len(y)), dtype=torch.float64)])
        model.train(was)
        if D.world_size() > 1:
            import torch.distributed as dist

            buf = tot.to(D._comm_device(torch.device("cpu")))
            dist.all_reduce(buf)
            tot = buf.cpu()
        if tot[2] == 0:
            return {}
        return {"loss": float(tot[0] / tot[2]), "acc": float(tot[1] / tot[2])}

    # -- the switch ------------------------------------------------------------------------------
    def _choose_ranks(self) -> dict[str, int]:
        c = self.cfg
        out = {}
        for n in self.candidates or []:
            h = self.controller.history[n]
            last = h[-1]
            if c.rank_from_smoothed:
                w = 2.0 / (self.controller.detector.window + 1)
                s = h[0]
                for v in h[1:]:
                    s = w * v + (1 - w) * s
                last = s
            r = select_rank(self.full_ranks[n], last, h[0], c.rank_metric)
            if c.min_rank_guard and not LR.saves_parameters(tuple(self.shapes[n]), r):
                continue
            out[n] = r
        return out

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, Any] | None = None) -> Rebuild | None:
        if self.ranks is not None or not self.candidates:
            return None
        t0 = time.perf_counter()
        values = self._measure(model, self.candidates)
        self.srank_seconds.append(round(time.perf_counter() - t0, 6))
        log.info("cuttlefish: stable ranks of %d layers after epoch %d measured in %.3fs", len(values), epoch,
                 self.srank_seconds[-1])
        if not self.controller.update(values):
            return None
        ranks = D.broadcast_object(self._choose_ranks(), src=0)  # decided from identical values; rank 0's wins
        D.assert_same_across_ranks(ranks, "cuttlefish ranks")
        flops = self._flops(model, ranks)
        if self.cfg.eval_batches:
            self.evals = {f"before_{k}": v for k, v in self._calibration_eval(model).items()}
        extra_bn, j = self.cfg.extra_bn, self.controller.checks

        def surgery(plain: nn.Module) -> nn.Module:
            return LR.factorize_model(plain, ranks, extra_bn=extra_bn)

        def commit() -> None:
            self.ranks = dict(ranks)
            self.switch_epoch = j
            self.lr_scale = 1.0 / float(self.cfg.post_switch_lr_divisor)
            self.flops = dict(flops)
            self._eval_after = bool(self.cfg.eval_batches)

        log.info("cuttlefish: switching to low rank after %d full-rank epochs; ranks %s", j, ranks)
        return Rebuild(surgery=surgery, commit=commit, reason=f"cuttlefish switch to low rank after {j} epochs "
                                                              f"({len(ranks)} layers)")

    def _flops(self, model: nn.Module, ranks: dict[str, int]) -> dict[str, float]:
        """Forward FLOPs per sample, dense and with ``ranks`` applied (per-layer formula r(m k^2 + n) /
        (m n k^2) on the dense count of each layer); {} when the model is sharded or there is no
        example input (the trainer's end-of-run table still has the inference FLOPs)."""
        ex = self.ctx.example_input if self.ctx is not None else None
        if ex is None or any(D.layout(p) != "plain" for p in model.parameters()):
            return {}
        from dist_sparse.metrics.flops import layer_forward_flops

        rep = layer_forward_flops(model, ex).per_sample()
        low = rep.total
        for n, r in ranks.items():
            shape = tuple(self.shapes[n])
            low -= rep.per_layer.get(n, 0.0) * (1 - LR.factorized_params(shape, r) / LR.dense_params(shape))
        out = {"dense_flops": float(rep.total), "lowrank_flops": float(low)}
        return D.broadcast_object(out, src=0)

    # -- Frobenius decay ---------------------------------------------------------------------------
    def _fd_lambda(self) -> float:
        if self.cfg.frob_lambda >= 0:
            return float(self.cfg.frob_lambda)
        return float(self.ctx.optimizer.weight_decay) if self.ctx is not None else 0.0

    def after_backward(self, model: nn.Module, step: int) -> None:
        if not (self.ranks and self.cfg.frob_decay):
            return
        lam = self._fd_lambda()
        if lam == 0:
            return
        for _, seq in self._factor_modules(model).items():
            b, c = LR.factor_pair(seq)
            with D.gather_full(b) as fb, D.gather_full(c) as fc:
                gb, gc = LR.frobenius_decay_grads(fb.detach().float(), fc.detach().float(), lam)
            D.add_grad_(b, gb.to(b.dtype))
            D.add_grad_(c, gc.to(c.dtype))

    # -- reporting ---------------------------------------------------------------------------------
    def _param_counts(self) -> tuple[int, int]:
        dense = fact = 0
        for n in self.candidates or []:
            shape = tuple(self.shapes[n])
            dense += LR.dense_params(shape)
            fact += LR.factorized_params(shape, self.ranks[n], extra_bn=self.cfg.extra_bn and len(shape) == 4) \
                if self.ranks and n in self.ranks else LR.dense_params(shape)
        return dense, fact

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"switched": int(self.ranks is not None), "checks": self.controller.checks,
                               "flagged": len(self.controller.flags), "candidates": len(self.candidates or [])}
        if self.srank_seconds:
            out["srank_seconds_last"] = self.srank_seconds[-1]
            out["srank_seconds_total"] = round(sum(self.srank_seconds), 6)
        for n, h in self.controller.history.items():
            out[f"srank/{n}"] = round(h[-1], 4)
        if self.ranks is not None:
            out["switch_epoch"] = self.switch_epoch
            dense, fact = self._param_counts()
            out["factorized_layer_params"] = fact
            out["dense_layer_params"] = dense
            for n, r in self.ranks.items():
                out[f"rank/{n}"] = r
        if self.dense_stack_layers:
            out["profile_dense_layers"] = len(self.dense_stack_layers)
        out.update({f"eval_{k}": round(v, 6) for k, v in self.evals.items()})
        if self.flops:
            out.update(self.flops)
            out["flops_reduction"] = round(self.flops["dense_flops"] / max(self.flops["lowrank_flops"], 1.0), 4)
        if self.ranks is not None and out.get("factorized_layer_params"):
            out["param_reduction_layers"] = round(out["dense_layer_params"] / out["factorized_layer_params"], 4)
        return out

    def flops_reduction(self, model: nn.Module, example_input: Any) -> dict[str, float]:
        """Forward FLOPs of the dense and of the factorized plain ``model`` (registered architecture)."""
        import copy

        from dist_sparse.metrics.flops import layer_forward_flops

        dense = layer_forward_flops(model, example_input).total
        low = layer_forward_flops(LR.factorize_model(copy.deepcopy(model), self.ranks or {}, init=False),
                                  example_input).total
        return {"dense_flops": dense, "lowrank_flops": low, "flops_reduction": dense / max(low, 1.0)}

    def plot(self, run_dir: str) -> list[str]:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return []
        import os

        paths = []
        fig, ax = plt.subplots(figsize=(7, 4))
        colors = plt.get_cmap("tab20").colors  # one colour per layer (the default cycle repeats after 10)
        styles = ("-", "--", ":", "-.")
        for i, (n, h) in enumerate(self.controller.history.items()):
            ax.plot(range(len(h)), h, label=n, lw=1, color=colors[i % len(colors)],
                    ls=styles[(i // len(colors)) % len(styles)])
        if self.switch_epoch is not None:
            ax.axvline(self.switch_epoch, color="k", ls="--", label="switch")
        ax.set_xlabel("full-rank epochs trained")
        ax.set_ylabel("stable rank")
        ax.legend(fontsize=5, ncol=2)
        ax.set_title(f"switch after {self.switch_epoch} full-rank epochs" if self.switch_epoch is not None
                     else "no switch (yet)", fontsize=8)
        p = os.path.join(run_dir, "cuttlefish_stable_ranks.png")
        fig.savefig(p, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(p)
        if self.ranks:
            fig, ax = plt.subplots(figsize=(7, 4))
            names = list(self.candidates or [])
            x = np.arange(len(names))
            ax.bar(x - 0.2, [self.full_ranks[n] for n in names], 0.4, label="full rank")
            ax.bar(x + 0.2, [self.ranks.get(n, self.full_ranks[n]) for n in names], 0.4, label="chosen rank")
            ax.set_xticks(x, names, rotation=90, fontsize=5)
            ax.legend()
            p = os.path.join(run_dir, "cuttlefish_ranks.png")
            fig.savefig(p, dpi=120, bbox_inches="tight")
            plt.close(fig)
            paths.append(p)
        return paths

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        s = super().state_dict()
        s.update({"controller": self.controller.state_dict(), "candidates": self.candidates,
                  "full_ranks": dict(self.full_ranks), "shapes": {k: list(v) for k, v in self.shapes.items()},
                  "dense_stack_layers": list(self.dense_stack_layers),
                  "profile_times": [list(t) for t in self.profile_times],
                  "ranks": None if self.ranks is None else dict(self.ranks), "switch_epoch": self.switch_epoch,
                  "evals": dict(self.evals), "flops": dict(self.flops),
                  "eval_after": self._eval_after})
        return s

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.controller.load_state_dict(state["controller"])
        self.candidates = None if state["candidates"] is None else [str(n) for n in state["candidates"]]
        self.full_ranks = {str(k): int(v) for k, v in state["full_ranks"].items()}
        self.shapes = {str(k): [int(x) for x in v] for k, v in state["shapes"].items()}
        self.dense_stack_layers = [str(n) for n in state.get("dense_stack_layers", [])]
        self.profile_times = [[float(x) for x in t] for t in state.get("profile_times", [])]
        self.ranks = None if state["ranks"] is None else {str(k): int(v) for k, v in state["ranks"].items()}
        self.switch_epoch = None if state["switch_epoch"] is None else int(state["switch_epoch"])
        self.evals = {str(k): float(v) for k, v in state.get("evals", {}).items()}
        self.flops = {str(k): float(v) for k, v in state.get("flops", {}).items()}
        self._eval_after = bool(state.get("eval_after", False))
