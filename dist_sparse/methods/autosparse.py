"""AutoSparse (Kundu et al., "AutoSparse: Towards Automated Sparse Training of Deep Neural Networks",
ICLR 2023 SNN workshop, arXiv 2304.06941) and STR (Kusupati et al. 2020, its ``alpha = 0`` case).

Every selected Conv/Linear layer learns one soft threshold ``T = sigmoid(s)``; its forward uses
``W^ = sign(W) * relu(|W| - T)`` (the surgery and the autograd rule live in
:mod:`dist_sparse.surgery.threshold`). Pruned weights receive ``alpha`` times their loss gradient
(Gradient Annealing, GA), so they can come back; ``alpha`` is one global scalar per epoch:

* a schedule ``alpha(e) = alpha0 * d(e / T_d)`` (cosine, sigmoid, sigmoid-cosine, linear, constant) or
  ``alpha0 * exp(-beta e)`` (exponential), forced to 0 from the cutoff epoch ``E0`` on;
* or AutoTune (AutoSparse-AT, the paper's Appendix A.4): during the first ``T'`` epochs ``alpha`` is
  multiplied by ``1 + eps1`` when the epoch's global mean training loss is above ``(1 + eps0)`` times a
  dense run's loss of the same epoch, by ``1 - eps2`` otherwise; then ``alpha_tuned * SigCos`` over the
  remaining epochs, and 0 from the cutoff.

``s`` is an ordinary parameter trained by the run's optimizer; :meth:`AutoSparse.param_group_overrides`
gives it the run's weight decay, which the "no decay for 1-D parameters" rule would otherwise drop (the
decay on ``s`` raises the thresholds: it is a sparsity driver). Optional backward sparsity keeps the
weight gradient only on ``B = A | TopK(|W|, ceil(b n))``.

Hooks: ``bind`` sets this epoch's ``alpha`` on every layer; ``after_step`` turns the counts of the step's
forward (``|A|`` and ``|B|`` per layer, computed inside the forward on the full weight, identical on every
rank) into training FLOPs and raises the alarm for a layer whose density reached 0; at the last step of
every epoch it gathers each layer (``distributed.gather_full``) for exact per-layer statistics (``s``,
``T``, non-zeros, weights revived / pruned since the previous epoch end); ``on_epoch_end`` computes the
next ``alpha`` and checks it is the same on every rank. ``finalize`` gives plain layers holding ``W^``.

FLOPs (the paper's accounting, conv and linear layers only, per sample): dense training ``3 sum f^D``;
``alpha != 0``: ``2 sum f^S + sum f^D``; ``alpha = 0``: ``3 sum f^S``; with backward sparsity
``2 sum f^S + sum f^W`` where ``f^W`` is the layer's FLOPs at its weight-gradient density. ``f^S = rho f^D``
with the density ``rho`` of that step's forward.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
from torch import nn

from .. import distributed as D
from ..errors import ConfigError, check_range
from ..metrics.flops import FlopReport, sparse_forward_flops, training_flops
from ..metrics.layer_stats import clean_name, layer_kind
from ..surgery import masking as M
from ..surgery import threshold as T
from .base import Method, MethodConfig, RunContext, register_method

__all__ = ["AutoSparseConfig", "STRConfig", "AutoSparse", "STR", "SCHEDULES", "alpha_decay", "AlphaSchedule",
           "AutoTune", "step_flops", "FlopRecorder", "read_reference_losses"]

log = logging.getLogger("dist_sparse")

SCHEDULES = ("sigmoid_cosine", "cosine", "sigmoid", "exponential", "linear", "constant")


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------


@dataclass
class AutoSparseConfig(MethodConfig):
    """AutoSparse: learnable per-layer thresholds with Gradient Annealing."""

    name: str = "autosparse"  # method name (autosparse | str)
    include: list = field(default_factory=lambda: ["*"])  # FQN globs of Conv/Linear weights to threshold
    exclude: list = field(default_factory=list)  # FQN globs to leave dense (applied after include)
    first_layer_dense: bool = False  # keep the first selected layer dense (paper/STR: sparse)
    last_layer_dense: bool = False  # keep the last selected layer (classifier) dense (paper/STR: sparse)
    s_init: float = -5.0  # initial threshold parameter s0 of every layer (T0 = sigmoid(s0) = 0.0067)
    alpha0: float = 0.75  # GA scale at epoch 0 (AutoTune: its starting value, paper 0.5)
    schedule: Literal["sigmoid_cosine", "cosine", "sigmoid", "exponential", "linear", "constant"] = \
        "sigmoid_cosine"  # decay of alpha over epochs (paper's vision runs: sigmoid_cosine)
    exp_beta: float = 1.0  # exponential schedule: alpha0 * exp(-exp_beta * epoch)
    decay_horizon: Literal["total", "cutoff"] = "total"  # T_d of x = e / T_d: the run's epochs, or the cutoff epoch
    alpha_cutoff: Optional[float] = 0.9  # alpha = 0 from this epoch: a fraction of the epochs (< 1) or an epoch (>= 1); null: never
    threshold_weight_decay: Optional[float] = None  # weight decay on s (null: the run's optim.weight_decay, as the paper)
    backward_density: Optional[float] = None  # keep the weight gradient on the top b fraction of |W| (null: dense)
    backward_topk_mode: Literal["union", "plain_topk"] = "union"  # B = A | TopK(|W|) (union) or TopK(|W|) alone
    autotune: bool = False  # AutoSparse-AT: tune alpha against a dense run's training loss
    autotune_epochs: int = 9  # T': epochs of multiplicative tuning
    autotune_eps0: float = 0.01  # loss tolerance: the sparse loss may exceed the dense one by this fraction
    autotune_eps1: float = 0.05  # alpha *= 1 + eps1 when the loss is too high (less sparsity)
    autotune_eps2: float = 0.005  # alpha *= 1 - eps2 otherwise (more sparsity)
    autotune_shift: bool = False  # the paper sketch's indexing: the post-tuning decay starts one epoch later
    reference_metrics: str = ""  # AutoTune: metrics.jsonl of a dense run of the same recipe (its epoch train_loss)
    reference_losses: list = field(default_factory=list)  # AutoTune: the dense per-epoch train losses (instead of a file)
    check_same: bool = True  # at every epoch end, verify alpha, thresholds and counts are identical on all ranks

    def validate(self) -> None:
        """Range checks; raises ConfigError naming the key."""
        check_range("method.include", self.include,
                    bool(self.include) and all(isinstance(p, str) and p for p in self.include),
                    "a non-empty list of FQN globs, e.g. ['*'] or ['layer*.conv*.weight']")
        check_range("method.exclude", self.exclude, all(isinstance(p, str) and p for p in self.exclude),
                    "a list of FQN globs")
        check_range("method.s_init", self.s_init, math.isfinite(self.s_init) and -50 <= self.s_init <= 50,
                    "a number in [-50, 50] (T0 = sigmoid(s_init))")
        check_range("method.alpha0", self.alpha0, 0.0 <= self.alpha0 <= 1.0, "a number in [0, 1]")
        check_range("method.exp_beta", self.exp_beta, self.exp_beta >= 0, "a number >= 0")
        check_range("method.alpha_cutoff", self.alpha_cutoff, self.alpha_cutoff is None or self.alpha_cutoff >= 0,
                    "null, a fraction of the epochs in [0, 1) or an epoch index >= 1")
        check_range("method.threshold_weight_decay", self.threshold_weight_decay,
                    self.threshold_weight_decay is None or self.threshold_weight_decay >= 0,
                    "null (the run's weight decay) or a number >= 0")
        check_range("method.backward_density", self.backward_density,
                    self.backward_density is None or 0.0 < self.backward_density <= 1.0, "null or a number in (0, 1]")
        check_range("method.autotune_epochs", self.autotune_epochs, self.autotune_epochs >= 1, "an integer >= 1")
        for key in ("autotune_eps0", "autotune_eps1"):
            check_range(f"method.{key}", getattr(self, key), getattr(self, key) >= 0, "a number >= 0")
        check_range("method.autotune_eps2", self.autotune_eps2, 0 <= self.autotune_eps2 < 1, "a number in [0, 1)")
        check_range("method.reference_losses", self.reference_losses,
                    all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                        for v in self.reference_losses), "a list of positive losses, one per epoch")
        if self.autotune:
            check_range("method.reference_metrics", self.reference_metrics,
                        bool(self.reference_metrics) or bool(self.reference_losses),
                        "the metrics.jsonl of a dense run (or method.reference_losses) when method.autotune is on")
            if self.schedule == "exponential":
                raise ConfigError("method.schedule", self.schedule,
                                  "sigmoid_cosine under AutoTune (the paper's post-tuning decay); or autotune: false")
        if self.alpha_cutoff is not None and self.alpha_cutoff >= 1 and self.alpha_cutoff != int(self.alpha_cutoff):
            raise ConfigError("method.alpha_cutoff", self.alpha_cutoff, "an integer epoch when >= 1, or a fraction < 1")


@dataclass
class STRConfig(AutoSparseConfig):
    """STR: learnable thresholds without Gradient Annealing (pruned weights get no loss gradient)."""

    name: str = "str"  # method name
    alpha0: float = 0.0  # must stay 0: STR is AutoSparse with alpha = 0
    schedule: Literal["sigmoid_cosine", "cosine", "sigmoid", "exponential", "linear", "constant"] = \
        "constant"  # irrelevant with alpha0 = 0
    alpha_cutoff: Optional[float] = None  # irrelevant with alpha0 = 0

    def validate(self) -> None:
        super().validate()
        check_range("method.alpha0", self.alpha0, self.alpha0 == 0.0,
                    "0 for STR (use method.name=autosparse for Gradient Annealing)")
        check_range("method.autotune", self.autotune, not self.autotune,
                    "false for STR (AutoTune tunes alpha: use method.name=autosparse)")


# ------------------------------------------------------------------------------------------------
# alpha schedules
# ------------------------------------------------------------------------------------------------


def alpha_decay(kind: str, epoch: float, horizon: float, beta: float = 1.0) -> float:
    """The multiplier ``d`` of ``alpha0`` at ``epoch`` (paper eqs. 2-4 and 9).

    With ``x = clamp(epoch / horizon, 0, 1)``: cosine ``(1 + cos(pi x)) / 2``; sigmoid ``sigmoid(6 - 12 x)``
    (the decaying reading of eq. 3); sigmoid_cosine the larger of the two; linear ``1 - x``; constant 1;
    exponential ``exp(-beta * epoch)`` (not normalised by the horizon).

    Args:
        kind: one of :data:`SCHEDULES`.
        epoch: 0-based epoch index.
        horizon: ``T_d`` in epochs (> 0).
        beta: rate of the exponential decay.

    Returns:
        the multiplier, in [0, 1].
    """
    x = min(1.0, max(0.0, epoch / horizon)) if horizon > 0 else 1.0
    cos = 0.5 * (1.0 + math.cos(math.pi * x))
    sig = 1.0 / (1.0 + math.exp(-(6.0 - 12.0 * x)))
    if kind == "cosine":
        return cos
    if kind == "sigmoid":
        return sig
    if kind == "sigmoid_cosine":
        return max(sig, cos)
    if kind == "linear":
        return 1.0 - x
    if kind == "constant":
        return 1.0
    if kind == "exponential":
        return math.exp(-beta * max(0.0, epoch))
    raise ValueError(f"unknown alpha schedule {kind!r}; expected one of {SCHEDULES}")


def _clamp01(x: float) -> float:
    return min(1.0, max(0.0, float(x)))


@dataclass
class AlphaSchedule:
    """``alpha(e) = alpha0 * d(e)`` for ``e < cutoff``, 0 from ``cutoff`` on: a pure function of the epoch."""

    alpha0: float  # alpha at epoch 0 (times d(0))
    kind: str = "sigmoid_cosine"  # one of SCHEDULES
    horizon: int = 100  # T_d in epochs
    cutoff: Optional[int] = None  # first epoch with alpha = 0 (None: never)
    beta: float = 1.0  # exponential rate

    def __call__(self, epoch: int) -> float:
        if self.cutoff is not None and epoch >= self.cutoff:
            return 0.0
        return _clamp01(self.alpha0 * alpha_decay(self.kind, epoch, self.horizon, self.beta))


@dataclass
class AutoTune:
    """AutoSparse-AT (Algorithm 1 of the paper's Appendix A.4), as pure functions of its inputs.

    ``alpha(0) = alpha0``; after tuning epoch ``t < epochs`` with global mean training loss ``L`` and
    dense reference ``R``: ``alpha *= 1 + eps1`` if ``L > (1 + eps0) R`` else ``alpha *= 1 - eps2``. The
    value reached after the last tuning epoch is ``alpha_tuned``, used as it is in epoch ``epochs``; from
    there ``alpha(e) = alpha_tuned * SigCos((e - epochs) / (horizon - epochs))`` (one epoch later with
    ``shift``), and 0 from ``cutoff`` on. Every value is clamped to [0, 1].
    """

    alpha0: float = 0.5
    epochs: int = 9  # T'
    eps0: float = 0.01
    eps1: float = 0.05
    eps2: float = 0.005
    horizon: int = 100  # T (or the cutoff, with decay_horizon: cutoff)
    cutoff: Optional[int] = 90
    shift: bool = False

    def tune(self, alpha: float, loss: float, reference: float) -> tuple[float, str]:
        """One tuning update: (new alpha, "increase" | "decrease")."""
        if loss > (1.0 + self.eps0) * reference:
            return _clamp01((1.0 + self.eps1) * alpha), "increase"
        return _clamp01((1.0 - self.eps2) * alpha), "decrease"

    def after_tuning(self, epoch: int, alpha_tuned: float) -> float:
        """alpha of an epoch ``>= epochs`` (the cutoff included)."""
        if self.cutoff is not None and epoch >= self.cutoff:
            return 0.0
        start = self.epochs + (1 if self.shift else 0)
        span = max(1, self.horizon - self.epochs)
        return _clamp01(alpha_tuned * alpha_decay("sigmoid_cosine", epoch - start, span))


def read_reference_losses(path: str) -> list[float]:
    """Per-epoch ``train_loss`` of a run's ``metrics.jsonl`` (the last record of each epoch wins).

    Returns:
        the losses of epochs 0, 1, ... up to the first missing epoch.
    """
    by_epoch: dict[int, float] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            ev = json.loads(line)
            if ev.get("event") == "epoch" and "train_loss" in ev and "epoch" in ev:
                by_epoch[int(ev["epoch"])] = float(ev["train_loss"])
    out = []
    while len(out) in by_epoch:
        out.append(by_epoch[len(out)])
    return out


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------


def step_flops(report: FlopReport, forward: dict[str, float], weight_grad: dict[str, float] | None,
               alpha: float) -> float:
    """Training FLOPs of one step per the paper's accounting (``report`` holds conv/linear layers only).

    Args:
        report: per-layer dense forward FLOPs ``f^D`` (``other`` = 0).
        forward: layer -> forward density ``rho`` (missing layers are dense).
        weight_grad: layer -> density of the weight gradient (backward sparsity); None = dense weight
            gradient while ``alpha != 0`` and ``rho`` once ``alpha = 0``.
        alpha: the GA scale of the step.

    Returns:
        ``2 sum f^S + sum f^W`` (``f^W = f^D`` or ``f^S`` without backward sparsity).
    """
    if weight_grad is None:
        mode = "sparse" if alpha == 0 else "sparse_fwd_dense_bwd"
        return training_flops(report, forward, mode, strict=False)
    return 2.0 * sparse_forward_flops(report, forward, strict=False) + \
        sparse_forward_flops(report, weight_grad, strict=False)


class FlopRecorder:
    """Dense forward FLOPs of every Conv/Linear layer, recorded from the first forward of a model.

    Works on any backend (hooks on the modules; the layers see full weights and the real batch shapes),
    with the convention of :mod:`dist_sparse.metrics.flops` (a multiply-add = 2 FLOPs: a conv is
    ``2 * out.numel() * C_in/groups * prod(kernel)``, a linear ``2 * out.numel() * in_features``). Only
    calls made inside the root module's forward count (not an activation-checkpoint recomputation).
    """

    def __init__(self, model: nn.Module):
        self.flops: dict[str, float] = {}
        self.kinds: dict[str, str] = {}
        self.samples = 0
        self._inside = 0
        self._handles = [model.register_forward_pre_hook(self._enter, with_kwargs=True),
                         model.register_forward_hook(self._leave)]
        seen: set[int] = set()
        for name, module in model.named_modules():
            kind = layer_kind(module)
            if kind not in ("conv", "linear") or id(module) in seen:
                continue
            seen.add(id(module))
            clean = clean_name(name)
            self.flops.setdefault(clean, 0.0)
            self.kinds[clean] = kind
            self._handles.append(module.register_forward_hook(self._layer(clean)))

    def _enter(self, module, args, kwargs) -> None:
        self._inside += 1
        if self._inside == 1:  # samples of this batch: dim 0 of the first tensor argument (else 1)
            t = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() > 0), None)
            self.samples += int(t.shape[0]) if t is not None else 1

    def _leave(self, module, args, output) -> None:
        self._inside -= 1

    def _layer(self, name: str):
        def hook(module, args, out) -> None:
            if not self._inside or not isinstance(out, torch.Tensor):
                return
            if isinstance(module, nn.Linear):
                per_out = module.in_features
            else:
                per_out = (module.in_channels // module.groups) * math.prod(module.kernel_size)
            self.flops[name] += 2.0 * out.numel() * per_out
        return hook

    def report(self) -> FlopReport | None:
        """Per-sample forward FLOPs of the recorded pass(es), or None before any forward."""
        if not self.samples:
            return None
        per = {n: f / self.samples for n, f in self.flops.items()}
        return FlopReport(per_layer=per, total=float(sum(per.values())), batch_size=1, other=0.0,
                          kinds=dict(self.kinds))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# ------------------------------------------------------------------------------------------------
# The method
# ------------------------------------------------------------------------------------------------


def _full_shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in (t.ds_shape if D.layout(t) == "zero3" else t.shape))


def _epoch_index(value: float, epochs: int) -> int:
    """A fraction of the epochs (< 1) or an absolute epoch (>= 1)."""
    return int(round(value * epochs)) if value < 1 else int(value)


@register_method
class AutoSparse(Method):
    """Learnable per-layer soft thresholds with Gradient Annealing (and optional AutoTune).

    State (all identical on every rank): the epoch in force and its ``alpha``, AutoTune's reference
    losses and decisions, the FLOP report and the accumulated training FLOPs, the forward masks of the
    last epoch end (bit-packed, for the revived / pruned counts) and the per-epoch history for the plots.
    """

    name = "autosparse"
    Config = AutoSparseConfig

    def __init__(self, cfg: AutoSparseConfig, *, seed: int = 0):
        super().__init__(cfg, seed=seed)
        self.epoch = 0  # the epoch in progress (alpha of this epoch is in force)
        self.alpha = self._initial_alpha()
        self.schedule: AlphaSchedule | None = None  # built in setup (needs the run's epochs)
        self.tuner: AutoTune | None = None
        self.reference: list[float] = []  # AutoTune: dense per-epoch losses
        self.alpha_tuned: float | None = None
        self.tuning: list[dict[str, Any]] = []  # AutoTune decisions, one per tuning epoch
        self.names: list[str] = []  # thresholded weights (FQN), model order
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.flop_report: FlopReport | None = None
        self.flops = {"train": 0.0, "dense": 0.0, "steps": 0}  # per-sample FLOPs accumulated over the steps
        self.forward_counts: dict[str, list[int]] = {}  # [|A|, |B|] of the latest step's forward
        self.masks: dict[str, dict] = {}  # packed forward masks at the last epoch-end statistics
        self.last: dict[str, dict[str, float]] = {}  # per-layer statistics at the last epoch end
        self.last_step = -1  # step of those statistics
        self.history: list[dict[str, Any]] = []  # per epoch end: epoch, step, alpha, s and density per layer
        self.collapsed: list[str] = []  # layers whose forward density is 0 (alarm raised)
        self._mods: dict[str, T.ThresholdedLayer] = {}
        self._bound: nn.Module | None = None
        self._recorder: FlopRecorder | None = None
        self._last_seen_step = -1

    # -- schedule ------------------------------------------------------------------------------------
    def _initial_alpha(self) -> float:
        c = self.cfg
        if c.alpha_cutoff is not None and c.alpha_cutoff == 0:
            return 0.0
        if c.autotune:
            return _clamp01(c.alpha0)
        return _clamp01(c.alpha0 * alpha_decay(c.schedule, 0, 1.0, c.exp_beta))

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        c = self.cfg
        epochs = max(1, math.ceil(ctx.total_steps / max(1, ctx.steps_per_epoch)))
        cutoff = None if c.alpha_cutoff is None else _epoch_index(c.alpha_cutoff, epochs)
        horizon = cutoff if (c.decay_horizon == "cutoff" and cutoff) else epochs
        self.schedule = AlphaSchedule(alpha0=c.alpha0, kind=c.schedule, horizon=horizon, cutoff=cutoff,
                                      beta=c.exp_beta)
        if c.autotune:
            if cutoff is not None and cutoff <= c.autotune_epochs:
                raise ConfigError("method.alpha_cutoff", c.alpha_cutoff,
                                  f"an epoch after the {c.autotune_epochs} AutoTune epochs (this run: cutoff epoch "
                                  f"{cutoff} of {epochs})")
            self.tuner = AutoTune(alpha0=c.alpha0, epochs=c.autotune_epochs, eps0=c.autotune_eps0,
                                  eps1=c.autotune_eps1, eps2=c.autotune_eps2, horizon=horizon, cutoff=cutoff,
                                  shift=c.autotune_shift)
            if not self.reference:
                self.reference = self._load_reference()
        self.alpha = self._alpha_for(self.epoch)

    def _load_reference(self) -> list[float]:
        c = self.cfg
        if c.reference_losses:
            ref = [float(v) for v in c.reference_losses]
        else:
            if not os.path.isfile(c.reference_metrics):
                raise ConfigError("method.reference_metrics", c.reference_metrics,
                                  "the path of an existing metrics.jsonl of a dense run")
            ref = read_reference_losses(c.reference_metrics)
        if len(ref) < c.autotune_epochs:
            key = "method.reference_losses" if c.reference_losses else "method.reference_metrics"
            raise ConfigError(key, c.reference_losses or c.reference_metrics,
                              f"dense training losses for at least the {c.autotune_epochs} AutoTune epochs "
                              f"(found {len(ref)})")
        return ref[: c.autotune_epochs]

    def _alpha_for(self, epoch: int) -> float:
        """alpha of ``epoch`` for a fixed schedule, or AutoTune's value (from the state) for that epoch."""
        if self.tuner is None:
            if self.schedule is None:
                return self._initial_alpha() if epoch == 0 else self.alpha
            return self.schedule(epoch)
        if epoch < self.tuner.epochs:
            if self.tuner.cutoff is not None and epoch >= self.tuner.cutoff:
                return 0.0
            return self.tuning[epoch - 1]["alpha_next"] if epoch > 0 else _clamp01(self.tuner.alpha0)
        return self.tuner.after_tuning(epoch, self.alpha_tuned if self.alpha_tuned is not None else self.alpha)

    # -- surgery -------------------------------------------------------------------------------------
    def _select(self, model: nn.Module) -> list[str]:
        c = self.cfg
        names = T.candidate_layers(model, c.include, c.exclude)
        if c.first_layer_dense and names:
            names = names[1:]
        if c.last_layer_dense and names:
            names = names[:-1]
        if not names:
            raise ConfigError("method.include", c.include,
                              "globs that match at least one Conv/Linear weight of the model (minus method.exclude "
                              "and the first/last layer switches)")
        return names

    def prepare(self, model: nn.Module) -> nn.Module:
        """Thresholded layers in place of the selected Conv/Linear layers (``s = s_init``); pure."""
        model = T.apply_thresholds(model, self._select(model), self.cfg.s_init)
        self._configure(model)
        return model

    def _configure(self, model: nn.Module) -> None:
        T.set_alpha(model, self.alpha)
        T.set_backward(model, self.cfg.backward_density, self.cfg.backward_topk_mode)

    def param_group_overrides(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        """``s`` of every layer decays with the run's weight decay (or ``threshold_weight_decay``)."""
        wd = self.cfg.threshold_weight_decay
        if wd is None:
            wd = self.ctx.optimizer.weight_decay if self.ctx is not None else 0.0
        return {n[: -len("weight")] + "s" if n != "weight" else "s": {"weight_decay": float(wd)}
                for n in T.thresholded_modules(model)}

    def bind(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Adopt the layers (names, full shapes), set this epoch's alpha, arm the FLOP recorder."""
        super().bind(model, optimizer)
        mods = T.thresholded_modules(model)
        names = list(mods)
        if self.names and names != self.names:
            raise ValueError(f"{self.name}: the checkpoint's thresholded layers differ from this model's: "
                             f"{sorted(set(names) ^ set(self.names))[:6] or 'order differs'}")
        if not names:
            raise ValueError(f"{self.name}: bind found no thresholded layer (was the model built with prepare?)")
        self.names = names
        self.shapes = {n: _full_shape(m.weight) for n, m in mods.items()}
        self._mods, self._bound = mods, model
        self._configure(model)
        if self._recorder is not None:
            self._recorder.remove()
        self._recorder = FlopRecorder(model) if self.flop_report is None else None

    def _modules(self, model: nn.Module) -> dict[str, T.ThresholdedLayer]:
        if model is not self._bound:
            self._mods, self._bound = T.thresholded_modules(model), model
        return self._mods

    # -- hooks ---------------------------------------------------------------------------------------
    def after_step(self, model: nn.Module, step: int) -> None:
        """Account the step's FLOPs from its forward counts; epoch end: exact per-layer statistics."""
        mods = self._modules(model)
        self._last_seen_step = step
        if self.flop_report is None and self._recorder is not None:
            self.flop_report = self._recorder.report()
            if self.flop_report is not None:
                self._recorder.remove()
                self._recorder = None
        fresh = [(n, m.last_counts) for n, m in mods.items() if m.last_counts is not None]
        if fresh:
            values = torch.stack([c for _, c in fresh]).cpu().tolist()  # one device sync per step
            for (n, _), v in zip(fresh, values):
                self.forward_counts[n] = [int(v[0]), int(v[1])]
            for m in mods.values():
                m.last_counts = None
            self._account(step)
        spe = self.steps_per_epoch
        if (step + 1) % spe == 0 or step + 1 >= self.total_steps:
            self._epoch_statistics(model, step)

    def _densities(self) -> tuple[dict[str, float], dict[str, float] | None]:
        fwd: dict[str, float] = {}
        wgrad: dict[str, float] | None = None if self.cfg.backward_density is None else {}
        for n in self.names:
            numel = math.prod(self.shapes[n])
            nnz, nb = self.forward_counts.get(n, [numel, numel])
            rho = nnz / numel if numel else 1.0
            fwd[n] = rho
            if wgrad is not None:
                b = nb / numel if numel else 1.0
                # plain_topk once alpha = 0: the paper charges max(f^B, f^S)
                wgrad[n] = max(b, rho) if (self.cfg.backward_topk_mode == "union" or self.alpha == 0) else b
        return fwd, wgrad

    def _account(self, step: int) -> None:
        fwd, wgrad = self._densities()
        if self.flop_report is not None:
            self.flops["train"] += step_flops(self.flop_report, fwd, wgrad, self.alpha)
            self.flops["dense"] += training_flops(self.flop_report, None, "dense")
            self.flops["steps"] += 1
        for n in self.names:
            dead = self.forward_counts.get(n, [1])[0] == 0
            if dead and n not in self.collapsed:
                self.collapsed.append(n)
                log.warning("%s ALARM: layer %s has forward density 0 at step %d (alpha %.4g)%s", self.name, n, step,
                            self.alpha, "; with alpha = 0 it cannot recover" if self.alpha == 0 else "")
            elif not dead and n in self.collapsed:
                self.collapsed.remove(n)
                log.info("%s: layer %s is active again at step %d", self.name, n, step)

    def _epoch_statistics(self, model: nn.Module, step: int) -> None:
        """Exact per-layer statistics of the current weights (collective: every rank, same order)."""
        if step == self.last_step:
            return
        mods = self._modules(model)
        s_full = D.batched_full_reduce({n: m.s for n, m in mods.items()},
                                       lambda x: x.detach().to(torch.float64).sum().reshape(1))
        stats: dict[str, dict[str, float]] = {}
        for n, m in mods.items():
            s_val = float(s_full[n].reshape(-1)[0])
            s_t = torch.tensor([s_val], dtype=torch.float64)
            with D.gather_full(m.weight) as w:
                active = T.active_mask(w, s_t)
                thr = T.threshold_of(s_t, w)
                near = int((((w.detach().to(thr.dtype).abs() - thr).abs()) <= 0.1 * thr).sum())
                t_val = float(thr)
            nnz = int(active.sum())
            numel = math.prod(self.shapes[n])
            row = {"s": s_val, "threshold": t_val, "nnz": nnz, "density": nnz / numel if numel else 1.0,
                   "near_threshold": near / numel if numel else 0.0}
            if n in self.masks:
                prev = M.unpack_mask(self.masks[n]).to(active.device).reshape(active.shape)
                row["revived"] = int((active & ~prev).sum())
                row["pruned"] = int((~active & prev).sum())
            else:
                row["revived"], row["pruned"] = 0, numel - nnz
            if self.cfg.backward_density is not None and n in self.forward_counts:
                row["backward_density"] = self.forward_counts[n][1] / numel
            self.masks[n] = M.pack_mask(active)
            stats[n] = row
        self.last, self.last_step = stats, step
        epoch = step // self.steps_per_epoch
        self.history.append({"epoch": epoch, "step": step + 1, "alpha": self.alpha,
                             "s": [stats[n]["s"] for n in self.names],
                             "density": [stats[n]["density"] for n in self.names]})
        if self.cfg.check_same:
            D.assert_same_across_ranks((self.alpha, [(r["s"], r["nnz"]) for r in stats.values()]),
                                       f"{self.name} alpha, thresholds and counts at step {step + 1}")

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, Any] | None = None):
        """Compute alpha of the next epoch (a pure function of the epoch, or AutoTune's update)."""
        nxt = epoch + 1
        if self.tuner is not None and epoch < self.tuner.epochs and len(self.tuning) == epoch:
            if not metrics or "train_loss" not in metrics:
                raise RuntimeError(f"{self.name}: AutoTune needs the epoch's global train_loss in on_epoch_end metrics")
            loss, ref = float(metrics["train_loss"]), self.reference[epoch]
            new, branch = self.tuner.tune(self.alpha, loss, ref)
            self.tuning.append({"epoch": epoch, "loss": loss, "reference": ref, "branch": branch, "alpha_next": new})
            if nxt == self.tuner.epochs:
                self.alpha_tuned = new
        self.epoch = nxt
        self.alpha = self._alpha_for(nxt)
        if self.cfg.check_same:
            D.assert_same_across_ranks(self.alpha, f"{self.name} alpha for epoch {nxt}")
        T.set_alpha(model, self.alpha)
        return None

    def on_train_end(self, model: nn.Module):
        """Final statistics (if the last step was not an epoch end already)."""
        if self._last_seen_step >= 0:
            self._epoch_statistics(model, self._last_seen_step)
        return None

    def finalize(self, model: nn.Module) -> nn.Module:
        """Plain Conv/Linear layers holding ``W^`` (zeros where pruned); ``s`` is dropped."""
        return T.remove_thresholds(model)

    # -- reporting -----------------------------------------------------------------------------------
    def train_flops_fraction(self) -> float:
        """Accumulated training FLOPs / those of dense training for the same steps (NaN before a step)."""
        return self.flops["train"] / self.flops["dense"] if self.flops["dense"] else float("nan")

    def test_flops_fraction(self) -> float:
        """Forward FLOPs at the last epoch-end densities / dense forward FLOPs (conv and linear layers)."""
        if self.flop_report is None or not self.flop_report.total or not self.last:
            return float("nan")
        dens = {n: r["density"] for n, r in self.last.items()}
        return sparse_forward_flops(self.flop_report, dens, strict=False) / self.flop_report.total

    def report(self) -> dict[str, Any]:
        """alpha, global sparsity, FLOP fractions and the per-layer statistics of the last epoch end."""
        total = sum(math.prod(self.shapes[n]) for n in self.names)
        nnz = sum(int(self.last[n]["nnz"]) for n in self.names if n in self.last)
        out: dict[str, Any] = {f"{self.name}/alpha": self.alpha, f"{self.name}/epoch": self.epoch,
                               "sparsity/global": 1.0 - nnz / total if total and self.last else 0.0,
                               "sparsity/active_params": nnz, "sparsity/sparse_params_total": total,
                               "sparsity/collapsed_layers": len(self.collapsed),
                               "flops/train_fraction": self.train_flops_fraction(),
                               "flops/test_fraction": self.test_flops_fraction()}
        if self.tuner is not None:
            out[f"{self.name}/alpha_tuned"] = self.alpha_tuned if self.alpha_tuned is not None else float("nan")
            if self.tuning:
                out[f"{self.name}/autotune_branch"] = self.tuning[-1]["branch"]
                out[f"{self.name}/autotune_reference"] = self.tuning[-1]["reference"]
        for n in self.names:
            for key, value in self.last.get(n, {}).items():
                out[f"{key}/{n}"] = value
        return out

    def plot(self, run_dir: str) -> list[str]:
        """Per-layer sparsity, thresholds and alpha over the epochs (``<method>_{sparsity,thresholds,alpha}.png``)."""
        if not self.history:
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        os.makedirs(run_dir, exist_ok=True)
        xs = [h["epoch"] + 1 for h in self.history]  # epochs completed
        paths = []
        series = {"sparsity": [[1.0 - h["density"][i] for h in self.history] for i in range(len(self.names))],
                  "thresholds": [[1.0 / (1.0 + math.exp(-h["s"][i])) for h in self.history]
                                 for i in range(len(self.names))]}
        for what, ylabel in (("sparsity", "forward sparsity"), ("thresholds", "threshold T = sigmoid(s)")):
            fig, ax = plt.subplots(figsize=(8, 4.5))
            for i, n in enumerate(self.names):
                ax.plot(xs, series[what][i], marker=".", linewidth=1, label=n if len(self.names) <= 12 else None)
            ax.set_xlabel("epochs completed")
            ax.set_ylabel(ylabel)
            if what == "thresholds":
                ax.set_yscale("log")
            ax.set_title(f"{self.name}: {ylabel} per layer")
            if len(self.names) <= 12:
                ax.legend(fontsize=6)
            fig.tight_layout()
            path = os.path.join(run_dir, f"{self.name}_{what}.png")
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(path)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        epochs = [h["epoch"] for h in self.history]
        alphas = [h["alpha"] for h in self.history]
        ax.step(epochs + [epochs[-1] + 1], alphas + alphas[-1:], where="post")  # alpha holds for the whole epoch
        ax.plot(epochs, alphas, ".")
        ax.set_xlabel("epoch")
        ax.set_ylabel("alpha (GA scale)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{self.name}: alpha per epoch")
        fig.tight_layout()
        path = os.path.join(run_dir, f"{self.name}_alpha.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return paths + [path]

    # -- checkpointing -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({"version": 1, "epoch": self.epoch, "alpha": float(self.alpha), "names": list(self.names),
                      "shapes": {n: list(s) for n, s in self.shapes.items()},
                      "reference": list(self.reference), "alpha_tuned": self.alpha_tuned,
                      "tuning": [dict(t) for t in self.tuning],
                      "flop_report": None if self.flop_report is None else self.flop_report.to_dict(),
                      "flops": dict(self.flops), "forward_counts": {n: list(v) for n, v in self.forward_counts.items()},
                      "masks": {n: dict(m) for n, m in self.masks.items()},
                      "last": {n: dict(r) for n, r in self.last.items()}, "last_step": self.last_step,
                      "history": [dict(h) for h in self.history], "collapsed": list(self.collapsed)})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        names = list(state["names"])
        if self.names and names != self.names:
            raise ValueError(f"{self.name}: the checkpoint's thresholded layers differ from this model's")
        self.epoch, self.alpha = int(state["epoch"]), float(state["alpha"])
        self.names = names
        self.shapes = {n: tuple(int(x) for x in s) for n, s in state["shapes"].items()}
        self.reference = [float(v) for v in state.get("reference", [])]
        self.alpha_tuned = None if state.get("alpha_tuned") is None else float(state["alpha_tuned"])
        self.tuning = [dict(t) for t in state.get("tuning", [])]
        fr = state.get("flop_report")
        self.flop_report = None if fr is None else FlopReport.from_dict(fr)
        self.flops = {"train": float(state["flops"]["train"]), "dense": float(state["flops"]["dense"]),
                      "steps": int(state["flops"]["steps"])}
        self.forward_counts = {n: [int(x) for x in v] for n, v in state.get("forward_counts", {}).items()}
        self.masks = {n: dict(m) for n, m in state.get("masks", {}).items()}
        self.last = {n: dict(r) for n, r in state.get("last", {}).items()}
        self.last_step = int(state.get("last_step", -1))
        self.history = [dict(h) for h in state.get("history", [])]
        self.collapsed = list(state.get("collapsed", []))
        if self.schedule is not None and self.tuner is None and self.schedule(self.epoch) != self.alpha:
            log.warning("%s: the checkpoint's alpha %.6g for epoch %d differs from this run's schedule (%.6g): the "
                        "method settings or the run length changed; following this run's schedule", self.name,
                        self.alpha, self.epoch, self.schedule(self.epoch))
            self.alpha = self.schedule(self.epoch)

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave out the live model references and the FLOP recorder's hooks."""
        state = dict(self.__dict__)
        state.update(_mods={}, _bound=None, _recorder=None)
        return state


@register_method
class STR(AutoSparse):
    """STR (Kusupati et al. 2020): AutoSparse with alpha = 0 (no gradient to pruned weights)."""

    name = "str"
    Config = STRConfig
