"""Two test methods that change the architecture mid-run through :class:`~dist_sparse.methods.base.Rebuild`.

Registered on import; a launched run finds them with ``DIST_SPARSE_PLUGINS=tests.methods.rebuild_methods``
(and the repository root on ``PYTHONPATH``). Names start with ``test_`` so the method contract suite
leaves them out.

* ``test_prune_channels``: at the end of epoch ``at_epoch`` remove a ``fraction`` of the output channels
  of one BasicBlock's ``conv1``, with the matching entries of ``bn1`` and input channels of ``conv2``.
  Which channels is decided in ``on_epoch_end`` on every rank (the L1 norm of the full ``conv1`` weight,
  gathered with :func:`dist_sparse.distributed.gather_full`, or simply every second one) and checked to
  be identical across ranks; the surgery only applies that decision. Under GroupNorm whole groups are
  removed (channel ``c`` stays in a group of the same size), so with BatchNorm and GroupNorm alike the
  model computes the same function whenever the removed channels' outputs were zero.
* ``test_factorize_linear``: at the end of epoch ``at_epoch`` replace the classifier ``fc`` by
  ``Sequential(Linear(in, r, bias=False), Linear(r, out))`` from its SVD (``rank`` 0: full rank, exact).

Both take ``fail: true``: the surgery (which runs on rank 0 only) raises ``ValueError("planned failure")``.
``prepare`` builds the post-surgery architecture once the state says the rebuild happened (resume, and
the trainer's rebuild itself), and ``architecture``/``build_exported`` rebuild it for an export.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import skip_init

from dist_sparse import distributed as D
from dist_sparse.errors import check_range
from dist_sparse.methods import Method, MethodConfig, Rebuild, register_method

__all__ = ["PruneChannelsConfig", "PruneChannels", "FactorizeLinearConfig", "FactorizeLinear",
           "prune_block_channels", "factorize_fc", "removal_units"]


# ------------------------------------------------------------------------------------------------
# Surgery (pure torch; modules are built without touching the global RNG)
# ------------------------------------------------------------------------------------------------


def _new_conv(old: nn.Conv2d, cin: int, cout: int) -> nn.Conv2d:
    return skip_init(nn.Conv2d, cin, cout, old.kernel_size, stride=old.stride, padding=old.padding,
                     dilation=old.dilation, groups=old.groups, bias=old.bias is not None,
                     padding_mode=old.padding_mode, device=old.weight.device, dtype=old.weight.dtype)


def _slice_norm(norm: nn.Module, keep: torch.Tensor, n_units: int, n_kept_units: int) -> nn.Module:
    """``norm`` restricted to channels ``keep`` (BatchNorm: per channel; GroupNorm: whole groups)."""
    if isinstance(norm, nn.GroupNorm):
        if norm.num_groups != n_units:
            raise ValueError(f"GroupNorm with {norm.num_groups} groups, expected {n_units}")
        new = nn.GroupNorm(n_kept_units, len(keep), eps=norm.eps, affine=norm.affine)
    elif isinstance(norm, nn.modules.batchnorm._BatchNorm):
        new = type(norm)(len(keep), eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                         track_running_stats=norm.track_running_stats)
    elif isinstance(norm, nn.Identity):
        new = norm
        if hasattr(new, "num_channels"):
            new.num_channels = len(keep)
        return new
    else:
        raise TypeError(f"cannot slice a {type(norm).__name__}")
    ref = next(iter(norm.parameters()), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for name, p in norm.named_parameters(recurse=False):
            getattr(new, name).copy_(p.detach()[keep])
        for name, b in norm.named_buffers(recurse=False):
            if b is None:
                continue
            nb = getattr(new, name)
            nb.copy_(b.detach()[keep] if b.ndim >= 1 and b.shape[0] == norm_channels(norm) else b.detach())
    return new


def norm_channels(norm: nn.Module) -> int:
    for attr in ("num_features", "num_channels"):
        if hasattr(norm, attr):
            return int(getattr(norm, attr))
    raise TypeError(f"{type(norm).__name__} has no channel count")


def removal_units(block: nn.Module) -> tuple[int, int]:
    """(number of removable units, channels per unit) of ``block.conv1``'s output: GroupNorm groups,
    otherwise single channels."""
    channels = block.conv1.out_channels
    if isinstance(block.bn1, nn.GroupNorm):
        return block.bn1.num_groups, channels // block.bn1.num_groups
    return channels, 1


def prune_block_channels(model: nn.Module, block_name: str, kept_units: list[int]) -> nn.Module:
    """Keep only the output units ``kept_units`` of ``<block_name>.conv1`` (channels, or whole groups
    under GroupNorm), with the matching ``bn1`` entries and ``conv2`` input channels. In place."""
    block = model.get_submodule(block_name)
    n_units, per = removal_units(block)
    kept_units = sorted(int(u) for u in kept_units)
    if not kept_units or len(set(kept_units)) != len(kept_units) or kept_units[0] < 0 or kept_units[-1] >= n_units:
        raise ValueError(f"kept units {kept_units} are not distinct units of {n_units}")
    keep = torch.tensor([u * per + i for u in kept_units for i in range(per)], dtype=torch.long)
    c1, c2 = block.conv1, block.conv2
    new1 = _new_conv(c1, c1.in_channels, len(keep))
    new2 = _new_conv(c2, len(keep), c2.out_channels)
    with torch.no_grad():
        new1.weight.copy_(c1.weight.detach()[keep.to(c1.weight.device)])
        if c1.bias is not None:
            new1.bias.copy_(c1.bias.detach()[keep.to(c1.bias.device)])
        new2.weight.copy_(c2.weight.detach()[:, keep.to(c2.weight.device)])
        if c2.bias is not None:
            new2.bias.copy_(c2.bias.detach())
    block.conv1, block.conv2 = new1, new2
    block.bn1 = _slice_norm(block.bn1, keep, n_units, len(kept_units))
    return model


def factorize_fc(model: nn.Module, rank: int = 0) -> nn.Module:
    """``model.fc`` -> ``Sequential(Linear(in, r, bias=False), Linear(r, out))`` from its SVD (float64):
    W ~ (U sqrt(S)) (sqrt(S) V^T), exact at full rank (``rank`` 0 or >= min(in, out)). In place."""
    fc = model.fc
    full = min(fc.in_features, fc.out_features)
    r = full if rank <= 0 else min(rank, full)
    w = fc.weight.detach()
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:r].sqrt()
    first = skip_init(nn.Linear, fc.in_features, r, bias=False, device=w.device, dtype=w.dtype)
    second = skip_init(nn.Linear, r, fc.out_features, bias=fc.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        first.weight.copy_((root[:, None] * vh[:r]).to(w.dtype))
        second.weight.copy_((u[:, :r] * root[None, :]).to(w.dtype))
        if fc.bias is not None:
            second.bias.copy_(fc.bias.detach())
    model.fc = nn.Sequential(first, second)
    return model


def _planned_failure() -> None:
    raise ValueError("planned failure")


# ------------------------------------------------------------------------------------------------
# test_prune_channels
# ------------------------------------------------------------------------------------------------


@dataclass
class PruneChannelsConfig(MethodConfig):
    """Remove output channels of one BasicBlock's conv1 at the end of an epoch."""

    name: str = "test_prune_channels"  # method name
    block: str = "layer2.1"  # the BasicBlock (module path) whose conv1 loses channels
    fraction: float = 0.5  # share of conv1's output units removed (channels; whole groups under GroupNorm)
    select: Literal["l1", "every_second"] = "l1"  # smallest L1 norm of the full conv1 weight, or units 1, 3, 5, ...
    at_epoch: int = 0  # the epoch at whose end the channels are removed
    fail: bool = False  # the surgery raises ValueError("planned failure") (on rank 0, where it runs)

    def validate(self) -> None:
        check_range("method.block", self.block, bool(self.block), "the module path of a BasicBlock, e.g. layer2.1")
        check_range("method.fraction", self.fraction, 0.0 < self.fraction < 1.0, "a number in (0, 1)")
        check_range("method.select", self.select, self.select in ("l1", "every_second"), "l1 or every_second")
        check_range("method.at_epoch", self.at_epoch, self.at_epoch >= 0, "an integer >= 0")


