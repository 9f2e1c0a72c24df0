"""Masks for sparse training: which tensors, how sparse each one is, and how masks change.

Pure functions on tensors and shapes, no training logic. The controllers in
:mod:`dist_sparse.methods.rigl` (RigL, SET, Static, GMP) are built from these pieces:

* :func:`sparsifiable_parameters` picks the target weights by FQN globs;
* :func:`layer_densities` resolves a global sparsity into per-layer densities (uniform or ERK,
  see ``docs/rigl.md``), :func:`active_count` turns a density into an exact count ``A``;
* :func:`random_mask` draws an initial mask with exactly ``A`` ones from a seeded generator;
* :func:`topk_mask` and :func:`drop_grow` make the drop / grow decisions with a deterministic
  tie-break (score descending, flat index ascending), identical on CPU and CUDA.

Counting convention (same as the RigL reference): a layer with N entries at sparsity s keeps
``A = N - floor(s * N)`` entries.
"""
from __future__ import annotations

import fnmatch
import hashlib
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

__all__ = ["stable_seed", "make_generator", "sparsifiable_parameters", "match_any", "raw_erk_score",
           "uniform_densities", "erk_densities", "layer_densities", "active_count", "random_mask",
           "topk_mask", "drop_grow", "DropGrow", "magnitude_prune", "mask_checksum", "pack_mask",
           "unpack_mask", "sparse_flops_fraction"]


# ------------------------------------------------------------------------------------------------
# Seeds
# ------------------------------------------------------------------------------------------------


def stable_seed(*parts: object) -> int:
    """A 63-bit seed that depends only on ``parts`` (never on Python's per-process ``hash``).

    Args:
        parts: values whose ``str()`` forms the key, e.g. ``(seed, "layer1.0.conv1.weight", step)``.

    Returns:
        A non-negative int < 2**63, identical in every process and on every machine.
    """
    key = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def make_generator(*parts: object) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`stable_seed` of ``parts``.

    Random draws are always made on the CPU and then moved, so masks do not depend on the device.

    Args:
        parts: the seed key (see :func:`stable_seed`).

    Returns:
        A seeded CPU generator.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(stable_seed(*parts))
    return gen


# ------------------------------------------------------------------------------------------------
# Which tensors are sparse
# ------------------------------------------------------------------------------------------------


