"""The shared masking layer: binary masks on named weights, kept in force on every backend.

Every mask-based method (Static, SET, RigL, GMP; AutoSparse's backward sparsity; a pruned model that
is fine-tuned) needs the same bookkeeping, and none of it depends on a paper:

* :func:`find_params` maps weight names to the parameters of a (possibly wrapped) model;
* :class:`MaskSet` holds one full bool mask per weight (identical on every rank) and applies it: to
  the weights, to the gradients, and on a mask change to the optimizer state of the changed entries.
  Every element-wise edit goes through a :mod:`dist_sparse.distributed` verb, so the same code works
  on plain, FSDP2 and DeepSpeed ZeRO-1/2/3 tensors;
* :class:`MaskedMethod` is the base of the methods whose state *is* a mask per weight: it selects the
  weights, resolves per-layer densities, draws initial masks, and implements the lifecycle contract
  (pure ``prepare``, state adopted in ``bind``, exact checkpoints, ``finalize`` that folds the masks).

A weight holds exact zeros where its mask is 0, so ``param.grad`` is the dense gradient until
:meth:`MaskSet.mask_grads` zeroes the masked entries.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
from torch import nn

from .. import distributed as D
from ..errors import ConfigError, check_range
from ..surgery import masking as M
from .base import Method, MethodConfig

__all__ = ["SparseConfig", "MaskSet", "MaskedMethod", "find_params", "clean_name"]

clean_name = D.plain_name  # a parameter name without the tokens FSDP1, checkpointing and compile insert


def find_params(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Weight name -> parameter of ``model`` (wrapper tokens and a ``module.`` prefix tolerated).

    Raises:
        KeyError: naming the weight that is missing and some of the model's parameter names.
    """
    by_clean = {clean_name(n): p for n, p in model.named_parameters()}
    found: dict[str, torch.Tensor] = {}
    for n in names:
        p = by_clean.get(n)
        if p is None and n.startswith("module."):
            p = by_clean.get(n[len("module."):])
        if p is None:
            p = by_clean.get("module." + n)
        if p is None:
            raise KeyError(f"weight {n!r} not found in the model; its parameters are "
                           f"{', '.join(list(by_clean)[:8])}, ...")
        found[n] = p
    return found