@register_method
class PruneChannels(Method):
    """Physically remove conv1 output channels of one block (see the module docstring)."""

    name = "test_prune_channels"
    Config = PruneChannelsConfig

    def __init__(self, cfg: PruneChannelsConfig, *, seed: int = 0):
        super().__init__(cfg, seed=seed)
        self.kept: list[int] | None = None  # kept units once the rebuild happened

    def prepare(self, model: nn.Module) -> nn.Module:
        if self.kept is not None:
            model = prune_block_channels(model, self.cfg.block, self.kept)
        return model

    def decide(self, model: nn.Module) -> list[int]:
        """The units to keep, from the full weights; identical on every rank (a collective)."""
        block = model.get_submodule(self.cfg.block)
        n_units, per = removal_units(block)
        n_remove = int(round(self.cfg.fraction * n_units))
        if not 0 < n_remove < n_units:
            raise ValueError(f"fraction {self.cfg.fraction} of {n_units} units removes {n_remove}")
        if self.cfg.select == "every_second":
            removed = set((list(range(1, n_units, 2)) + list(range(0, n_units, 2)))[:n_remove])
            kept = [u for u in range(n_units) if u not in removed]
        else:
            with D.gather_full(block.conv1.weight) as w:
                score = w.detach().double().abs().reshape(n_units, -1).sum(dim=1).cpu()
            order = torch.argsort(score, stable=True)  # ties: the lower index is removed first
            kept = sorted(order[n_remove:].tolist())
        D.assert_same_across_ranks(kept, f"kept channels of {self.cfg.block}.conv1")
        return kept

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, Any] | None = None) -> Rebuild | None:
        if epoch != self.cfg.at_epoch or self.kept is not None:
            return None
        kept = self.decide(model)
        block, fail = self.cfg.block, self.cfg.fail

        def surgery(plain: nn.Module) -> nn.Module:
            if fail:
                _planned_failure()
            return prune_block_channels(plain, block, kept)

        def commit() -> None:
            self.kept = list(kept)

        return Rebuild(surgery=surgery, commit=commit, reason=f"prune {block}.conv1 to {len(kept)} units")

    def report(self) -> dict[str, Any]:
        return {"pruned": int(self.kept is not None), "kept_units": len(self.kept) if self.kept is not None else 0}

    def architecture(self) -> dict[str, Any]:
        return {} if self.kept is None else {"block": self.cfg.block, "kept": list(self.kept)}

    @classmethod
    def build_exported(cls, model: nn.Module, arch: dict[str, Any]) -> nn.Module:
        return prune_block_channels(model, arch["block"], arch["kept"]) if arch else model

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["kept"] = None if self.kept is None else [int(u) for u in self.kept]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        kept = state.get("kept")
        self.kept = None if kept is None else [int(u) for u in kept]


