"""Parameter counts and per-layer weight statistics, correct for plain and sharded models.

Every count here goes through :mod:`dist_sparse.distributed`, so the numbers are the same whether the
model is a plain module, a DDP / DeepSpeed ZeRO-1/2 replica, an FSDP2 model (``DTensor`` parameters)
or a DeepSpeed ZeRO-3 model. For sharded layouts the counts are collectives: **every rank must call
these functions, in the same order**. For plain tensors no communication happens.

Layer names are module FQNs with the wrapper tokens that FSDP1, activation checkpointing and
``torch.compile`` insert (``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``, ``_orig_mod.``)
and a leading ``module.`` (DDP, DeepSpeed engine) removed (:func:`clean_name`), so a layer has the
same name on every backend. The name of a layer is that of its module, e.g. ``layer1.0.conv1``; its
weight is ``layer1.0.conv1.weight``.

Example::

    from dist_sparse.metrics.layer_stats import count_parameters, layer_stats, global_sparsity
    total, nonzero = count_parameters(model)
    stats = layer_stats(model)                 # {"layer1.0.conv1": LayerStat(...), ...}
    print(global_sparsity(stats))
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator, Mapping

import torch
from torch import nn

from dist_sparse import distributed as D

__all__ = ["WRAPPER_TOKENS", "clean_name", "layer_kind", "count_parameters", "LayerStat", "layer_stats",
           "global_sparsity", "global_density", "iter_weight_layers", "stable_rank", "stable_ranks",
           "sharded_sigma_max"]

WRAPPER_TOKENS = D.WRAPPER_TOKENS

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def clean_name(name: str) -> str:
    """A module / parameter FQN without wrapper tokens and without a leading ``module.``
    (``distributed.plain_name`` with the container stripped), e.g.
    ``"module._orig_mod.layer1.0.conv1"`` -> ``"layer1.0.conv1"``."""
    return D.plain_name(name, strip_container=True)


def layer_kind(module: nn.Module) -> str | None:
    """``"conv"`` (Conv1d/2d/3d), ``"linear"`` (Linear and subclasses), ``"embedding"``, else None."""
    if isinstance(module, _CONV_TYPES):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def _full_shape(t: torch.Tensor) -> tuple[int, ...]:
    """Shape of the full tensor: ZeRO-3 keeps it in ``ds_shape``; a DTensor's ``shape`` is global."""
    if D.layout(t) == "zero3":
        return tuple(int(s) for s in t.ds_shape)
    return tuple(int(s) for s in t.shape)