class MaskSet:
    """Full bool masks of named weights and the operations that keep them in force.

    Args:
        masks: name -> full bool mask, in model order (the order of every collective).

    The masks are full-shaped on every rank (a few bits per weight); each operation cuts the local
    piece that matches the parameter's layout. Call the operations on every rank in the same order.
    """

    def __init__(self, masks: dict[str, torch.Tensor] | None = None):
        self.masks: dict[str, torch.Tensor] = dict(masks or {})
        self.counts: dict[str, int] = {n: int(m.sum()) for n, m in self.masks.items()}  # exact ones per mask
        self._local: dict[str, torch.Tensor] = {}  # cached local piece, in the weight dtype
        self._float: dict[str, torch.Tensor] = {}  # cached full mask, in the weight dtype
        self._cache: tuple[int, dict[str, torch.Tensor]] | None = None

    @property
    def names(self) -> list[str]:
        return list(self.masks)

    def params(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if self._cache is None or self._cache[0] != id(model):
            self._cache = (id(model), find_params(model, self.names))
            self._local.clear()
            self._float.clear()
        return self._cache[1]

    def forget_model(self) -> None:
        """Drop cached parameter lookups and local mask pieces (after a rebuild or re-prepare)."""
        self._cache = None
        self._local.clear()
        self._float.clear()

    def count(self, name: str) -> int:
        return self.counts[name]

    def _local_mask(self, name: str, param: torch.Tensor) -> torch.Tensor:
        m = self._local.get(name)
        if m is None:
            local = D.local_view(param)
            full = self.masks[name]
            if full.device != local.device:
                full = self.masks[name] = full.to(local.device)
            m = self._local[name] = D.distribute_like(full, param).to(local.dtype)
        return m

    def apply(self, model: nn.Module) -> None:
        """Zero every masked weight entry (this rank's piece; cheap enough for every step)."""
        params = self.params(model)
        with torch.no_grad():
            for n, p in params.items():
                D.local_view(p).mul_(self._local_mask(n, p))

    def apply_everywhere(self, model: nn.Module, optimizer: Any) -> None:
        """Zero masked entries of the weights, of DeepSpeed's fp32 master copy and of the optimizer
        state (after a bind or a resume: nothing may bring a masked weight back)."""
        params = self.params(model)
        for n, p in params.items():
            D.mul_param_(p, self.masks[n], master=True)
            if optimizer is not None:
                D.mul_optimizer_state_(p, optimizer, self.masks[n])

    def mask_grads(self, model: nn.Module) -> None:
        """Zero the gradient entries of masked weights (between backward and the optimizer step)."""
        params = self.params(model)
        for n, p in params.items():
            D.mask_grad_(p, self._float_mask(n, p))

    def _float_mask(self, name: str, param: torch.Tensor) -> torch.Tensor:
        """The full mask in the weight's dtype, cached (no conversion on every step)."""
        m = self._float.get(name)
        if m is None:
            local = D.local_view(param)
            m = self._float[name] = self.masks[name].to(device=local.device, dtype=local.dtype)
        return m

    def change(self, model: nn.Module, optimizer: Any, name: str, new: torch.Tensor) -> None:
        """Install a new full mask for ``name``.

        Weights survive where both masks are 1; weights at dropped and at new positions become 0 (so
        a grown weight starts at zero), and every per-element optimizer state entry is reset where the
        masks differ.
        """
        param = self.params(model)[name]
        old = self.masks[name].to(new.device)
        survive, changed = old & new, old ^ new
        D.mul_param_(param, survive, master=True)
        if optimizer is not None:
            D.mul_optimizer_state_(param, optimizer, ~changed)
        self.masks[name] = new
        self.counts[name] = int(new.sum())
        self._local.pop(name, None)
        self._float.pop(name, None)

    def check_same(self, what: str) -> None:
        """Raise unless every rank holds bit-identical masks (one small collective)."""
        if D.world_size() == 1 or not self.masks:
            return
        sums = torch.stack([M.mask_checksum(m).cpu() for m in self.masks.values()])
        D.assert_same_across_ranks(sums, what)

    def fold(self, model: nn.Module) -> nn.Module:
        """Multiply the masks into the weights of a plain model (the inference model)."""
        params = find_params(model, self.names)
        with torch.no_grad():
            for n, p in params.items():
                p.mul_(self.masks[n].to(device=p.device, dtype=p.dtype))
        return model

    def state_dict(self) -> dict[str, Any]:
        return {n: M.pack_mask(m) for n, m in self.masks.items()}

    @classmethod
    def from_state(cls, state: dict[str, Any], names: list[str]) -> "MaskSet":
        return cls({n: M.unpack_mask(state[n]) for n in names})


# ------------------------------------------------------------------------------------------------
# The base of mask-state methods
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


class MaskedMethod(Method):
    """A method whose state is one mask per sparse weight (not registered itself).

    ``prepare`` draws the initial masks from (seed, layer) when the method has no state yet, without
    keeping them; ``bind`` adopts the same masks (drawn again from the bound model's full shapes), so
    ``prepare`` stays a pure function. After a resume the checkpoint's masks are used instead.
    """

    Config = SparseConfig

    def __init__(self, cfg: SparseConfig, *, seed: int = 0):
        super().__init__(cfg, seed=seed)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.target_density: dict[str, float] = {}  # resolved per-layer densities (final, for GMP)
        self.maskset = MaskSet()
        self.updates_done = 0
        self.last: dict[str, Any] = {}  # statistics of the last mask change

    # -- state ---------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return self.maskset.masks

    @property
    def active(self) -> dict[str, int]:
        return self.maskset.counts

    def _resolve_densities(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
        c = self.cfg
        return M.layer_densities(shapes, c.sparsity, c.distribution, c.first_layer_dense, c.last_layer_dense,
                                 c.overrides, c.erk_power_scale)

    def _start_density(self, name: str, target: dict[str, float]) -> float:
        return target[name]

    def _targets(self, model: nn.Module) -> dict[str, tuple[int, ...]]:
        """Sparse weight name -> full shape (works on plain and on sharded, bound models)."""
        c = self.cfg
        targets = M.sparsifiable_parameters(model, c.include, c.exclude, c.sparse_embeddings)
        if not targets:
            raise ConfigError("method.include", c.include,
                              "globs that match at least one Conv/Linear weight of the model (minus method.exclude)")
        return {clean_name(n): tuple(D.full_shape(p)) for n, p in targets}

    def _initial_state(self, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, float], MaskSet]:
        """Densities and masks of a fresh run: a pure function of (config, seed, shapes)."""
        target = self._resolve_densities(shapes)
        masks = {}
        for n, shape in shapes.items():
            a = M.active_count(math.prod(shape), self._start_density(n, target))
            masks[n] = M.random_mask(shape, a, M.make_generator(self.seed, "mask-init", n))
        return target, MaskSet(masks)

    def _check_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        if shapes != self.shapes:
            raise ValueError(f"{self.name}: the checkpoint's sparse weights differ from this model's: "
                             f"{sorted(set(shapes) ^ set(self.shapes)) or 'shapes differ'}")

    # -- lifecycle -------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        """Zero the masked weights (drawing the initial masks when the method has no state yet)."""
        shapes = self._targets(model)
        if self.shapes:
            self._check_shapes(shapes)
            maskset, fresh = self.maskset, False
        else:
            _, maskset, fresh = *self._initial_state(shapes), True
        params = find_params(model, list(shapes))
        with torch.no_grad():
            for n, p in params.items():
                m = maskset.masks[n].to(p.device)
                if self.cfg.init == "sparse_fanin" and fresh:
                    p.mul_(1.0 / math.sqrt(max(int(m.sum()) / p.numel(), 1e-12)))
                p.mul_(m.to(p.dtype))
        return model

    def bind(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Adopt the initial masks (first bind of a fresh run), then enforce them everywhere."""
        super().bind(model, optimizer)
        shapes = self._targets(model)
        if not self.shapes:
            self.target_density, self.maskset = self._initial_state(shapes)
            self.shapes = shapes
        else:
            self._check_shapes(shapes)
        self.maskset.forget_model()
        self.maskset.apply_everywhere(model, optimizer)
        self.maskset.apply(model)

    def apply_masks(self, model: nn.Module) -> None:
        self.maskset.apply(model)

    def mask_grads(self, model: nn.Module) -> None:
        self.maskset.mask_grads(model)

    def _params(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self.maskset.params(model)

    def _change_mask(self, model: nn.Module, name: str, new: torch.Tensor) -> None:
        self.maskset.change(model, self.optimizer, name, new)

    def _check_same_masks(self, what: str) -> None:
        if self.cfg.check_masks:
            self.maskset.check_same(what)

    def after_backward(self, model: nn.Module, step: int) -> None:
        self.mask_grads(model)

    def after_step(self, model: nn.Module, step: int) -> None:
        self.apply_masks(model)

    def constrain(self, model: nn.Module) -> None:
        self.apply_masks(model)

    def finalize(self, model: nn.Module) -> nn.Module:
        """The masks folded into the weights: a plain model of the registered architecture."""
        if not self.shapes:  # never bound: the masks prepare would draw
            _, maskset = self._initial_state(self._targets(model))
            return maskset.fold(model)
        return self.maskset.fold(model)

    # -- reporting ---------------------------------------------------------------------------------
    def densities(self) -> dict[str, float]:
        """Current density of every sparse weight (exact counts / numel)."""
        return {n: self.maskset.count(n) / math.prod(self.shapes[n]) for n in self.names}

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
        """Masks (bit-packed, CPU), resolved densities and counters."""
        state = super().state_dict()
        state.update({"version": 2, "seed": self.seed, "names": self.names,
                      "shapes": {n: list(s) for n, s in self.shapes.items()},
                      "target_density": dict(self.target_density), "active": dict(self.active),
                      "masks": self.maskset.state_dict(), "updates_done": self.updates_done,
                      "last": dict(self.last)})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore masks and counters; the next bind re-applies the masks."""
        super().load_state_dict(state)
        shapes = {n: tuple(s) for n, s in state["shapes"].items()}
        if self.shapes:
            self._check_shapes(shapes)
        names = list(state["names"])
        maskset = MaskSet.from_state(state["masks"], names)
        for n in names:
            if maskset.count(n) != int(state["active"][n]):
                raise ValueError(f"checkpoint mask of {n} has {maskset.count(n)} ones, expected {state['active'][n]}")
        self.shapes = {n: shapes[n] for n in names}
        self.target_density = dict(state["target_density"])
        self.maskset = maskset
        self.updates_done = int(state["updates_done"])
        self.last = dict(state.get("last", {}))
