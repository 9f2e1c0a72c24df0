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

DeepSpeed ZeRO-1/2/3: gradients, fp32 master weights and optimizer state live in the engine's flat
partitions. Each rank masks its own gradient partition every step (:func:`distributed.mul_grad_`, no
communication), and every mask change (bind, update, pruning) also zeroes the master piece and resets the
per-element state (``momentum_buffer``, ``exp_avg``, ...) through :func:`distributed.mul_optimizer_partitions_`.
The engine always steps, so ``skip_sgd_on_update`` must be false there (bind raises a ConfigError).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import torch
from torch import nn

from .. import distributed as D
from ..config import ConfigError, check_range
from ..surgery import masking as M
from .base import Method, MethodConfig, register_method

__all__ = ["SparseConfig", "StaticConfig", "DynamicConfig", "RigLConfig", "SETConfig", "GMPConfig",
           "DropSchedule", "GMPSchedule", "Static", "RigL", "SET", "GMP"]


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------


@dataclass
class SparseConfig(MethodConfig):
    """Settings shared by every mask-based method."""

    name: str = "static"  # method name (static, set, rigl, gmp)
    sparsity: float = 0.9  # global target sparsity S over the sparse weights, in [0, 1)
    distribution: Literal["uniform", "erk"] = "erk"  # per-layer split of S: uniform or Erdos-Renyi-Kernel
    erk_power_scale: float = 1.0  # ERK exponent p (0 = uniform, 1 = paper)
    first_layer_dense: Optional[bool] = None  # keep the first sparse layer dense (null: yes for uniform, no for erk)
    last_layer_dense: bool = False  # keep the last sparse layer (classifier) dense
    include: list = field(default_factory=lambda: ["*"])  # FQN globs of Conv/Linear/attention weights to sparsify
    exclude: list = field(default_factory=list)  # FQN globs to leave dense (applied after include)
    sparse_embeddings: bool = False  # also sparsify nn.Embedding tables (and an output projection tied to them)
    overrides: dict = field(default_factory=dict)  # FQN glob -> sparsity of that layer (outside the ERK budget)
    init: Literal["baseline", "sparse_fanin"] = "baseline"  # weight init: dense init * mask, or rescaled by 1/sqrt(density)
    check_masks: bool = True  # after every mask change, verify masks are bit-identical on all ranks

    def validate(self) -> None:
        """Range checks; raises ConfigError naming the key."""
        check_range("method.sparsity", self.sparsity, 0.0 <= self.sparsity < 1.0, "a number in [0, 1)")
        check_range("method.erk_power_scale", self.erk_power_scale, self.erk_power_scale >= 0, "a number >= 0")
        check_range("method.include", self.include,
                    bool(self.include) and all(isinstance(p, str) and p for p in self.include),
                    "a non-empty list of FQN globs, e.g. ['*'] or ['layer*.conv*.weight']")
        check_range("method.exclude", self.exclude, all(isinstance(p, str) and p for p in self.exclude),
                    "a list of FQN globs")
        for pattern, s in self.overrides.items():
            check_range(f"method.overrides.{pattern}", s,
                        isinstance(s, (int, float)) and not isinstance(s, bool) and 0.0 <= s < 1.0,
                        "a sparsity in [0, 1)")


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
# Shared controller: masks, application, optimizer-state reset, checkpointing
# ------------------------------------------------------------------------------------------------

_WRAPPER_TOKENS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _clean(name: str) -> str:
    for tok in _WRAPPER_TOKENS:
        name = name.replace(tok, "")
    return name