# ------------------------------------------------------------------------------------------------
# test_factorize_linear
# ------------------------------------------------------------------------------------------------


@dataclass
class FactorizeLinearConfig(MethodConfig):
    """Replace the classifier by a two-factor product from its SVD at the end of an epoch."""

    name: str = "test_factorize_linear"  # method name
    rank: int = 0  # inner dimension of the factors (0: full rank, the exact factorization)
    at_epoch: int = 0  # the epoch at whose end fc is factorized
    fail: bool = False  # the surgery raises ValueError("planned failure") (on rank 0, where it runs)

    def validate(self) -> None:
        check_range("method.rank", self.rank, self.rank >= 0, "an integer >= 0 (0: full rank)")
        check_range("method.at_epoch", self.at_epoch, self.at_epoch >= 0, "an integer >= 0")


@register_method
class FactorizeLinear(Method):
    """Factorize ``fc`` once (see the module docstring)."""

    name = "test_factorize_linear"
    Config = FactorizeLinearConfig

    def __init__(self, cfg: FactorizeLinearConfig, *, seed: int = 0):
        super().__init__(cfg, seed=seed)
        self.factorized: int | None = None  # the rank asked for (0: full) once fc was factorized

    def prepare(self, model: nn.Module) -> nn.Module:
        if self.factorized is not None:
            model = factorize_fc(model, self.factorized)
        return model

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, Any] | None = None) -> Rebuild | None:
        if epoch != self.cfg.at_epoch or self.factorized is not None:
            return None
        rank, fail = self.cfg.rank, self.cfg.fail

        def surgery(plain: nn.Module) -> nn.Module:
            if fail:
                _planned_failure()
            return factorize_fc(plain, rank)

        def commit() -> None:
            self.factorized = int(rank)

        return Rebuild(surgery=surgery, commit=commit, reason=f"fc -> low-rank pair (rank {rank or 'full'})")

    def report(self) -> dict[str, Any]:
        return {"factorized": int(self.factorized is not None)}

    def architecture(self) -> dict[str, Any]:
        return {} if self.factorized is None else {"rank": int(self.factorized)}

    @classmethod
    def build_exported(cls, model: nn.Module, arch: dict[str, Any]) -> nn.Module:
        return factorize_fc(model, int(arch["rank"])) if arch else model

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["factorized"] = self.factorized
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        rank = state.get("factorized")
        self.factorized = None if rank is None else int(rank)