def match_any(name: str, patterns: Iterable[str]) -> bool:
    """True when ``name`` matches one of the shell-style globs ``patterns`` (case-sensitive)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _candidate_weights(model: nn.Module, sparse_embeddings: bool) -> set[int]:
    """ids of the weight tensors of Conv / Linear / attention-projection (/ Embedding) modules."""
    ids: set[int] = set()
    embedding_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            if isinstance(getattr(module, "weight", None), torch.Tensor):
                ids.add(id(module.weight))
        elif isinstance(module, nn.MultiheadAttention):
            for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                w = getattr(module, attr, None)
                if isinstance(w, torch.Tensor):
                    ids.add(id(w))
        elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            embedding_ids.add(id(module.weight))
    if sparse_embeddings:
        ids |= embedding_ids
    else:
        ids -= embedding_ids  # an output projection tied to the embedding stays dense too
    return ids


def sparsifiable_parameters(model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                            sparse_embeddings: bool = False) -> list[tuple[str, nn.Parameter]]:
    """The weights a sparse method masks, in model order.

    Candidates are the weights of Conv (any kernel, incl. depthwise), Linear (incl. attention output
    projections) and ``nn.MultiheadAttention`` input projections, plus Embedding weights when
    ``sparse_embeddings``. Biases, norm affine parameters, positional embeddings and class tokens are
    never candidates. Of the candidates, those whose FQN matches an ``include`` glob and no
    ``exclude`` glob are returned. A tensor shared by several modules appears once, under its first
    name.

    Args:
        model: the plain (unwrapped) module.
        include: FQN globs, e.g. ``["*"]`` or ``["layer*.conv*.weight", "fc.weight"]``.
        exclude: FQN globs removed afterwards, e.g. ``["head.weight"]``.
        sparse_embeddings: also sparsify ``nn.Embedding`` tables (and a projection tied to them).

    Returns:
        ``[(fqn, parameter), ...]`` in ``model.named_parameters()`` order.
    """
    cand = _candidate_weights(model, sparse_embeddings)
    out = []
    for name, p in model.named_parameters():
        if id(p) in cand and match_any(name, include) and not match_any(name, exclude):
            out.append((name, p))
    return out


# ------------------------------------------------------------------------------------------------
# Sparsity distributions
# ------------------------------------------------------------------------------------------------


def active_count(numel: int, density: float) -> int:
    """Entries kept by a layer of ``numel`` entries at ``density``: ``N - floor((1 - d) * N)``.

    Args:
        numel: N, the number of entries.
        density: d in [0, 1].

    Returns:
        The exact active count A (reference rounding: floor of the number of zeros).
    """
    return int(numel - math.floor((1.0 - density) * numel))


def raw_erk_score(shape: Sequence[int], power_scale: float = 1.0) -> float:
    """ERK raw score ``(sum of dims / product of dims) ** power_scale`` of a weight shape.

    For a Linear layer (n_out, n_in) this is the Erdős–Rényi score (n_in + n_out) / (n_in * n_out);
    for a conv (n_out, n_in, k_h, k_w) it adds the kernel sides to the sum and product.

    Args:
        shape: the weight shape.
        power_scale: exponent p (0 gives uniform, 1 the paper's ERK).

    Returns:
        The raw score r.
    """
    return (float(sum(shape)) / float(math.prod(shape))) ** power_scale


def uniform_densities(shapes: Mapping[str, Sequence[int]], sparsity: float,
                      overrides: Optional[Mapping[str, float]] = None) -> dict[str, float]:
    """Every layer at density ``1 - sparsity``, except overridden ones (name -> sparsity).

    Args:
        shapes: layer name -> weight shape, in model order.
        sparsity: global target S in [0, 1).
        overrides: layer name -> its own sparsity (e.g. 0.0 for a dense first layer).

    Returns:
        layer name -> density.
    """
    overrides = dict(overrides or {})
    return {n: 1.0 - overrides.get(n, sparsity) for n in shapes}


def erk_densities(shapes: Mapping[str, Sequence[int]], sparsity: float,
                  overrides: Optional[Mapping[str, float]] = None,
                  power_scale: float = 1.0) -> tuple[dict[str, float], list[str]]:
    """Erdős–Rényi–Kernel densities with the reference's "make the densest layer dense" loop.

    Overridden layers keep their own sparsity and are left out of the budget. The others share the
    budget ``sum(N - floor(S * N))``: density ``eps * r`` with ``r`` from :func:`raw_erk_score`;
    while the largest ``eps * r`` exceeds 1, every layer with the largest ``r`` becomes dense and
    eps is solved again.

    Args:
        shapes: layer name -> weight shape, in model order.
        sparsity: global target S in [0, 1).
        overrides: layer name -> sparsity, outside the ERK budget.
        power_scale: ERK exponent p.

    Returns:
        ``(densities, forced_dense)``: layer name -> density in (0, 1], and the names the loop made
        dense (in model order).
    """
    overrides = dict(overrides or {})
    free = [n for n in shapes if n not in overrides]
    numel = {n: math.prod(shapes[n]) for n in shapes}
    raw = {n: raw_erk_score(shapes[n], power_scale) for n in free}
    dense: set[str] = set()
    eps = 0.0
    while True:
        rhs, divisor = 0.0, 0.0
        for n in free:
            zeros = math.floor(sparsity * numel[n])
            if n in dense:
                rhs -= zeros
            else:
                rhs += numel[n] - zeros
                divisor += raw[n] * numel[n]
        if divisor == 0.0:  # every layer went dense: the budget allows a dense model
            break
        eps = rhs / divisor
        rest = [raw[n] for n in free if n not in dense]
        top = max(rest)
        if eps * top > 1.0:
            dense.update(n for n in free if n not in dense and raw[n] == top)
        else:
            break
    out = {}
    for n in shapes:
        if n in overrides:
            out[n] = 1.0 - overrides[n]
        elif n in dense:
            out[n] = 1.0
        else:
            out[n] = eps * raw[n]
    return out, [n for n in free if n in dense]


def layer_densities(shapes: Mapping[str, Sequence[int]], sparsity: float, distribution: str = "erk",
                    first_layer_dense: Optional[bool] = None, last_layer_dense: bool = False,
                    overrides: Optional[Mapping[str, float]] = None,
                    power_scale: float = 1.0) -> dict[str, float]:
    """Resolve a global sparsity into per-layer densities (the one place this is computed).

    Args:
        shapes: layer name -> weight shape, in model order (the first entry is the "first layer").
        sparsity: global target S in [0, 1) over the listed tensors.
        distribution: ``"uniform"`` or ``"erk"``.
        first_layer_dense: keep the first layer dense; None = auto (dense for uniform when there is
            more than one layer, sparse for ERK — the reference behaviour).
        last_layer_dense: keep the last layer (the classifier) dense.
        overrides: FQN glob -> sparsity; the first matching glob wins; overridden layers are outside
            the ERK budget.
        power_scale: ERK exponent.

    Returns:
        layer name -> density in [0, 1].
    """
    names = list(shapes)
    fixed: dict[str, float] = {}
    for n in names:
        for pattern, s in (overrides or {}).items():
            if fnmatch.fnmatchcase(n, pattern):
                fixed[n] = float(s)
                break
    if first_layer_dense is None:
        first_layer_dense = distribution == "uniform" and len(names) > 1
    if names and first_layer_dense:
        fixed.setdefault(names[0], 0.0)
    if names and last_layer_dense:
        fixed.setdefault(names[-1], 0.0)
    if distribution == "uniform":
        return uniform_densities(shapes, sparsity, fixed)
    if distribution == "erk":
        return erk_densities(shapes, sparsity, fixed, power_scale)[0]
    raise ValueError(f"unknown sparsity distribution {distribution!r}; expected 'uniform' or 'erk'")


def sparse_flops_fraction(layer_flops: Mapping[str, float], densities: Mapping[str, float],
                          other_flops: float = 0.0) -> float:
    """Sparse / dense forward FLOPs when each layer's FLOPs scale with its density.

    Args:
        layer_flops: layer name -> dense forward FLOPs of that layer.
        densities: layer name -> density (layers missing here count as dense).
        other_flops: FLOPs that do not shrink (dense layers not listed, norms, activations).

    Returns:
        f_S / f_D.
    """
    dense = sum(layer_flops.values()) + other_flops
    sparse = sum(f * densities.get(n, 1.0) for n, f in layer_flops.items()) + other_flops
    return sparse / dense


# ------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------


def random_mask(shape: Sequence[int], n_active: int, generator: torch.Generator) -> torch.Tensor:
    """A boolean CPU mask of ``shape`` with exactly ``n_active`` True entries, chosen uniformly.

    Args:
        shape: the weight shape.
        n_active: number of ones, 0 <= n_active <= numel.
        generator: a CPU generator (see :func:`make_generator`).

    Returns:
        A bool tensor on the CPU.
    """
    numel = math.prod(shape)
    if not 0 <= n_active <= numel:
        raise ValueError(f"n_active={n_active} outside [0, {numel}]")
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[torch.randperm(numel, generator=generator)[:n_active]] = True
    return flat.view(*shape)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` largest scores; ties go to the lowest flat index.

    Uses a stable descending sort, so the result is the same on every device and every run.
    Entries scored ``-inf`` are only chosen when fewer than ``k`` finite scores exist.

    Args:
        scores: a float tensor of any shape.
        k: how many to select, 0 <= k <= numel.

    Returns:
        A bool tensor shaped like ``scores`` with exactly ``k`` True entries.
    """
    flat = scores.reshape(-1)
    if not 0 <= k <= flat.numel():
        raise ValueError(f"k={k} outside [0, {flat.numel()}]")
    out = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    if k:
        order = torch.sort(flat, descending=True, stable=True).indices
        out[order[:k]] = True
    return out.view(scores.shape)


@dataclass
class DropGrow:
    """Result of one drop/grow decision for one layer (all bool tensors shaped like the weight)."""

    mask: torch.Tensor  # the new mask: kept | grown
    kept: torch.Tensor  # old active positions that stay
    grown: torch.Tensor  # positions selected by the grow score (may include just-dropped ones)
    n_drop: int  # k: number dropped == number grown
    n_regrown: int  # just-dropped positions that were grown again (keep value and state)
    n_zero_score: int  # grown positions whose grow score was exactly 0


def drop_grow(mask: torch.Tensor, drop_score: torch.Tensor, grow_score: torch.Tensor, k: int) -> DropGrow:
    """Drop the ``k`` active entries with the lowest ``drop_score``, grow ``k`` by ``grow_score``.

    The kept set is the ``a - k`` active entries with the largest drop score (inactive entries can
    never be kept). Growth picks the ``k`` largest grow scores among all non-kept entries, which
    includes the ones just dropped. Ties go to the lowest flat index on both sides.

    Args:
        mask: current bool mask with ``a`` True entries.
        drop_score: keep score per entry, e.g. ``|W|`` (only active entries matter).
        grow_score: grow score per entry, e.g. ``|dense grad|`` or random numbers.
        k: number to drop and grow, 0 <= k <= a.

    Returns:
        A :class:`DropGrow`; its ``mask`` has exactly ``a`` True entries.
    """
    mask = mask.bool()
    active = int(mask.sum())
    if not 0 <= k <= active:
        raise ValueError(f"cannot drop {k} of {active} active entries")
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float32, device=mask.device)
    keep_score = torch.where(mask, drop_score.float(), neg_inf)
    kept = topk_mask(keep_score, active - k)
    gscore = grow_score.float()
    grown = topk_mask(torch.where(kept, neg_inf, gscore), k)
    new = kept | grown
    return DropGrow(mask=new, kept=kept, grown=grown, n_drop=k,
                    n_regrown=int((grown & mask).sum()), n_zero_score=int((grown & (gscore == 0)).sum()))


