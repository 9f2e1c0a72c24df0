"""RigL (Evci et al., ICML 2020) and its baselines SET, Static and GMP, as :class:`Method` controllers.

All four keep a binary mask per sparse weight (the weight itself holds zeros where the mask is 0, so
``param.grad`` is the *dense* gradient) and share the machinery of :mod:`dist_sparse.surgery.masking`:

* ``static`` - a fixed random mask (uniform or ERK) drawn at the start.
* ``set``    - every ``delta_t`` steps drop the smallest-|W| active weights and grow as many random
  positions (Mocanu et al. 2018).
* ``rigl``   - as SET, but grow where the dense gradient |dL/dW| is largest.
* ``gmp``    - gradual magnitude pruning from dense (Zhu & Gupta 2017, cubic schedule).

Hook order per optimizer step (see :mod:`dist_sparse.methods.base`): ``after_backward`` sees the
complete, rank-averaged gradient: on RigL update steps it reads the dense gradient, updates the masks
and (``skip_sgd_on_update``, the paper's Algorithm 1) drops every gradient so that ``optimizer.step()``
leaves weights and optimizer state untouched; otherwise it masks the gradient. ``after_step``
re-applies the masks so masked weights are exactly zero.

Distributed: every statistic goes through :mod:`dist_sparse.distributed`. On update steps each layer's
weight and averaged gradient are gathered in full (one layer at a time), the drop/grow top-k runs on
the full layer with the flat-index tie-break, and only the local piece of the new mask is applied to
the (possibly sharded) weight and optimizer state. Masks are checked to be bit-identical on every rank
after each update.

Backends: the masks are kept in force by the shared masking layer (:mod:`dist_sparse.methods.masked`),
whose element-wise edits are :mod:`dist_sparse.distributed` verbs: under DeepSpeed ZeRO they reach the
gradient partitions, the fp32 master weights and the per-element optimizer state. The DeepSpeed engine
always steps, so ``skip_sgd_on_update`` must be false there (bind raises a ConfigError).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .. import distributed as D
from ..errors import ConfigError, check_range
from ..surgery import masking as M
from .base import RunContext, register_method
from .masked import MaskedMethod, SparseConfig

__all__ = ["SparseConfig", "StaticConfig", "DynamicConfig", "RigLConfig", "SETConfig", "GMPConfig",
           "DropSchedule", "GMPSchedule", "Static", "RigL", "SET", "GMP"]


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------


@dataclass
class StaticConfig(SparseConfig):
    """Static sparse training: a fixed random mask."""

    name: str = "static"  # method name


@dataclass
class DynamicConfig(SparseConfig):
    """Drop/grow schedule shared by RigL and SET."""

    delta_t: int = 100  # optimizer steps between mask updates (Delta T)
    t_end: float = 0.75  # last update before this step: fraction of training (<= 1) or absolute steps (> 1)
    alpha: float = 0.3  # initial drop fraction
    anneal: Literal["cosine", "constant", "exponential"] = "cosine"  # drop-fraction decay over [begin_step, T_end]
    anneal_power: float = 3.0  # exponent of the 'exponential' decay: alpha * (1 - progress) ** p
    begin_step: int = 0  # first update step and origin of the decay
    update_at_step0: bool = True  # also update at begin_step (paper; false = rigl-torch: first at begin + delta_t)
    skip_sgd_on_update: bool = True  # an update step only changes masks, no SGD step (paper Algorithm 1)
    drop_noise_std: float = 0.0  # std of seeded noise added to |W| before dropping (reference parity: 1e-5)
    growth_grad_window: int = 1  # RigL: grow by the mean dense gradient of the last n steps (1 = paper)

    def validate(self) -> None:
        super().validate()
        check_range("method.delta_t", self.delta_t, self.delta_t >= 1, "an integer >= 1")
        check_range("method.t_end", self.t_end, self.t_end > 0,
                    "a fraction of training in (0, 1] or a step count > 1")
        check_range("method.alpha", self.alpha, 0.0 < self.alpha < 1.0, "a number in (0, 1)")
        check_range("method.anneal_power", self.anneal_power, self.anneal_power > 0, "a number > 0")
        check_range("method.begin_step", self.begin_step, self.begin_step >= 0, "an integer >= 0")
        check_range("method.drop_noise_std", self.drop_noise_std, self.drop_noise_std >= 0, "a number >= 0")
        check_range("method.growth_grad_window", self.growth_grad_window,
                    self.growth_grad_window == 1 or 1 < self.growth_grad_window < self.delta_t,
                    f"an integer >= 1 and < method.delta_t ({self.delta_t})")


@dataclass
class RigLConfig(DynamicConfig):
    """RigL: grow by the dense gradient."""

    name: str = "rigl"  # method name


@dataclass
class SETConfig(DynamicConfig):
    """SET: grow random positions."""

    name: str = "set"  # method name


@dataclass
class GMPConfig(SparseConfig):
    """Gradual magnitude pruning from dense with the cubic schedule of Zhu & Gupta (2017)."""

    name: str = "gmp"  # method name
    distribution: Literal["uniform", "erk"] = "uniform"  # per-layer final sparsities (uniform: first layer dense)
    t_start: float = 0.3125  # first pruning step: fraction of training (< 1) or absolute step (>= 1); 10k of 32k
    t_end: float = 0.78  # last pruning step, where every layer reaches its final sparsity; 25k of 32k
    delta_t: int = 100  # optimizer steps between pruning steps
    s_init: float = 0.0  # sparsity at t_start

    def validate(self) -> None:
        super().validate()
        check_range("method.t_start", self.t_start, self.t_start >= 0, "a fraction (< 1) or a step >= 0")
        check_range("method.t_end", self.t_end, self.t_end > 0, "a fraction (<= 1) or a step count > 1")
        check_range("method.delta_t", self.delta_t, self.delta_t >= 1, "an integer >= 1")
        check_range("method.s_init", self.s_init, 0.0 <= self.s_init <= self.sparsity,
                    f"a number in [0, method.sparsity = {self.sparsity}]")


# ------------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------------


def _steps(value: float, total: int, fraction_if_at_most: float) -> int:
    """A fraction of ``total`` (value <= fraction_if_at_most) or an absolute step count."""
    return int(math.floor(value * total)) if value <= fraction_if_at_most else int(value)


@dataclass
class DropSchedule:
    """When RigL/SET update masks and which fraction they drop.

    Updates happen at ``t = begin + j * delta_t`` (j >= 0, or j >= 1 without ``update_at_step0``)
    while ``t < t_end``. The cosine drop fraction is ``alpha / 2 * (1 + cos(pi * (t - begin) /
    (t_end - begin)))``.
    """

    alpha: float  # initial drop fraction
    delta_t: int  # steps between updates
    t_end: int  # absolute step; no update at or after it
    begin: int = 0  # first update step / decay origin
    update_at_step0: bool = True  # update at ``begin`` too
    anneal: str = "cosine"  # cosine | constant | exponential
    anneal_power: float = 3.0  # exponent of the exponential decay

    def is_update(self, t: int) -> bool:
        """True when step ``t`` is a mask-update step."""
        if t < self.begin or t >= self.t_end or (t - self.begin) % self.delta_t:
            return False
        return t > self.begin or self.update_at_step0

    def fraction(self, t: int) -> float:
        """Drop fraction f(t) (0 outside [begin, t_end])."""
        if t < self.begin or t > self.t_end or self.t_end <= self.begin:
            return 0.0
        progress = (t - self.begin) / (self.t_end - self.begin)
        if self.anneal == "cosine":
            return self.alpha / 2.0 * (1.0 + math.cos(math.pi * progress))
        if self.anneal == "constant":
            return self.alpha
        if self.anneal == "exponential":
            return self.alpha * (1.0 - progress) ** self.anneal_power
        raise ValueError(f"unknown anneal {self.anneal!r}")


@dataclass
class GMPSchedule:
    """Zhu & Gupta cubic sparsity ramp: s(t) = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3."""

    t0: int  # first pruning step
    t1: int  # last pruning step (final sparsity reached)
    delta_t: int  # steps between pruning steps

    def is_update(self, t: int) -> bool:
        """Pruning steps: t0, t0 + delta_t, ... up to t1, and t1 itself."""
        return self.t0 <= t <= self.t1 and ((t - self.t0) % self.delta_t == 0 or t == self.t1)

    def sparsity(self, t: int, s_init: float, s_final: float) -> float:
        """Target sparsity at step t (s_init before t0, s_final after t1)."""
        if t < self.t0:
            return s_init
        if t >= self.t1:
            return s_final
        progress = (t - self.t0) / (self.t1 - self.t0)
        return s_final + (s_init - s_final) * (1.0 - progress) ** 3


# ------------------------------------------------------------------------------------------------
# Static sparse training
# ------------------------------------------------------------------------------------------------

@register_method
class Static(MaskedMethod):
    """Static sparse training: a random mask (uniform or ERK) fixed for the whole run."""

    name = "static"
    Config = StaticConfig


# ------------------------------------------------------------------------------------------------
# Dynamic sparse training: SET and RigL
# ------------------------------------------------------------------------------------------------


class _DynamicMethod(MaskedMethod):
    """Drop by magnitude, grow by :meth:`_grow_score`, every ``delta_t`` steps until ``t_end``."""

    Config = DynamicConfig
    needs_grad = True  # whether growth reads the dense gradient

    def __init__(self, cfg: DynamicConfig, *, seed: int = 0):
        super().__init__(cfg, seed=seed)
        self.schedule: DropSchedule | None = None  # built in setup (needs the run length)
        self._grad_sum: dict[str, torch.Tensor] = {}  # growth_grad_window: running sums of dense grads
        self._grad_count = 0
        self._pending: dict[str, torch.Tensor] = {}  # skip_sgd_on_update=false: grow scores until after_step
        self._loaded_t_end: int | None = None  # T_end of a loaded checkpoint (checked against the run's)

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        c = self.cfg
        self.schedule = DropSchedule(alpha=c.alpha, delta_t=c.delta_t, t_end=_steps(c.t_end, ctx.total_steps, 1.0),
                                     begin=c.begin_step, update_at_step0=c.update_at_step0, anneal=c.anneal,
                                     anneal_power=c.anneal_power)
        self._check_t_end()

    def _check_t_end(self) -> None:
        if self.schedule is not None and self._loaded_t_end is not None and self._loaded_t_end != self.schedule.t_end:
            raise ConfigError("method.t_end", self.cfg.t_end,
                              f"the schedule the checkpoint was trained with (its T_end is step {self._loaded_t_end}, "
                              f"this run computes {self.schedule.t_end}): give the same method.t_end, run.epochs "
                              f"and run.max_steps as the run that wrote it")

    def bind(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if getattr(self.cfg, "skip_sgd_on_update", False) and D.optimizer_is_deepspeed(optimizer):
            # The DeepSpeed engine always steps (momentum and weight decay still move the weights),
            # so "an update step has no SGD step" cannot be had exactly.
            raise ConfigError("method.skip_sgd_on_update", True,
                              "false under DeepSpeed ZeRO (the engine cannot skip an optimizer step); "
                              "add method.skip_sgd_on_update=false, or launch with ddp/fsdp")
        super().bind(model, optimizer)

    def _sched(self) -> DropSchedule:
        if self.schedule is None:
            raise RuntimeError(f"method {self.name!r}: setup(ctx) must be called before training starts")
        return self.schedule

    # -- grow scores ---------------------------------------------------------------------------------
    def _grow_score(self, name: str, param: torch.Tensor, step: int, dense_grad: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _in_window(self, step: int) -> bool:
        n = self.cfg.growth_grad_window
        return self.needs_grad and n > 1 and any(self._sched().is_update(step + j) for j in range(n))

    def _dense_grads(self, model: nn.Module, step: int) -> dict[str, torch.Tensor | None]:
        """Full, rank-averaged dense gradient per sparse weight (window-averaged if configured)."""
        params = self._params(model)
        out: dict[str, torch.Tensor | None] = {}
        for n in self.names:
            g = D.full_grad(params[n])
            if self._in_window(step):
                acc = self._grad_sum.get(n)
                gf = torch.zeros(self.shapes[n], dtype=torch.float32, device=self.masks[n].device) if g is None \
                    else g.detach().float()
                self._grad_sum[n] = gf.clone() if acc is None else acc.add_(gf)
                if self.schedule.is_update(step):
                    g = self._grad_sum[n] / (self._grad_count + 1)
            out[n] = g
        if self._in_window(step):
            self._grad_count += 1
        if self.schedule.is_update(step):
            self._grad_sum.clear()
            self._grad_count = 0
        return out

    # -- hooks ---------------------------------------------------------------------------------------
    def after_backward(self, model: nn.Module, step: int) -> None:
        """Read dense gradients; on update steps change masks (and skip the SGD step); mask gradients."""
        update = self._sched().is_update(step)
        grads: dict[str, torch.Tensor | None] = {}
        if self.needs_grad and (update or self._in_window(step)):
            grads = self._dense_grads(model, step)
        if update and self.cfg.skip_sgd_on_update:
            self._update(model, step, grads)
            # Paper Algorithm 1: the update replaces the SGD step. Without gradients, torch optimizers
            # skip every parameter (no momentum, no weight decay, no Adam step count).
            for p in model.parameters():
                p.grad = None
            return
        if update:  # the step happens first; keep only the grow scores until after_step
            self._pending = {n: self._grow_score(n, self._params(model)[n], step, grads.get(n))
                             for n in self.names}
        self.mask_grads(model)

    def after_step(self, model: nn.Module, step: int) -> None:
        if self._pending:
            scores, self._pending = self._pending, {}
            self._update(model, step, {}, scores)
        self.apply_masks(model)

    def _update(self, model: nn.Module, step: int, grads: dict[str, torch.Tensor | None],
                scores: dict[str, torch.Tensor] | None = None) -> None:
        """One drop/grow round over every sparse layer, in model order (collective under sharding)."""
        params = self._params(model)
        frac = self._sched().fraction(step)
        dropped = regrown = zero_score = 0
        per_layer: dict[str, int] = {}
        for n in self.names:
            p = params[n]
            mask = self.masks[n]
            if self.active[n] == mask.numel():  # a dense layer (first layer, override): nothing to swap
                per_layer[n] = 0
                continue
            with D.gather_full(p) as w:
                drop_score = w.detach().abs().float().to(mask.device)
            if self.cfg.drop_noise_std > 0:
                gen = M.make_generator(self.seed, "drop-noise", n, step)
                noise = torch.randn(self.shapes[n], generator=gen, dtype=torch.float32) * self.cfg.drop_noise_std
                drop_score = drop_score + noise.to(mask.device)
            grow = scores[n] if scores is not None else self._grow_score(n, p, step, grads.get(n))
            k = int(math.floor(frac * self.active[n]))
            res = M.drop_grow(mask, drop_score, grow.to(mask.device), k)
            a_new = int(res.mask.sum())
            if a_new != self.active[n] or bool((res.grown & res.kept).any()) or bool((res.kept & ~mask).any()):
                raise RuntimeError(f"{self.name} update of {n} at step {step} broke the parameter count: "
                                   f"{self.active[n]} -> {a_new} active")
            self._change_mask(model, n, res.mask)
            dropped += k
            regrown += res.n_regrown
            zero_score += res.n_zero_score
            per_layer[n] = k
        self.updates_done += 1
        self.last = {"step": step, "drop_fraction": frac, "dropped": dropped, "grown": dropped,
                     "regrown": regrown, "zero_score_grows": zero_score,
                     **{f"dropped/{n}": k for n, k in per_layer.items()}}
        self._check_same_masks(f"{self.name} masks after the update at step {step}")

    # -- checkpointing -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        t_end = self.schedule.t_end if self.schedule is not None else self._loaded_t_end
        state["schedule"] = {"t_end": t_end, "begin": self.cfg.begin_step}
        state["grad_sum"] = {n: g.detach().cpu() for n, g in self._grad_sum.items()}
        state["grad_count"] = self._grad_count
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        t_end = state.get("schedule", {}).get("t_end")
        self._loaded_t_end = None if t_end is None else int(t_end)
        self._check_t_end()
        self._grad_sum = {n: g.to(self.masks[n].device) for n, g in state.get("grad_sum", {}).items()}
        self._grad_count = int(state.get("grad_count", 0))


@register_method
class RigL(_DynamicMethod):
    """RigL: drop the smallest |W|, grow the largest |dense gradient| (Evci et al. 2020)."""

    name = "rigl"
    Config = RigLConfig

    def _grow_score(self, name, param, step, dense_grad):
        if dense_grad is None:  # a layer without gradient this step: every position scores 0
            return torch.zeros(self.shapes[name], dtype=torch.float32, device=self.masks[name].device)
        return dense_grad.detach().abs().float()


@register_method
class SET(_DynamicMethod):
    """SET: drop the smallest |W|, grow uniformly random positions (Mocanu et al. 2018)."""

    name = "set"
    Config = SETConfig
    needs_grad = False

    def _grow_score(self, name, param, step, dense_grad):
        # Stateless RNG keyed by (seed, layer, step): identical on every rank and after a resume.
        gen = M.make_generator(self.seed, "set-grow", name, step)
        return torch.rand(self.shapes[name], generator=gen, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# Gradual magnitude pruning
# ------------------------------------------------------------------------------------------------


@register_method
class GMP(MaskedMethod):
    """Gradual magnitude pruning from dense; per-layer cubic ramp to the distribution's final sparsity."""

    name = "gmp"
    Config = GMPConfig

    def __init__(self, cfg: GMPConfig, *, seed: int = 0):
        super().__init__(cfg, seed=seed)
        self.schedule: GMPSchedule | None = None  # built in setup (needs the run length)

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        c, total = self.cfg, ctx.total_steps
        t0 = _steps(c.t_start, total, 0.999999)
        t1 = min(_steps(c.t_end, total, 1.0), max(total - 1, 0))
        if t1 < t0:
            raise ConfigError("method.t_end", c.t_end,
                              f"a pruning end at or after method.t_start (step {t0}; training has {total} steps)")
        self.schedule = GMPSchedule(t0=t0, t1=t1, delta_t=c.delta_t)

    def _start_density(self, name: str, target: dict[str, float]) -> float:
        return 1.0 - min(self.cfg.s_init, 1.0 - target[name])

    def layer_sparsity(self, name: str, t: int) -> float:
        """Target sparsity of layer ``name`` at step ``t`` (cubic ramp to its final sparsity)."""
        s_final = 1.0 - self.target_density[name]
        return self.schedule.sparsity(t, min(self.cfg.s_init, s_final), s_final)

    def after_step(self, model: nn.Module, step: int) -> None:
        if self.schedule is None:
            raise RuntimeError("method 'gmp': setup(ctx) must be called before training starts")
        if self.schedule.is_update(step):
            self._prune(model, step)
        self.apply_masks(model)

    def _prune(self, model: nn.Module, step: int) -> None:
        params = self._params(model)
        pruned = 0
        for n in self.names:
            p = params[n]
            keep = M.active_count(math.prod(self.shapes[n]), 1.0 - self.layer_sparsity(n, step))
            if keep >= self.active[n]:
                continue  # pruned weights stay pruned; nothing to do for this layer
            with D.gather_full(p) as w:
                mag = w.detach().abs().float().to(self.masks[n].device)
            new = M.magnitude_prune(self.masks[n], mag, keep)
            pruned += self.active[n] - keep
            self._change_mask(model, n, new)
        self.updates_done += 1
        self.last = {"step": step, "pruned": pruned, "target_sparsity": self.report()["sparsity/global"]}
        self._check_same_masks(f"gmp masks after pruning at step {step}")