class _MaskedMethod(Method):
    """Mask bookkeeping shared by Static, SET, RigL and GMP (not registered itself)."""

    Config = SparseConfig

    def __init__(self, cfg: SparseConfig, *, total_steps: int, steps_per_epoch: int, seed: int = 0):
        super().__init__(cfg, total_steps=total_steps, steps_per_epoch=steps_per_epoch, seed=seed)
        self.names: list[str] = []  # sparse weights in model order (the order of every collective)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.target_density: dict[str, float] = {}  # resolved per-layer densities (final, for GMP)
        self.active: dict[str, int] = {}  # current exact count of ones per layer
        self.masks: dict[str, torch.Tensor] = {}  # full bool masks (one per sparse weight)
        self.updates_done = 0
        self.last: dict[str, Any] = {}  # statistics of the last mask change
        self._local: dict[str, torch.Tensor] = {}  # cached local piece of each mask, in the weight dtype
        self._param_cache: tuple[int, dict[str, torch.Tensor]] | None = None
        self._loaded = False
        self._deepspeed = False  # bound to a DeepSpeed ZeRO optimizer (grads/master/state in partitions)

    # -- densities and masks ---------------------------------------------------------------------
    def _resolve_densities(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
        c = self.cfg
        return M.layer_densities(shapes, c.sparsity, c.distribution, c.first_layer_dense, c.last_layer_dense,
                                 c.overrides, c.erk_power_scale)

    def _start_density(self, name: str) -> float:
        return self.target_density[name]

    def prepare(self, model: nn.Module) -> nn.Module:
        """Choose the sparse weights, resolve densities, draw masks, zero the masked weights."""
        c = self.cfg
        targets = M.sparsifiable_parameters(model, c.include, c.exclude, c.sparse_embeddings)
        if not targets:
            raise ConfigError("method.include", c.include,
                              "globs that match at least one Conv/Linear weight of the model (minus method.exclude)")
        shapes = {n: tuple(p.shape) for n, p in targets}
        if self._loaded:  # resumed before prepare: keep the checkpoint's masks and densities
            if shapes != self.shapes:
                raise RuntimeError("RigL checkpoint does not match the model's sparse weights: "
                                   f"{sorted(set(shapes) ^ set(self.shapes)) or 'shapes differ'}")
        else:
            self.names, self.shapes = list(shapes), shapes
            self.target_density = self._resolve_densities(shapes)
            for n in self.names:
                numel = math.prod(shapes[n])
                a = M.active_count(numel, self._start_density(n))
                self.active[n] = a
                self.masks[n] = M.random_mask(shapes[n], a, M.make_generator(self.seed, "mask-init", n))
        params = dict(targets)
        with torch.no_grad():
            for n in self.names:
                p = params[n]
                self.masks[n] = self.masks[n].to(p.device)
                if c.init == "sparse_fanin" and not self._loaded:
                    p.mul_(1.0 / math.sqrt(max(self.active[n] / p.numel(), 1e-12)))
                p.mul_(self.masks[n].to(p.dtype))
        self._local.clear()
        self._param_cache = None
        return model

    def bind(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Remember the optimizer; map masks onto the (possibly sharded) parameters and apply them.

        Under DeepSpeed ZeRO the masks also go into the fp32 master partitions and the per-element
        optimizer state, so the engine's next step cannot bring masked weights back.
        """
        self._deepspeed = D.optimizer_is_deepspeed(optimizer)
        if self._deepspeed and getattr(self.cfg, "skip_sgd_on_update", False):
            # The DeepSpeed engine always steps (momentum and weight decay still move the weights),
            # so "an update step has no SGD step" cannot be had exactly.
            raise ConfigError("method.skip_sgd_on_update", True,
                              "false under DeepSpeed ZeRO (the engine cannot skip an optimizer step); "
                              "add method.skip_sgd_on_update=false, or launch with ddp/fsdp")
        super().bind(model, optimizer)
        self._local.clear()
        self._param_cache = None
        self.apply_masks(model)
        if self._deepspeed:
            params = self._params(model)
            for n in self.names:
                D.mul_optimizer_partitions_(params[n], self.masks[n], master=True, states=True)

    def _params(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Sparse weight name -> parameter of ``model`` (wrapper prefixes tolerated)."""
        if self._param_cache is not None and self._param_cache[0] == id(model):
            return self._param_cache[1]
        found: dict[str, torch.Tensor] = {}
        by_clean = {_clean(n): p for n, p in model.named_parameters()}
        for n in self.names:
            p = by_clean.get(n)
            if p is None and n.startswith("module."):
                p = by_clean.get(n[len("module."):])
            if p is None:
                p = by_clean.get("module." + n)
            if p is None:
                raise KeyError(f"sparse weight {n!r} not found in the model; its parameters are "
                               f"{', '.join(list(by_clean)[:8])}, ...")
            found[n] = p
        self._param_cache = (id(model), found)
        return found

    def _local_mask(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """The piece of ``name``'s mask that matches ``local_view(param)``, in the weight's dtype."""
        m = self._local.get(name)
        if m is None:
            full = self.masks[name]
            local = D.local_view(param)
            if full.device != local.device:
                full = self.masks[name] = full.to(local.device)
            m = D.distribute_like(full, param).to(local.dtype)
            self._local[name] = m
        return m

    def apply_masks(self, model: nn.Module) -> None:
        """Zero every masked weight entry (in place, on this rank's piece)."""
        params = self._params(model)
        with torch.no_grad():
            for n in self.names:
                D.local_view(params[n]).mul_(self._local_mask(n, params[n]))

    def mask_grads(self, model: nn.Module) -> None:
        """Zero gradient entries of masked weights so the optimizer cannot move them."""
        params = self._params(model)
        with torch.no_grad():
            for n in self.names:
                if self._deepspeed:  # ZeRO: the gradient lives in the optimizer's partitions
                    D.mul_grad_(params[n], self.masks[n])
                    continue
                g = params[n].grad
                if g is not None:
                    D.local_view(g).mul_(self._local_mask(n, params[n]))

    def _optimizer_state(self, param: torch.Tensor) -> dict[str, Any]:
        if self.optimizer is None:
            return {}
        state = getattr(self.optimizer, "state", None)
        if state is None:
            return {}
        return state.get(param, {}) if hasattr(state, "get") else {}

    def _change_mask(self, name: str, param: torch.Tensor, new: torch.Tensor) -> None:
        """Install a new full mask: zero weights at dropped and new positions, reset their optimizer state.

        Weights survive where both masks are 1 (kept, or dropped and re-grown in the same update);
        every per-element optimizer state tensor is zeroed where the masks differ.
        """
        old = self.masks[name]
        survive = old & new
        changed = old ^ new
        with torch.no_grad():
            local = D.local_view(param)
            local.mul_(D.distribute_like(survive, param).to(local.dtype))
            if self._deepspeed:  # fp32 master piece and optimizer state live in ZeRO partitions
                D.mul_optimizer_partitions_(param, survive, master=True, states=False)
                D.mul_optimizer_partitions_(param, ~changed, master=False, states=True)
            reset = D.distribute_like(~changed, param)
            for key, value in self._optimizer_state(param).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) == tuple(param.shape):
                    lv = D.local_view(value)
                    if tuple(lv.shape) != tuple(reset.shape):
                        raise RuntimeError(f"optimizer state {key!r} of {name} has local shape {tuple(lv.shape)}, "
                                           f"the weight's local piece is {tuple(reset.shape)}: cannot reset it")
                    lv.mul_(reset.to(lv.dtype))
        self.masks[name] = new
        self.active[name] = int(new.sum())
        self._local.pop(name, None)

    def _check_same_masks(self, what: str) -> None:
        if not self.cfg.check_masks or D.world_size() == 1:
            return
        sums = torch.stack([M.mask_checksum(self.masks[n]).cpu() for n in self.names])
        D.assert_same_across_ranks(sums, what)

    # -- hooks -------------------------------------------------------------------------------------
    def after_backward(self, model: nn.Module, step: int) -> None:
        self.mask_grads(model)

    def after_step(self, model: nn.Module, step: int) -> None:
        self.apply_masks(model)

    # -- reporting ---------------------------------------------------------------------------------
    def densities(self) -> dict[str, float]:
        """Current density of every sparse weight (exact counts / numel)."""
        return {n: self.active[n] / math.prod(self.shapes[n]) for n in self.names}

    def report(self) -> dict[str, Any]:
        """Per-layer density, global sparsity and the statistics of the last mask change."""
        total = sum(math.prod(s) for s in self.shapes.values())
        act = sum(self.active.values())
        out: dict[str, Any] = {"sparsity/global": 1.0 - act / total if total else 0.0,
                               "sparsity/active_params": act, "sparsity/sparse_params_total": total,
                               "sparsity/updates": self.updates_done}
        for n, d in self.densities().items():
            out[f"density/{n}"] = d
        for k, v in self.last.items():
            if isinstance(v, (int, float, str)):
                out[f"{self.name}/{k}"] = v
        return out

    def plot(self, run_dir: str) -> list[str]:
        """Bar chart of per-layer density (current vs target) as ``<method>_density.png``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        os.makedirs(run_dir, exist_ok=True)
        dens = self.densities()
        xs = range(len(self.names))
        fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(self.names) + 2), 4))
        ax.bar(xs, [dens[n] for n in self.names], label="current")
        ax.plot(list(xs), [self.target_density[n] for n in self.names], "k.", label="target")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(self.names, rotation=90, fontsize=6)
        ax.set_ylabel("density")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{self.name}: global sparsity {self.report()['sparsity/global']:.3f}")
        ax.legend()
        fig.tight_layout()
        path = os.path.join(run_dir, f"{self.name}_density.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return [path]

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Masks (bit-packed, CPU), counts, resolved densities and schedule counters."""
        return {"version": 1, "method": self.name, "seed": self.seed, "names": list(self.names),
                "shapes": {n: list(s) for n, s in self.shapes.items()},
                "target_density": dict(self.target_density), "active": dict(self.active),
                "masks": {n: M.pack_mask(self.masks[n]) for n in self.names},
                "updates_done": self.updates_done, "last": dict(self.last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore masks and counters; the next bind/after_step re-applies the masks."""
        if state.get("method") != self.name:
            raise ValueError(f"checkpoint holds method state of {state.get('method')!r}, this run is {self.name!r}")
        shapes = {n: tuple(s) for n, s in state["shapes"].items()}
        if self.names and shapes != self.shapes:
            raise ValueError("checkpoint's sparse weights differ from this model's: "
                             f"{sorted(set(shapes) ^ set(self.shapes)) or 'shapes differ'}")
        self.names = list(state["names"])
        self.shapes = shapes
        self.target_density = dict(state["target_density"])
        self.active = {n: int(a) for n, a in state["active"].items()}
        old = self.masks
        self.masks = {}
        for n in self.names:
            m = M.unpack_mask(state["masks"][n])
            self.masks[n] = m.to(old[n].device) if n in old else m
            if int(self.masks[n].sum()) != self.active[n]:
                raise ValueError(f"checkpoint mask of {n} has {int(self.masks[n].sum())} ones, expected {self.active[n]}")
        self.updates_done = int(state["updates_done"])
        self.last = dict(state.get("last", {}))
        self._local.clear()
        self._loaded = True


@register_method
class Static(_MaskedMethod):
    """Static sparse training: a random mask (uniform or ERK) fixed for the whole run."""

    name = "static"
    Config = StaticConfig


# ------------------------------------------------------------------------------------------------
# Dynamic sparse training: SET and RigL
# ------------------------------------------------------------------------------------------------


class _DynamicMethod(_MaskedMethod):
    """Drop by magnitude, grow by :meth:`_grow_score`, every ``delta_t`` steps until ``t_end``."""

    Config = DynamicConfig
    needs_grad = True  # whether growth reads the dense gradient

    def __init__(self, cfg: DynamicConfig, *, total_steps: int, steps_per_epoch: int, seed: int = 0):
        super().__init__(cfg, total_steps=total_steps, steps_per_epoch=steps_per_epoch, seed=seed)
        self.schedule = DropSchedule(alpha=cfg.alpha, delta_t=cfg.delta_t,
                                     t_end=_steps(cfg.t_end, self.total_steps, 1.0), begin=cfg.begin_step,
                                     update_at_step0=cfg.update_at_step0, anneal=cfg.anneal,
                                     anneal_power=cfg.anneal_power)
        self._grad_sum: dict[str, torch.Tensor] = {}  # growth_grad_window: running sums of dense grads
        self._grad_count = 0
        self._pending: dict[str, torch.Tensor] = {}  # skip_sgd_on_update=false: grow scores until after_step

    # -- grow scores ---------------------------------------------------------------------------------
    def _grow_score(self, name: str, param: torch.Tensor, step: int, dense_grad: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _in_window(self, step: int) -> bool:
        n = self.cfg.growth_grad_window
        return self.needs_grad and n > 1 and any(self.schedule.is_update(step + j) for j in range(n))

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
        update = self.schedule.is_update(step)
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
        frac = self.schedule.fraction(step)
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
            self._change_mask(n, p, res.mask)
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
        state["schedule"] = {"t_end": self.schedule.t_end, "begin": self.schedule.begin}
        state["grad_sum"] = {n: g.detach().cpu() for n, g in self._grad_sum.items()}
        state["grad_count"] = self._grad_count
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        sched = state.get("schedule", {})
        if sched and sched.get("t_end") != self.schedule.t_end:
            raise ValueError(f"checkpoint's RigL T_end is step {sched.get('t_end')}, this run computes "
                             f"{self.schedule.t_end}: method.t_end or the training length changed")
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
class GMP(_MaskedMethod):
    """Gradual magnitude pruning from dense; per-layer cubic ramp to the distribution's final sparsity."""

    name = "gmp"
    Config = GMPConfig

    def __init__(self, cfg: GMPConfig, *, total_steps: int, steps_per_epoch: int, seed: int = 0):
        super().__init__(cfg, total_steps=total_steps, steps_per_epoch=steps_per_epoch, seed=seed)
        t0 = _steps(cfg.t_start, self.total_steps, 0.999999)
        t1 = min(_steps(cfg.t_end, self.total_steps, 1.0), max(self.total_steps - 1, 0))
        if t1 < t0:
            raise ConfigError("method.t_end", cfg.t_end,
                              f"a pruning end at or after method.t_start (step {t0}; training has "
                              f"{self.total_steps} steps)")
        self.schedule = GMPSchedule(t0=t0, t1=t1, delta_t=cfg.delta_t)

    def _start_density(self, name: str) -> float:
        return 1.0 - min(self.cfg.s_init, 1.0 - self.target_density[name])

    def layer_sparsity(self, name: str, t: int) -> float:
        """Target sparsity of layer ``name`` at step ``t`` (cubic ramp to its final sparsity)."""
        s_final = 1.0 - self.target_density[name]
        return self.schedule.sparsity(t, min(self.cfg.s_init, s_final), s_final)

    def after_step(self, model: nn.Module, step: int) -> None:
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
            self._change_mask(n, p, new)
        self.updates_done += 1
        self.last = {"step": step, "pruned": pruned, "target_sparsity": self.report()["sparsity/global"]}
        self._check_same_masks(f"gmp masks after pruning at step {step}")