def magnitude_prune(mask: torch.Tensor, magnitude: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Keep the ``n_keep`` active entries with the largest magnitude (pruned entries stay pruned).

    Args:
        mask: current bool mask.
        magnitude: ``|W|``.
        n_keep: entries to keep, at most the current active count.

    Returns:
        The new bool mask with exactly ``n_keep`` True entries.
    """
    active = int(mask.sum())
    if not 0 <= n_keep <= active:
        raise ValueError(f"cannot keep {n_keep} of {active} active entries")
    neg_inf = torch.tensor(float("-inf"), dtype=torch.float32, device=mask.device)
    return topk_mask(torch.where(mask.bool(), magnitude.float(), neg_inf), n_keep)


def mask_checksum(mask: torch.Tensor) -> torch.Tensor:
    """Cheap fingerprint of a mask: ``[count, sum of flat indices of ones mod 2**61]`` as int64.

    Args:
        mask: a bool tensor.

    Returns:
        An int64 tensor of two entries (on the mask's device).
    """
    flat = mask.reshape(-1)
    idx = torch.nonzero(flat).reshape(-1).to(torch.int64)
    return torch.stack([idx.numel() * torch.ones((), dtype=torch.int64, device=mask.device),
                        torch.remainder(idx * 2654435761, (1 << 61) - 1).sum()])


def pack_mask(mask: torch.Tensor) -> dict:
    """Bit-pack a bool mask for checkpoints: ``{"shape": [...], "bits": uint8 CPU tensor}``."""
    import numpy as np

    bits = np.packbits(mask.detach().reshape(-1).cpu().numpy().astype(np.uint8))
    return {"shape": list(mask.shape), "bits": torch.from_numpy(bits)}


def unpack_mask(packed: dict) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a bool CPU tensor."""
    import numpy as np

    shape = [int(s) for s in packed["shape"]]
    n = math.prod(shape)
    flat = np.unpackbits(packed["bits"].numpy(), count=n).astype(bool)
    return torch.from_numpy(flat.copy()).view(*shape)