def iter_weight_layers(model: nn.Module) -> Iterator[tuple[str, str, nn.Module, torch.Tensor]]:
    """``(clean module FQN, kind, module, weight)`` for every Conv/Linear/Embedding, in model order.

    A module reachable under several names appears once (its first name); modules without a
    materialised weight (``weight is None``, lazy modules) are skipped.
    """
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None:
            continue
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor) or isinstance(w, nn.parameter.UninitializedParameter):
            continue
        yield clean_name(name), kind, module, w


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Total and non-zero parameter counts of the whole (possibly sharded) model.

    A parameter shared by several modules (tied weights: the same ``Parameter`` object) is counted
    once. Buffers are not parameters and are not counted.

    Collective for sharded parameters: every rank must call it.

    Args:
        model: plain, DDP-, FSDP2- or DeepSpeed-wrapped module.

    Returns:
        ``(total, nonzero)`` as ints, equal on all ranks.
    """
    total = nonzero = 0
    seen: set[int] = set()
    for p in model.parameters():  # already deduplicated by object; keep an explicit guard anyway
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += D.full_numel(p)
        nonzero += D.full_count_nonzero(p)
    return total, nonzero


@dataclass
class LayerStat:
    """Statistics of one weight layer (the full tensor, however it is sharded).

    Attributes:
        name: clean module FQN (``"layer1.0.conv1"``); the weight is ``name + ".weight"``.
        kind: ``"conv"``, ``"linear"`` or ``"embedding"``.
        shape: full weight shape as stored: conv ``(out, in // groups, *kernel)``, linear
            ``(out, in)``, embedding ``(num_embeddings, embedding_dim)``.
        numel: number of weight entries.
        nonzero: number of non-zero weight entries.
        density: ``nonzero / numel`` (1.0 for an empty weight).
        out_channels: conv: ``shape[0]``; linear: ``out_features``; embedding: ``embedding_dim``.
        in_channels: conv: ``shape[1]`` (``in_channels // groups``, as stored); linear:
            ``in_features``; embedding: ``num_embeddings``.
        max_rank: the largest rank the layer can have: ``min(out, numel // out)`` of the weight viewed as
            a matrix ``(out, in * prod(kernel))`` (linear: ``min(out, in)``; embedding:
            ``min(num_embeddings, embedding_dim)``).
        tied_to: for a layer whose weight is the same tensor as an earlier layer's (tied embedding and
            output projection), the name of that earlier layer; None otherwise. Totals over layers
            (:func:`global_sparsity`) skip tied layers so a shared weight is counted once.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    numel: int
    nonzero: int
    density: float
    out_channels: int
    in_channels: int
    max_rank: int
    tied_to: str | None = None

    @property
    def weight_name(self) -> str:
        """FQN of the weight parameter (``name + ".weight"``)."""
        return f"{self.name}.weight" if self.name else "weight"

    @property
    def sparsity(self) -> float:
        """``1 - density``."""
        return 1.0 - self.density

    def to_dict(self) -> dict:
        """Plain python values (the shape as a list), e.g. for JSON."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def _geometry(kind: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``(out_channels, in_channels, max_rank)`` of a weight of ``kind`` and full ``shape``."""
    if kind == "embedding":
        num, dim = shape[0], shape[1]
        return dim, num, min(num, dim)
    out = shape[0] if shape else 1
    inn = shape[1] if len(shape) > 1 else 1
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    return out, inn, min(out, cols)


def layer_stats(model: nn.Module) -> dict[str, LayerStat]:
    """Per-layer weight statistics of every Conv1d/2d/3d, Linear and Embedding, in model order.

    Counts go through :func:`dist_sparse.distributed.full_count_nonzero`, one call per layer; it is
    a collective for sharded weights, so every rank must call this function.

    Args:
        model: plain or wrapped module (names are cleaned with :func:`clean_name`).

    Returns:
        clean module FQN -> :class:`LayerStat`.
    """
    out: dict[str, LayerStat] = {}
    first: dict[int, LayerStat] = {}  # id(weight) -> the first layer holding it
    for name, kind, _module, w in iter_weight_layers(model):
        shape = _full_shape(w)
        oc, ic, rank = _geometry(kind, shape)
        tied = first.get(id(w))
        if tied is not None:  # same tensor as an earlier layer: reuse its counts (no collective)
            numel, nonzero, tied_to = tied.numel, tied.nonzero, tied.name
        else:
            numel, nonzero, tied_to = D.full_numel(w), D.full_count_nonzero(w), None
        stat = LayerStat(name=name, kind=kind, shape=shape, numel=numel, nonzero=nonzero,
                         density=nonzero / numel if numel else 1.0, out_channels=oc, in_channels=ic,
                         max_rank=rank, tied_to=tied_to)
        first.setdefault(id(w), stat)
        out[name] = stat
    return out


def _totals(stats: Mapping[str, LayerStat]) -> tuple[int, int]:
    kept = [s for s in stats.values() if s.tied_to is None or s.tied_to not in stats]
    return sum(s.numel for s in kept), sum(s.nonzero for s in kept)


def global_density(stats: Mapping[str, LayerStat]) -> float:
    """Non-zero fraction over the given layers: ``sum(nonzero) / sum(numel)`` (1.0 when empty).

    A layer whose ``tied_to`` is also among ``stats`` is skipped (its weight is counted once).
    """
    numel, nonzero = _totals(stats)
    return nonzero / numel if numel else 1.0


def global_sparsity(stats: Mapping[str, LayerStat]) -> float:
    """Zero fraction over all the given layers: ``1 - sum(nonzero) / sum(numel)`` (0.0 when empty).

    A layer whose ``tied_to`` is also among ``stats`` is skipped (its weight is counted once).

    Args:
        stats: the output of :func:`layer_stats`, or a subset of it (e.g. only the sparse layers).

    Returns:
        the sparsity in [0, 1].
    """
    numel, nonzero = _totals(stats)
    return (numel - nonzero) / numel if numel else 0.0


# ------------------------------------------------------------------------------------------------
# Stable rank (Cuttlefish: docs/cuttlefish.md)
# ------------------------------------------------------------------------------------------------


def stable_rank(w: torch.Tensor) -> float:
    """``||W||_F^2 / ||W||_2^2`` of a full (plain) weight; conv weights as (out, in*kh*kw).

    Computed on a float64 CPU copy with singular values only; 0.0 for an all-zero matrix. Scale
    invariant, between 1 and ``min(rows, cols)`` for a non-zero matrix.
    """
    a = w.detach().reshape(w.shape[0], -1).to("cpu", torch.float64)
    s = torch.linalg.svdvals(a)
    top = float(s[0]) if s.numel() else 0.0
    if top == 0.0:
        return 0.0
    return float((s.square().sum() / (top * top)).item())


def stable_ranks(model: nn.Module, names) -> dict[str, float]:
    """Stable rank of the weight of every layer in ``names`` (clean module FQNs), equal on all ranks.

    The full weights come from ONE collective for all layers
    (:func:`dist_sparse.distributed.batched_gather_full`), whatever the layout (plain, DDP, FSDP2,
    ZeRO-1/2/3); every rank then runs the same float64 CPU routine on the same numbers. Collective:
    every rank must call it with the same names.
    """
    want = list(names)
    weights = {}
    for name, _, _, w in iter_weight_layers(model):
        if name in want:
            weights[name] = w
    missing = [n for n in want if n not in weights]
    if missing:
        raise KeyError(f"stable_ranks: no weight layer named {missing[:3]}")
    full = D.batched_gather_full({n: weights[n] for n in want}, dtype=torch.float64)
    return {n: stable_rank(full[n]) for n in want}


def sharded_sigma_max(row_shards, iters: int = 100, tol: float = 0.0, seed: int = 0, all_reduce=None,
                      v0: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
    """Largest singular value of ``W = cat(row_shards)`` by power iteration on ``W^T W`` (float64).

    ``v`` is replicated; each shard contributes ``W_i^T (W_i v)`` and the contributions are summed
    (``all_reduce``: a callable that sums a tensor over the ranks that hold the shards, e.g.
    ``lambda t: dist.all_reduce(t) or t``; None: the shards given here are all of ``W``, summed in
    this process). The start vector is drawn from ``seed`` (the same on every rank) unless ``v0``
    (a warm start) is given. Stops after ``iters`` iterations or when the estimate changes by less
    than ``tol`` relative. Returns ``(sigma_max, v)``.
    """
    shards = [s.detach().to("cpu", torch.float64).reshape(s.shape[0], -1) for s in row_shards]
    n = shards[0].shape[1]
    if v0 is None:
        v = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    else:
        v = v0.detach().to("cpu", torch.float64).clone()
    v /= v.norm()
    est = 0.0
    for _ in range(iters):
        z = sum((s.T @ (s @ v) for s in shards), torch.zeros(n, dtype=torch.float64))
        if all_reduce is not None:
            z = all_reduce(z)
        lam = float(z.norm())  # = sigma_max^2 once v is the top right singular vector
        if lam == 0.0:
            return 0.0, v
        v = z / lam
        new = math.sqrt(lam)
        if tol and est and abs(new - est) <= tol * new:
            est = new
            break
        est = new
    return est, v
