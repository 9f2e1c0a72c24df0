"""Collectives over possibly sharded tensors: the only module that knows parameter layouts.

A tensor handed to these functions is one of three layouts (``layout(t)`` names it):

* ``"plain"`` - an ordinary tensor that is *replicated*: the same full value on every rank. Single
  process, DDP parameters and gradients, DeepSpeed ZeRO-1/2 parameters. Statistics need no collective.
* ``"dtensor"`` - an FSDP2 ``DTensor``: each rank holds a ``torch.chunk`` of the full tensor along the
  ``Shard`` dims of its placements (``Replicate`` mesh dims hold copies). Statistics reduce the local
  value over the ``Shard`` mesh dims only.
* ``"zero3"`` - a DeepSpeed ZeRO-3 parameter: each rank holds ``ceil(numel / world)`` elements of the
  flattened tensor in ``param.ds_tensor``; the last partitions are zero-padded. Statistics use only the
  valid (unpadded) part and reduce over ``param.ds_process_group``.

Every function also works in a single process without an initialised process group. Methods call
only this module; they never call ``torch.distributed`` themselves. Every rank must make the same
calls in the same order (they are collectives whenever the layout is sharded).

Example::

    from dist_sparse import distributed as D
    density = D.full_count_nonzero(w) / D.full_numel(w)
    keep = D.global_topk_mask(w.abs(), k)            # shaped like D.local_view(w), k ones in total
    stats = D.batched_full_reduce(weights, lambda x: x.double().square().sum().reshape(1))  # 1 collective
    D.mul_param_(w, mask); D.mul_optimizer_state_(w, optimizer, mask)   # any layout, no communication
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import pickle
from collections.abc import Callable, Mapping
from typing import Any, Iterator

import torch
import torch.distributed as dist

__all__ = [
    "world_size", "rank", "is_main", "barrier", "shutdown", "layout", "local_view", "distribute_like", "gather_full",
    "full_grad", "full_shape", "full_numel", "full_sum", "full_sum_of_squares", "full_count_nonzero", "full_mean",
    "full_norm", "global_kth_value", "global_topk_mask", "all_reduce_coalesced", "broadcast_object",
    "assert_same_across_ranks", "optimizer_is_deepspeed", "is_deepspeed_param", "mul_grad_",
    "mul_optimizer_partitions_", "count_where", "batched_full_reduce", "global_sum", "broadcast_buffers",
    "mul_param_", "mul_optimizer_state_", "mask_grad_", "add_grad_", "full_state_dict", "batched_gather_full",
]

try:  # torch >= 2.4 exposes DTensor publicly; older versions keep it under _tensor
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # pragma: no cover - exercised only on old torch
    from torch.distributed._tensor import DTensor, Replicate, Shard  # type: ignore
    from torch.distributed._tensor.placement_types import Partial  # type: ignore


# ------------------------------------------------------------------------------------------------
# Process-group basics
# ------------------------------------------------------------------------------------------------


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes (1 without an initialised process group)."""
    return dist.get_world_size() if _initialized() else 1


def rank() -> int:
    """Global rank of this process (0 without an initialised process group)."""
    return dist.get_rank() if _initialized() else 0


def is_main() -> bool:
    """True on global rank 0 (and in a single process)."""
    return rank() == 0


def shutdown(wait: bool = True) -> None:
    """End the process group cleanly (every rank, at the end of an entry point).

    A process that exits with a live process group can abort in its exit handlers (``terminate called
    without an active exception``), and torchrun / Slurm then report a finished job as failed. ``wait``
    meets the other ranks first; pass False on an error path (the others may never arrive).
    """
    if _initialized():
        try:
            if wait and dist.get_world_size() > 1:
                dist.barrier()
        finally:
            dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------------------
# Layouts: which part of the full tensor lives on this rank
# ------------------------------------------------------------------------------------------------


def layout(t: torch.Tensor) -> str:
    """The layout of ``t``: ``"dtensor"`` (FSDP2), ``"zero3"`` (DeepSpeed partition) or ``"plain"``.

    Args:
        t: a parameter, gradient or any tensor.

    Returns:
        one of ``"dtensor"``, ``"zero3"``, ``"plain"``.
    """
    if isinstance(t, DTensor):
        return "dtensor"
    if hasattr(t, "ds_id") and getattr(t, "ds_tensor", None) is not None:
        return "zero3"
    if getattr(t, "_fsdp_flattened", False):
        raise NotImplementedError(
            "FSDP1 flat parameters are not supported by dist_sparse.distributed statistics; use FSDP2 "
            "(fsdp_version: 2 in launch/fsdp.yaml), or gather_full(param, module=<FSDP root>)")
    return "plain"


def _zero3_gathered(p: torch.Tensor) -> bool:
    """A ZeRO-3 parameter whose full data is present now (persistent small parameters, or inside a gather)."""
    return layout(p) == "zero3" and p.ds_numel > 0 and p.data.numel() == p.ds_numel


def _zero3_span(p: torch.Tensor) -> tuple[int, int, Any]:
    """(start, length, group) of the valid flat elements of ZeRO-3 param ``p`` held by this rank."""
    part = p.ds_tensor.ds_numel if hasattr(p.ds_tensor, "ds_numel") else p.ds_tensor.numel()
    group = getattr(p, "ds_process_group", None)
    r = dist.get_rank(group=group) if _initialized() else 0
    start = part * r
    length = max(0, min(part, p.ds_numel - start))
    return start, length, group


def _dtensor_ranges(t: DTensor) -> list[tuple[int, int]]:
    """Per dim (start, length) of this rank's block of the full tensor (torch.chunk semantics)."""
    ranges = [(0, s) for s in t.shape]
    mesh = t.device_mesh
    coord = mesh.get_coordinate()
    if coord is None:  # this rank is not part of the mesh: it holds nothing
        return [(0, 0) for _ in t.shape]
    for mdim, pl in enumerate(t.placements):
        if isinstance(pl, Shard):
            d = pl.dim if pl.dim >= 0 else pl.dim + t.ndim
            start, length = ranges[d]
            n = mesh.size(mdim)
            chunk = math.ceil(length / n) if length else 0
            lo = min(length, chunk * coord[mdim])
            hi = min(length, lo + chunk)
            ranges[d] = (start + lo, hi - lo)
        elif not isinstance(pl, (Replicate, Partial)):
            raise NotImplementedError(f"DTensor placement {pl!r} is not supported (only Shard/Replicate)")
    return ranges


def _reduce_groups(t: DTensor) -> list[Any]:
    """Process groups over which local partial statistics of ``t`` must be summed."""
    mesh = t.device_mesh
    return [mesh.get_group(i) for i, pl in enumerate(t.placements)
            if isinstance(pl, Shard) and mesh.size(i) > 1]


def local_view(param: torch.Tensor) -> torch.Tensor:
    """The part of the full tensor stored on this rank, as a plain tensor (writes go to the shard).

    Args:
        param: a plain tensor, an FSDP2 DTensor or a ZeRO-3 parameter.

    Returns:
        the tensor itself (plain), ``to_local()`` (DTensor) or the valid, unpadded 1-D slice of the
        ZeRO-3 partition ``param.ds_tensor``.
    """
    kind = layout(param)
    if kind == "dtensor":
        return param.detach().to_local()  # shares storage with the shard; no autograd view
    if kind == "zero3":
        _, length, _ = _zero3_span(param)
        return param.ds_tensor.data.view(-1).narrow(0, 0, length)
    return param


def distribute_like(full: torch.Tensor, param: torch.Tensor, as_dtensor: bool = False) -> torch.Tensor:
    """Cut a full tensor (e.g. a mask) into the piece that matches ``local_view(param)``.

    No communication: every rank must hold the same ``full`` (see :func:`broadcast_object` /
    :func:`assert_same_across_ranks`).

    Args:
        full: a tensor with the full shape of ``param``.
        param: the (possibly sharded) parameter whose layout to follow.
        as_dtensor: for a DTensor ``param``, return a DTensor with the same mesh and placements
            (for ``param.mul_(mask)``) instead of the plain local block.

    Returns:
        a tensor on ``full``'s device shaped like ``local_view(param)`` (or a DTensor).
    """
    kind = layout(param)
    shape = _full_shape(param)
    if tuple(full.shape) != tuple(shape):
        raise ValueError(f"distribute_like: full tensor has shape {tuple(full.shape)}, "
                         f"the parameter's full shape is {tuple(shape)}")
    if kind == "dtensor":
        block = full
        for d, (start, length) in enumerate(_dtensor_ranges(param)):
            block = block.narrow(d, start, length)
        block = block.contiguous()
        if tuple(block.shape) != tuple(param.to_local().shape):
            raise RuntimeError(f"distribute_like: computed block {tuple(block.shape)} does not match the "
                               f"local shard {tuple(param.to_local().shape)} (placements {param.placements})")
        if as_dtensor:
            return DTensor.from_local(block, param.device_mesh, param.placements, run_check=False,
                                      shape=param.shape, stride=param.stride())
        return block
    if kind == "zero3":
        start, length, _ = _zero3_span(param)
        return full.reshape(-1).narrow(0, start, length).contiguous()
    return full


def full_shape(t: torch.Tensor) -> torch.Size:
    """The shape of the full tensor (``param.ds_shape`` for a ZeRO-3 partition; no communication)."""
    if layout(t) == "zero3":
        return t.ds_shape
    return t.shape


_full_shape = full_shape


def _all_reduce_local(value: torch.Tensor, t: torch.Tensor, op: Any = None) -> torch.Tensor:
    """Combine per-rank partial statistics of ``t`` (a tensor of any shape) over its shard groups."""
    if not _initialized():
        return value
    op = dist.ReduceOp.SUM if op is None else op
    kind = layout(t)
    if kind == "dtensor":
        for g in _reduce_groups(t):
            dist.all_reduce(value, op=op, group=g)
    elif kind == "zero3":
        _, _, g = _zero3_span(t)
        if dist.get_world_size(group=g) > 1:
            dist.all_reduce(value, op=op, group=g)
    return value


# ------------------------------------------------------------------------------------------------
# Gather the full tensor
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def gather_full(param: torch.Tensor, writeback: bool = False,
                module: torch.nn.Module | None = None) -> Iterator[torch.Tensor]:
    """Context manager yielding the full, plain tensor of a possibly sharded parameter.

    A collective for sharded layouts: every rank must enter it. With ``writeback=True`` in-place
    changes of the yielded tensor are written back into this rank's shard on exit (and, under
    DeepSpeed, into the optimizer's fp32 master copy, so the next step does not undo them). Changes
    must be identical on all ranks; under ZeRO-3 rank 0's version wins.

    Args:
        param: a plain tensor/parameter, an FSDP2 DTensor, a ZeRO-3 parameter, or (with ``module``)
            an FSDP1 ``use_orig_params`` parameter.
        writeback: write modifications back into the shards on exit.
        module: FSDP1 only - the FSDP-wrapped module owning ``param`` (best effort, via
            ``summon_full_params``).

    Yields:
        the full tensor (``param.data`` itself for plain tensors).
    """
    if getattr(param, "_fsdp_flattened", False) and not isinstance(param, DTensor):
        if module is None:
            raise NotImplementedError("gather_full on an FSDP1 parameter needs module=<its FSDP-wrapped module>")
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(module, writeback=writeback, recurse=True):
            yield param.data
        return
    kind = layout(param)
    if kind == "dtensor":
        full = param.detach().full_tensor()
        yield full
        if writeback:
            with torch.no_grad():
                local_view(param).copy_(distribute_like(full, param))
        return
    if kind == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0 if writeback else None):
            yield param.data
            if writeback:
                _set_ds_master(param, param.data)
        return
    data = param.data if isinstance(param, torch.nn.Parameter) else param
    yield data
    if writeback:
        _set_ds_master(param, data)


def _set_ds_master(param: torch.Tensor, full: torch.Tensor) -> None:
    """Under DeepSpeed, copy ``full`` into the optimizer's fp32 master partition of ``param``."""
    # ZeRO-1/2 give every parameter an _hp_mapping (None where this rank's partition holds none of it)
    if hasattr(param, "_hp_mapping") or getattr(param, "_z3_optimizer", None) is not None:
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, full)


def full_grad(param: torch.Tensor) -> torch.Tensor | None:
    """The full, averaged gradient of ``param`` as a plain tensor on every rank (or None).

    Under DeepSpeed ZeRO the gradient lives in the optimizer's partitions (``param.grad`` is None);
    call this between the backward pass and the optimizer step. fp16 gradients come back divided by
    DeepSpeed's current loss scale (the true gradient, as on every other backend).

    Args:
        param: a parameter of any layout.

    Returns:
        the full gradient (a copy for sharded layouts), or None when there is none.
    """
    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):  # collective under ZeRO-1/2/3
        from deepspeed.utils import safe_get_full_grad

        g = safe_get_full_grad(param)
        # DeepSpeed keeps fp16 gradients multiplied by the loss scale until its step
        scale = _ds_loss_scale(getattr(param, "_z3_optimizer", None) or getattr(param, "_zero_optimizer", None))
        return g if g is None or scale == 1.0 else g / scale
    g = param.grad
    if g is None:
        return None
    if isinstance(g, DTensor):
        return g.full_tensor()
    return g


# ------------------------------------------------------------------------------------------------
# Exact full-tensor statistics
# ------------------------------------------------------------------------------------------------


def full_numel(t: torch.Tensor) -> int:
    """Number of elements of the full tensor (ZeRO padding excluded).

    Args:
        t: a tensor of any layout.

    Returns:
        the element count as an int (no communication).
    """
    return int(math.prod(_full_shape(t)))


def _stat(t: torch.Tensor, fn) -> torch.Tensor:
    local = local_view(t).detach()
    value = fn(local).reshape(1)
    return _all_reduce_local(value, t).reshape(())


def full_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of all elements of the full tensor, accumulated in float64.

    Args:
        t: a tensor of any layout.

    Returns:
        a 0-dim float64 tensor on ``t``'s device, equal on all ranks.
    """
    return _stat(t, lambda x: x.sum(dtype=torch.float64))


def full_sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    """Sum of squared elements of the full tensor (float64).

    Args:
        t: a tensor of any layout.

    Returns:
        a 0-dim float64 tensor, equal on all ranks.
    """
    return _stat(t, lambda x: x.double().square().sum())


def full_count_nonzero(t: torch.Tensor) -> int:
    """Number of non-zero elements of the full tensor (ZeRO padding excluded).

    Args:
        t: a tensor of any layout (a mask, a weight, a gradient).

    Returns:
        the count as an int, equal on all ranks.
    """
    return int(_stat(t, lambda x: torch.count_nonzero(x).to(torch.int64)).item())


def full_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of the full tensor (float64, 0-dim); NaN for an empty tensor."""
    n = full_numel(t)
    s = full_sum(t)
    return s / n if n else s * float("nan")


def full_norm(t: torch.Tensor) -> torch.Tensor:
    """Euclidean (Frobenius) norm of the full tensor (float64, 0-dim)."""
    return full_sum_of_squares(t).sqrt()


def count_where(t: torch.Tensor, predicate: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Number of entries of the full tensor for which ``predicate`` holds (exact, padding excluded).

    Args:
        t: a tensor of any layout.
        predicate: maps a plain tensor (this rank's ``local_view(t)``, detached) to a bool tensor of the
            same shape, element-wise, e.g. ``lambda x: x.abs() < 1e-3``. It is also called on empty
            pieces (a rank that holds nothing of ``t``).

    Returns:
        the count as an int, equal on all ranks (one tiny collective on sharded layouts).
    """
    def count(local: torch.Tensor) -> torch.Tensor:
        hit = predicate(local)
        if not isinstance(hit, torch.Tensor) or tuple(hit.shape) != tuple(local.shape):
            got = tuple(hit.shape) if isinstance(hit, torch.Tensor) else type(hit).__name__
            raise ValueError(f"count_where: the predicate must return a tensor shaped like its input "
                             f"{tuple(local.shape)} (element-wise), got {got}")
        return torch.count_nonzero(hit).to(torch.int64)

    return int(_stat(t, count).item())


def _contributes(t: torch.Tensor) -> bool:
    """Whether this rank's ``local_view(t)`` is the one copy of its elements counted in a world-wide sum.

    Plain tensors are replicated: only global rank 0 counts. A DTensor counts on the ranks whose mesh
    coordinate is 0 along every ``Replicate`` dim (the ``Shard`` dims partition the elements). A ZeRO-3
    parameter counts on the ranks of the partition group that holds global rank 0 (the whole world for
    ordinary ZeRO-3; one replica when the partitions are replicated over several groups).
    """
    kind = layout(t)
    if kind == "plain":
        return rank() == 0
    if kind == "dtensor":
        coord = t.device_mesh.get_coordinate()
        if coord is None:
            return False
        for mdim, pl in enumerate(t.placements):
            if isinstance(pl, Partial):
                raise NotImplementedError(
                    "batched_full_reduce: a DTensor with a Partial placement holds unreduced summands; a "
                    "statistic such as a sum of squares is not additive over them - redistribute it first")
            if isinstance(pl, Replicate) and coord[mdim] != 0:
                return False
        return True
    _, _, group = _zero3_span(t)
    if not _initialized() or group is None or dist.get_world_size(group=group) == world_size():
        return True
    return 0 in dist.get_process_group_ranks(group)


def _comm_device(dev: torch.device) -> torch.device:
    """The device a collective on a tensor from ``dev`` must use (NCCL needs CUDA tensors)."""
    if _initialized() and dev.type != "cuda" and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def batched_full_reduce(tensors: Mapping[str, torch.Tensor],
                        fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full-tensor statistics of many (possibly sharded) tensors with one collective.

    For every name, ``fn(local_view(t))`` is a partial statistic of this rank's piece; the partials of
    all names are flattened together and summed by ONE ``all_reduce`` over the world (one per output
    dtype if ``fn`` returns several dtypes). Each element of a full tensor is counted exactly once:
    replicated (plain) tensors contribute on rank 0 only, FSDP2 DTensors contribute their shard on
    the coordinate-0 ranks of ``Replicate`` mesh dims, ZeRO-3 parameters their valid (unpadded) slice.
    Layouts may be mixed freely in one call.

    ``fn`` MUST be additive over elements: for any split of a tensor into disjoint pieces,
    ``fn(whole) == sum(fn(piece))`` (sums, sums of squares, counts, histograms with fixed bins - not
    means, norms, maxima). It must return a tensor of the same shape and dtype on every rank and for
    every piece, including an empty one (a rank may hold nothing of a tensor). Use float64 or int64
    for results that do not depend on the order of summation. Derive means/norms afterwards, e.g.
    ``out[n][0].sqrt()``. Collective: every rank passes the same names in the same order. (A DTensor's
    mesh is taken to hold the only copy of it: no other mesh may hold a replica of the same tensor.)

    Args:
        tensors: name -> tensor of any layout (e.g. every layer's weight).
        fn: plain tensor -> statistic tensor of a fixed shape, e.g.
            ``lambda x: torch.stack([x.double().square().sum(), (x != 0).sum().double()])``.

    Returns:
        name -> the statistic of the FULL tensor (a new plain tensor shaped like ``fn``'s result, on
        its device), equal on all ranks.
    """
    parts: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        v = fn(local_view(t).detach())
        if not isinstance(v, torch.Tensor) or isinstance(v, DTensor):
            raise TypeError(f"batched_full_reduce: fn must return a plain tensor; for {name!r} it returned "
                            f"{type(v).__name__}")
        if v.dtype == torch.bool:
            raise TypeError(f"batched_full_reduce: fn returned a bool tensor for {name!r}; sums need a number "
                            "dtype (int64 for counts)")
        v = v.detach()
        parts[name] = v.clone() if _contributes(t) else torch.zeros_like(v)
    if world_size() == 1 or not parts:
        return parts
    groups: dict[torch.dtype, list[str]] = {}
    for name, v in parts.items():
        groups.setdefault(v.dtype, []).append(name)
    dev = _comm_device(next(iter(parts.values())).device)
    out: dict[str, torch.Tensor] = {}
    for names in groups.values():
        flat = torch.cat([parts[n].reshape(-1).to(dev) for n in names])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        off = 0
        for n in names:
            m = parts[n].numel()
            out[n] = flat[off:off + m].reshape(parts[n].shape).to(parts[n].device).clone()
            off += m
    return {n: out[n] for n in parts}


# ------------------------------------------------------------------------------------------------
# Exact order statistics without gathering: a multi-way search over order-preserving integer keys
# ------------------------------------------------------------------------------------------------

_PIVOTS = 255  # pivots per search round: one all-reduce of 255 counts narrows the range 256-fold


def _order_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys with the same order as the values of ``x`` (-0.0 == +0.0, NaN largest)."""
    if x.dtype == torch.bool or not (x.is_floating_point()):
        return x.to(torch.int64)
    if x.dtype == torch.float64:
        v = x + 0.0  # turns -0.0 into +0.0 so that both zeros are ties
        v = torch.where(torch.isnan(v), torch.full_like(v, float("nan")).abs(), v)
        bits = v.view(torch.int64)
        return torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)
    v = x.float() + 0.0
    v = torch.where(torch.isnan(v), torch.full_like(v, float("nan")).abs(), v)
    bits = v.view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _key_to_value(key: int, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_order_keys` for one key: a 0-dim tensor of ``like``'s dtype."""
    dev = like.device
    if like.dtype == torch.bool or not like.is_floating_point():
        return torch.tensor(key, dtype=torch.int64, device=dev).to(like.dtype)
    if like.dtype == torch.float64:
        bits = key ^ 0x7FFFFFFFFFFFFFFF if key < 0 else key
        return torch.tensor([bits], dtype=torch.int64, device=dev).view(torch.float64)[0]
    bits = key ^ 0x7FFFFFFF if key < 0 else key
    return torch.tensor([bits], dtype=torch.int32, device=dev).view(torch.float32)[0].to(like.dtype)


def _select_key(sorted_keys: torch.Tensor, k: int, t: torch.Tensor, lo: int, hi: int) -> int:
    """Smallest key v in [lo, hi] with (global count of keys <= v) >= k; ``sorted_keys`` is local."""
    while lo < hi:
        span = hi - lo
        npiv = min(_PIVOTS, span)
        # pivots strictly inside [lo, hi): p_j = lo + floor(span * j / (npiv + 1)) for j = 1..npiv, then hi
        piv = sorted({lo + (span * j) // (npiv + 1) for j in range(1, npiv + 1)} | {hi})
        pv = torch.tensor(piv, dtype=torch.int64, device=sorted_keys.device)
        counts = torch.searchsorted(sorted_keys, pv, right=True).to(torch.int64)
        counts = _all_reduce_local(counts, t)
        j = int(torch.nonzero(counts >= k)[0].item())  # exists: the last pivot is hi
        new_hi = piv[j]
        new_lo = piv[j - 1] + 1 if j > 0 else lo
        lo, hi = new_lo, new_hi
    return lo


def _key_bounds(keys: torch.Tensor, t: torch.Tensor) -> tuple[int, int]:
    """Global (min, max) of the keys (two tiny collectives on sharded layouts)."""
    big = torch.iinfo(torch.int64)
    mn = keys.min() if keys.numel() else torch.tensor(big.max, device=keys.device)
    mx = keys.max() if keys.numel() else torch.tensor(big.min, device=keys.device)
    mn = _all_reduce_local(mn.reshape(1).clone(), t, dist.ReduceOp.MIN if _initialized() else None)
    mx = _all_reduce_local(mx.reshape(1).clone(), t, dist.ReduceOp.MAX if _initialized() else None)
    return int(mn.item()), int(mx.item())


def _check_k(t: torch.Tensor, k: int, name: str) -> int:
    n = full_numel(t)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        if name == "global_topk_mask" and isinstance(k, int) and k == 0:
            return n
        raise ValueError(f"{name}: k = {k!r} is not allowed; expected an integer in [1, {n}] "
                         f"(the full tensor has {n} elements)")
    return n


def global_kth_value(t: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """The k-th largest (or smallest) value of the full, possibly sharded tensor.

    Exact and deterministic: an order-preserving integer key per element and a 256-way search whose
    every round all-reduces 255 counts (at most 4 rounds for 16/32-bit floats, 8 for float64), so
    memory stays O(local shard) - nothing is gathered.

    Args:
        t: a tensor of any layout; NaN counts as the largest value, -0.0 equals 0.0.
        k: 1-based rank, 1 <= k <= full_numel(t).
        largest: True for the k-th largest, False for the k-th smallest.

    Returns:
        a 0-dim tensor of ``t``'s dtype on ``t``'s device, equal on all ranks.
    """
    n = _check_k(t, k, "global_kth_value")
    local = local_view(t).detach().reshape(-1)
    keys = torch.sort(_order_keys(local)).values
    kk = n - k + 1 if largest else k
    lo, hi = _key_bounds(keys, t)
    return _key_to_value(_select_key(keys, kk, t, lo, hi), local)


def _global_flat_index(t: torch.Tensor) -> torch.Tensor:
    """Flat index in the full tensor of every element of ``local_view(t)`` (same shape, int64)."""
    kind = layout(t)
    local = local_view(t)
    if kind == "zero3":
        start, length, _ = _zero3_span(t)
        return torch.arange(start, start + length, device=local.device)
    if kind == "dtensor":
        shape = list(t.shape)
        strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
        idx = torch.zeros((), dtype=torch.int64, device=local.device)
        for d, (start, length) in enumerate(_dtensor_ranges(t)):
            ar = torch.arange(start, start + length, device=local.device) * strides[d]
            idx = idx.unsqueeze(-1) + ar if d else ar
        return idx.reshape(local.shape)
    return torch.arange(local.numel(), device=local.device).reshape(local.shape)


def global_topk_mask(t: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """A 0/1 mask shaped like ``local_view(t)`` with exactly ``k`` ones over the full tensor.

    The ones mark the k largest (or smallest) values. Ties at the threshold are broken by flat index
    of the full tensor: the lower index wins, exactly as a stable sort of the unsharded tensor. So the
    mask equals, shard by shard, the mask a single process computes on the full tensor.

    Args:
        t: scores of any layout (e.g. ``|w|`` or ``|grad|``).
        k: number of ones, 0 <= k <= full_numel(t).
        largest: keep the largest (True) or the smallest (False) values.

    Returns:
        a bool tensor shaped like ``local_view(t)`` on ``t``'s device.
    """
    n = _check_k(t, k, "global_topk_mask")
    local = local_view(t).detach()
    if k == 0:
        return torch.zeros(local.shape, dtype=torch.bool, device=local.device)
    keys = _order_keys(local)
    flat = torch.sort(keys.reshape(-1)).values
    lo, hi = _key_bounds(flat, t)
    kk = n - k + 1 if largest else k
    thr = _select_key(flat, kk, t, lo, hi)
    strict = keys > thr if largest else keys < thr
    n_strict = int(_all_reduce_local(strict.sum().to(torch.int64).reshape(1), t).item())
    need = k - n_strict  # >= 1 ties at the threshold still to take, lowest flat index first
    tie = keys == thr
    gidx = _global_flat_index(t)
    tie_idx = torch.sort(gidx[tie].reshape(-1)).values
    cut = _select_key(tie_idx, need, t, 0, max(0, n - 1))
    return strict | (tie & (gidx <= cut))


# ------------------------------------------------------------------------------------------------
# Replicated values: reductions, broadcasts and consistency checks
# ------------------------------------------------------------------------------------------------

_OPS = {"sum", "mean", "max", "min"}


def all_reduce_coalesced(d: dict[str, torch.Tensor], op: str = "sum") -> dict[str, torch.Tensor]:
    """All-reduce many tensors with one flattened collective per (dtype, device).

    Args:
        d: name -> plain tensor (e.g. per-layer local statistics).
        op: "sum", "mean" (sum / world size; floating tensors only), "max" or "min".

    Returns:
        name -> reduced tensor (new tensors, same shapes and dtypes; copies in a single process).
    """
    if op not in _OPS:
        raise ValueError(f"all_reduce_coalesced: op = {op!r} is not allowed; expected one of {sorted(_OPS)}")
    groups: dict[tuple, list[str]] = {}
    for name, v in d.items():
        if not isinstance(v, torch.Tensor) or isinstance(v, DTensor):
            raise TypeError(f"all_reduce_coalesced: {name!r} must be a plain tensor, got {type(v).__name__}")
        if op == "mean" and not v.is_floating_point():
            raise TypeError(f"all_reduce_coalesced: op='mean' needs floating tensors; {name!r} is {v.dtype}")
        groups.setdefault((v.dtype, v.device), []).append(name)
    out: dict[str, torch.Tensor] = {}
    ws = world_size()
    red = {"sum": "SUM", "mean": "SUM", "max": "MAX", "min": "MIN"}[op]
    for (_dtype, _dev), names in groups.items():
        flat = torch.cat([d[n].detach().reshape(-1) for n in names])
        if ws > 1:
            dist.all_reduce(flat, op=getattr(dist.ReduceOp, red))
            if op == "mean":
                flat /= ws
        off = 0
        for n in names:
            m = d[n].numel()
            out[n] = flat[off:off + m].reshape(d[n].shape).clone()
            off += m
    return {n: out[n] for n in d}


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return ``src``'s ``obj`` on every rank (picklable objects; identity in a single process).

    Args:
        obj: the value on ``src`` (ignored on other ranks).
        src: global rank that decides.

    Returns:
        the object from ``src``.
    """
    if world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    dev = None
    if dist.get_backend() == "nccl":
        dev = torch.device("cuda", torch.cuda.current_device())
    dist.broadcast_object_list(box, src=src, device=dev)
    return box[0]


def _digest(x: Any) -> str:
    if isinstance(x, DTensor):
        x = x.full_tensor()
    if isinstance(x, torch.Tensor):
        h = hashlib.sha1()
        t = x.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()
    if isinstance(x, (bytes, bytearray, memoryview)):
        return hashlib.sha1(bytes(x)).hexdigest()
    return hashlib.sha1(pickle.dumps(x, protocol=4)).hexdigest()


def assert_same_across_ranks(x: Any, what: str) -> str:
    """Raise unless ``x`` is bit-identical on every rank (compares SHA-1 digests).

    Args:
        x: a tensor (a DTensor is compared as its full tensor), bytes, or a picklable object.
        what: a name for the error message, e.g. ``"mask of layer1.0.conv1"``.

    Returns:
        the digest (hex), equal on all ranks.

    Raises:
        RuntimeError: naming ``what`` and which ranks hold which digest.
    """
    h = _digest(x)
    if world_size() == 1:
        return h
    hs: list[Any] = [None] * world_size()
    dist.all_gather_object(hs, h)
    if len(set(hs)) > 1:
        by: dict[str, list[int]] = {}
        for r, v in enumerate(hs):
            by.setdefault(v, []).append(r)
        ref = hs[0]
        bad = [r for r, v in enumerate(hs) if v != ref]
        detail = "; ".join(f"ranks {rs}: {v[:12]}" for v, rs in by.items())
        raise RuntimeError(f"{what} differs across ranks: ranks {bad} disagree with rank 0 ({detail})")
    return h


class _GlobalSum(torch.autograd.Function):
    """Forward: all-reduce SUM over the world. Backward: all-reduce SUM of the incoming gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _GlobalSum.summed(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return _GlobalSum.summed(grad)

    @staticmethod
    def summed(t: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of ``t`` summed over all ranks."""
        out = t.detach().clone(memory_format=torch.contiguous_format)
        if world_size() > 1:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


def global_sum(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum of ``x`` over all ranks (an identity copy in a single process).

    For a regulariser of a statistic of the GLOBAL batch, e.g. ``R(global_sum(s_local) / N)`` where
    ``s_local`` is this rank's per-sample statistic summed over its samples and ``N`` the global batch
    size. The backward pass all-reduces (sums) the incoming gradient. With W ranks, rank r's autograd
    then gives ``W * R'(S) * ds_r/dtheta`` (S = sum_r s_r); a backend that AVERAGES parameter gradients
    over ranks (DDP, FSDP/FSDP2, DeepSpeed ZeRO all do) turns this into ``R'(S) * dS/dtheta`` - exactly
    the single-process gradient on the global batch. This holds when:

    * every rank adds the same term ``R(global_sum(...))`` once to its loss and calls backward
      through it (the backward is a collective too: a rank that skips it hangs the others), and
    * the backend averages gradients (divides the sum over ranks by W). A backend that only sums
      them would need the term divided by W.

    (The usual task loss, a mean over the local batch, matches the global mean under averaging when
    every rank has the same number of samples.)

    Args:
        x: a plain tensor (any shape) on the device of the process group's backend (CUDA for NCCL).

    Returns:
        a new tensor of ``x``'s shape and dtype holding the sum over ranks, equal on all ranks.
    """
    if not isinstance(x, torch.Tensor) or isinstance(x, DTensor):
        raise TypeError(f"global_sum takes a plain per-rank tensor, got {type(x).__name__}")
    return _GlobalSum.apply(x)


def reshard(module: torch.nn.Module) -> None:
    """Put FSDP2 modules back into their sharded state (no communication; no-op for other layouts).

    FSDP2 leaves the root's parameters gathered after a forward that no backward followed
    (evaluation); while gathered, the module's parameters are full plain tensors instead of the
    sharded DTensors. Call this before reading or writing the shards from outside a training step.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def refresh_full_copies(module: torch.nn.Module) -> None:
    """Make the next forward see what was written into the shards (``local_view``) of ``module``.

    FSDP2 modules are resharded (:func:`reshard`: the next forward gathers again). ZeRO-3 keeps its
    small "persistent" parameters gathered for good: after values are written into the partitions
    from outside the optimizer (the weight EMA swapped in and out), those are gathered anew. A
    collective under ZeRO-3: every rank calls it. No-op for plain layouts.
    """
    reshard(module)
    gathered = [p for p in module.parameters() if _zero3_gathered(p)]
    if gathered:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        for p in gathered:  # all_gather skips parameters it believes available
            p.ds_status = ZeroParamStatus.NOT_AVAILABLE
        gathered[0].all_gather(param_list=gathered)


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> int:
    """Copy every buffer of ``module`` (BatchNorm running stats, counters, ...) from rank ``src`` to all.

    In place, in the order of ``module.named_buffers()``, coalesced into one broadcast per (dtype,
    device); tensors stay on their device (CPU buffers go through CUDA under NCCL). A DTensor buffer
    whose placements are all ``Replicate`` is broadcast through its local copy; a sharded DTensor
    buffer is skipped (each rank legitimately holds a different piece). A collective: every rank
    calls it with the same module structure. No communication in a single process.

    Args:
        module: the (possibly wrapped) model.
        src: global rank whose values win.

    Returns:
        the number of buffers broadcast (the same on all ranks; counted also in a single process).
    """
    bufs: list[torch.Tensor] = []
    for _name, b in module.named_buffers():
        if isinstance(b, DTensor):
            if not all(isinstance(pl, Replicate) for pl in b.placements):
                continue
            b = local_view(b)
        bufs.append(b)
    if world_size() == 1 or not bufs:
        return len(bufs)
    groups: dict[tuple, list[torch.Tensor]] = {}
    for b in bufs:
        groups.setdefault((b.dtype, b.device), []).append(b)
    with torch.no_grad():
        for (dtype, device), members in groups.items():
            wire = torch.uint8 if dtype == torch.bool else dtype  # gloo has no bool collectives
            dev = _comm_device(device)
            flat = torch.cat([b.detach().reshape(-1).to(device=dev, dtype=wire) for b in members])
            dist.broadcast(flat, src=src)
            off = 0
            for b in members:
                m = b.numel()
                b.copy_(flat[off:off + m].reshape(b.shape))
                off += m
    return len(bufs)


def optimizer_is_deepspeed(optimizer: Any) -> bool:
    """True when ``optimizer`` (possibly wrapped by accelerate) is driven by a DeepSpeed engine.

    Methods that must edit optimizer state or master weights element-wise use this to refuse a
    layout they do not handle yet, with a clear error instead of silently wrong results.
    """
    seen = 0
    while optimizer is not None and seen < 4:
        if type(optimizer).__module__.startswith("deepspeed") or type(optimizer).__name__ == "DeepSpeedOptimizerWrapper":
            return True
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return False


# ------------------------------------------------------------------------------------------------
# Element-wise edits of gradients, DeepSpeed master weights and optimizer state (masks)
# ------------------------------------------------------------------------------------------------


def is_deepspeed_param(param: torch.Tensor) -> bool:
    """True when ``param`` is managed by a DeepSpeed ZeRO optimizer (stage 1, 2 or 3).

    Args:
        param: a model parameter.

    Returns:
        whether DeepSpeed keeps its gradient / fp32 master / optimizer state in partitions.
    """
    return hasattr(param, "_hp_mapping") or getattr(param, "_z3_optimizer", None) is not None


def _factor_slice(factor: torch.Tensor, start: int, length: int, like: torch.Tensor) -> torch.Tensor:
    """Flat elements [start, start + length) of the full ``factor``, shaped and typed like ``like``."""
    return factor.reshape(-1).narrow(0, start, length).to(device=like.device, dtype=like.dtype).reshape(like.shape)


def _z3_local(param: torch.Tensor, key: str | None) -> tuple[torch.Tensor, int]:
    """(this rank's fp32 partition of the master (key None) or of state ``key``, its first flat index)."""
    opt = param._z3_optimizer
    part, _group = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    start, length, _ = _zero3_span(param)
    return part.narrow(0, 0, min(length, part.numel())), start


def _z3_state_keys(param: torch.Tensor) -> list[str]:
    opt = param._z3_optimizer
    group_idx, _, _ = opt.grad_position[opt.get_param_id(param)]
    flat = opt.fp32_partitioned_groups_flat[group_idx]
    st = opt.optimizer.state.get(flat, {})
    return sorted(k for k, v in st.items() if torch.is_tensor(v) and tuple(v.shape) == tuple(flat.shape))


def mul_grad_(param: torch.Tensor, factor: torch.Tensor) -> None:
    """Multiply the (complete, averaged) gradient of ``param`` element-wise by a full-shaped ``factor``.

    No communication: each rank scales only the part of the gradient it holds - ``param.grad``
    (plain, DTensor shard) or, under DeepSpeed ZeRO, its gradient partition. Call it between the
    backward pass and the optimizer step; every rank must pass the same ``factor``.

    Args:
        param: a parameter of any layout.
        factor: a tensor with the full shape of ``param`` (e.g. a 0/1 mask).
    """
    with torch.no_grad():
        if getattr(param, "_z3_optimizer", None) is not None and param.grad is None:
            opt = param._z3_optimizer
            g = opt.get_local_fp32_grad_for_param(param)
            if g is None:
                return
            start, length, _ = _zero3_span(param)
            valid = g.reshape(-1).narrow(0, 0, min(length, g.numel()))
            valid.mul_(_factor_slice(factor, start, valid.numel(), valid))
            opt.set_local_grad_for_param(g, param)
            return
        if hasattr(param, "_hp_mapping") and param.grad is None:
            hp = param._hp_mapping
            if hp is None:  # this rank's partition holds no element of param
                return
            frag = hp.get_lp_grad_fragment(param._index_in_param_group)
            addr = hp.lp_fragment_address
            if frag.numel() != addr.numel:  # a full-size buffer (BF16 optimizer): scale it whole
                frag.mul_(factor.to(device=frag.device, dtype=frag.dtype).reshape(frag.shape))
            else:
                frag.mul_(_factor_slice(factor, addr.start, addr.numel, frag))
            return
        g = param.grad
        if g is None:
            return
        local_view(g).mul_(distribute_like(factor, param).to(device=local_view(g).device,
                                                             dtype=local_view(g).dtype))


def mul_optimizer_partitions_(param: torch.Tensor, factor: torch.Tensor, master: bool = True,
                              states: bool | list[str] = True) -> list[str]:
    """Under DeepSpeed ZeRO, multiply this rank's fp32 master piece and per-element optimizer state.

    No communication; each rank edits only the partition it owns. A no-op (returning ``[]``) for a
    parameter that DeepSpeed does not manage - there, edit ``param`` and ``optimizer.state`` directly.

    Args:
        param: a model parameter.
        factor: a tensor with the full shape of ``param`` (e.g. a 0/1 mask); same on every rank.
        master: scale the fp32 master weights.
        states: True for every per-element state tensor that exists (momentum_buffer, exp_avg, ...),
            False for none, or a list of keys.

    Returns:
        the optimizer-state keys that were scaled on this rank.
    """
    done: list[str] = []
    with torch.no_grad():
        if getattr(param, "_z3_optimizer", None) is not None:
            keys = _z3_state_keys(param) if states is True else list(states or [])
            for key in ([None] if master else []) + keys:
                part, start = _z3_local(param, key)
                part.mul_(_factor_slice(factor, start, part.numel(), part))
                if key is not None:
                    done.append(key)
            return done
        if not hasattr(param, "_hp_mapping"):
            return done
        hp = param._hp_mapping
        if hp is None:
            return done
        addr = hp.lp_fragment_address
        if master:
            frag = hp.hp_fragment
            frag.mul_(_factor_slice(factor, addr.start, addr.numel, frag))
        avail = dict(hp.optim_fragment or {})
        keys = sorted(avail) if states is True else [k for k in (states or []) if k in avail]
        for key in keys:
            frag = avail[key]
            frag.mul_(_factor_slice(factor, addr.start, addr.numel, frag))
            done.append(key)
    return done


mask_grad_ = mul_grad_  # the name methods use for "zero the gradient where the mask is 0"


def _ds_loss_scale(opt: Any) -> float:
    """Current loss scale of a DeepSpeed ZeRO optimizer (1.0 without fp16 loss scaling)."""
    try:
        return float(getattr(opt, "loss_scale", 1.0) or 1.0)
    except (TypeError, ValueError):  # a custom scaler that is not a number yet
        return 1.0


def mul_param_(param: torch.Tensor, factor: torch.Tensor, master: bool = True) -> None:
    """Multiply the weight element-wise by a full-shaped ``factor`` (e.g. a 0/1 mask), any layout.

    No communication: each rank scales the piece it holds (``local_view(param)``). Under ZeRO-3 a
    parameter whose full data is currently present (persistent small parameters, or inside a
    gather) is scaled there too, so the next forward sees the change. Under DeepSpeed ZeRO-1/2/3 the
    fp32 master piece is scaled as well when ``master`` (otherwise the next optimizer step would
    write the old values back).

    Args:
        param: a parameter of any layout.
        factor: a tensor with the full shape of ``param``, identical on every rank.
        master: also scale DeepSpeed's fp32 master copy (no-op for parameters DeepSpeed does not manage).
    """
    with torch.no_grad():
        local = local_view(param)
        local.mul_(distribute_like(factor, param).to(device=local.device, dtype=local.dtype))
        if _zero3_gathered(param):
            full = param.data
            full.mul_(factor.to(device=full.device, dtype=full.dtype).reshape(full.shape))
        if master:
            mul_optimizer_partitions_(param, factor, master=True, states=False)


def _torch_param_state(optimizer: Any, param: torch.Tensor) -> Mapping[str, Any]:
    """``optimizer.state[param]`` of a torch optimizer, looking through wrappers (``.optimizer``)."""
    opt = optimizer
    for _ in range(5):
        if opt is None:
            break
        state = getattr(opt, "state", None)
        if isinstance(state, Mapping) and param in state:
            return state[param]
        opt = getattr(opt, "optimizer", None)
    return {}


def mul_optimizer_state_(param: torch.Tensor, optimizer: Any, factor: torch.Tensor) -> list[str]:
    """Multiply every per-element optimizer state tensor of ``param`` by a full-shaped ``factor``.

    Per-element states are the tensors with the parameter's full shape (``momentum_buffer``,
    ``exp_avg``, ``exp_avg_sq``, ...); 0-dim entries such as ``step`` are left alone. For an FSDP2
    parameter the state is a DTensor and its local shard is scaled; under DeepSpeed ZeRO-1/2/3 the
    state lives in flat fp32 partitions and this rank's piece is scaled. No communication.

    Args:
        param: a parameter of any layout.
        optimizer: a torch optimizer, an accelerate ``AcceleratedOptimizer`` (``.optimizer``), or a
            DeepSpeed optimizer / engine wrapper.
        factor: a tensor with the full shape of ``param``, identical on every rank.

    Returns:
        the state keys scaled on this rank, sorted (under ZeRO-1/2 a rank whose partition holds no
        element of ``param`` returns ``[]``; before the first step there is no state).

    Raises:
        RuntimeError: naming the key, when a state tensor with the parameter's full shape has a local
            piece whose shape differs from ``local_view(param)`` (e.g. a plain full tensor as the state
            of a sharded parameter).
    """
    if is_deepspeed_param(param):
        return sorted(mul_optimizer_partitions_(param, factor, master=False, states=True))
    state = _torch_param_state(optimizer, param)
    want_full = tuple(_full_shape(param))
    want_local = tuple(local_view(param).shape)
    piece = None
    done: list[str] = []
    with torch.no_grad():
        for key in sorted(state, key=str):
            value = state[key]
            if not isinstance(value, torch.Tensor) or value.dim() == 0 or tuple(value.shape) != want_full:
                continue
            lv = local_view(value)
            if tuple(lv.shape) != want_local:
                raise RuntimeError(
                    f"mul_optimizer_state_: optimizer state {key!r} has local shape {tuple(lv.shape)} "
                    f"({layout(value)}), but the parameter's local piece is {want_local} ({layout(param)}); "
                    "cannot scale it element-wise")
            if piece is None:
                piece = distribute_like(factor, param)
            lv.mul_(piece.to(device=lv.device, dtype=lv.dtype))
            done.append(key)
    return done


def add_grad_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Add a full-shaped tensor to the complete (averaged) gradient of ``param``, any layout.

    Call it between the backward pass and the optimizer step. No communication: each rank adds the
    matching piece of ``full`` to the part of the gradient it holds - ``param.grad`` (plain), the
    DTensor gradient's local shard, or under DeepSpeed the ZeRO-1/2 gradient fragment / the ZeRO-3
    fp32 gradient partition (multiplied by the current fp16 loss scale, since DeepSpeed keeps those
    gradients scaled until the step). The step then equals one process's step with
    ``param.grad + full``. A missing ``param.grad`` (plain, DTensor) is created as ``zeros + full``.

    Args:
        param: a parameter of any layout.
        full: a tensor with the full shape of ``param``, identical on every rank.
    """
    shape = tuple(_full_shape(param))
    if tuple(full.shape) != shape:
        raise ValueError(f"add_grad_: tensor has shape {tuple(full.shape)}, the parameter's full shape is {shape}")
    with torch.no_grad():
        if getattr(param, "_z3_optimizer", None) is not None and param.grad is None:
            opt = param._z3_optimizer
            g = opt.get_local_fp32_grad_for_param(param)
            if g is None:  # frozen parameter: no gradient partition
                return
            start, length, _ = _zero3_span(param)
            valid = g.reshape(-1).narrow(0, 0, min(length, g.numel()))
            valid.add_(_factor_slice(full, start, valid.numel(), valid), alpha=_ds_loss_scale(opt))
            opt.set_local_grad_for_param(g, param)
            return
        if hasattr(param, "_hp_mapping") and param.grad is None:
            hp = param._hp_mapping
            if hp is None:  # this rank's partition holds no element of param
                return
            scale = _ds_loss_scale(getattr(param, "_zero_optimizer", None))
            frag = hp.get_lp_grad_fragment(param._index_in_param_group)
            addr = hp.lp_fragment_address
            if frag.numel() != addr.numel:  # a full-size buffer (BF16 optimizer): add to all of it
                frag.add_(full.to(device=frag.device, dtype=frag.dtype).reshape(frag.shape), alpha=scale)
            else:
                frag.add_(_factor_slice(full, addr.start, addr.numel, frag), alpha=scale)
            return
        g = param.grad
        if g is None:
            if layout(param) == "zero3":
                raise RuntimeError("add_grad_: this ZeRO-3 parameter has neither param.grad nor a DeepSpeed "
                                   "optimizer gradient partition")
            local = local_view(param)
            # a copy: distribute_like may return a view of the caller's ``full``
            piece = distribute_like(full, param).to(device=local.device, dtype=local.dtype, copy=True)
            if isinstance(param, DTensor):
                param.grad = DTensor.from_local(piece, param.device_mesh, param.placements, run_check=False,
                                                shape=param.shape, stride=param.stride())
            else:
                param.grad = piece.reshape(param.shape)
            return
        lg = local_view(g)
        lg.add_(distribute_like(full, param).to(device=lg.device, dtype=lg.dtype))


WRAPPER_TOKENS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def plain_name(name: str, strip_container: bool = False) -> str:
    """A parameter, buffer or module name without the tokens FSDP1, activation checkpointing and compile
    insert (the names of the plain module's ``state_dict``).

    Args:
        name: a name from ``named_parameters()`` / ``named_modules()`` of a possibly wrapped model.
        strip_container: also drop a leading ``module.`` (the DDP / DeepSpeed engine container), for names
            taken from the container itself.

    Returns:
        e.g. ``"module._orig_mod.layer1.0.conv1"`` -> ``"module.layer1.0.conv1"``, or ``"layer1.0.conv1"``
        with ``strip_container``. A wrapper module's own name (``"_orig_mod"``, ``"a._orig_mod"``) loses the
        token as well.
    """
    for tok in WRAPPER_TOKENS:
        name = name.replace(tok, "")
    for tok in WRAPPER_TOKENS:  # a wrapper module's own name ends with the token, without the dot
        if name == tok[:-1]:
            name = ""
        elif name.endswith("." + tok[:-1]):
            name = name[: -len(tok)]
    if strip_container:
        if name.startswith("module."):
            name = name[len("module."):]
        elif name == "module":
            name = ""
    return name


def _unwrap_container(module: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / DeepSpeed engine containers (their ``module.`` prefix is not in the plain keys)."""
    from torch.nn.parallel import DistributedDataParallel

    for _ in range(4):
        if isinstance(module, DistributedDataParallel) or type(module).__name__ == "DeepSpeedEngine":
            module = module.module
        else:
            break
    return module


def _full_param_cpu(p: torch.Tensor, fp32_master: bool) -> torch.Tensor:
    """The full value of parameter ``p`` as a new plain CPU tensor (a collective on sharded layouts)."""
    if fp32_master and is_deepspeed_param(p):
        from deepspeed.utils import safe_get_full_fp32_param

        v = safe_get_full_fp32_param(p)  # collective under ZeRO-1/2/3; None for a frozen ZeRO-3 param
        if v is not None:
            return v.detach().reshape(_full_shape(p)).to("cpu", copy=True)
    kind = layout(p)
    if kind == "dtensor":
        return p.detach().full_tensor().to("cpu", copy=True)
    if kind == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.data.detach().to("cpu", copy=True)
    return p.detach().to("cpu", copy=True)


def full_state_dict(module: torch.nn.Module, fp32_master: bool = True) -> dict[str, torch.Tensor]:
    """The full state dict of a possibly sharded module, as plain CPU tensors on EVERY rank.

    Keys are those of the plain module's ``state_dict()``: a DDP / DeepSpeed engine container is
    looked through, and the wrapper tokens ``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``
    and ``_orig_mod.`` are removed. Tied parameters appear under every name (gathered once). FSDP2
    parameters are gathered with ``full_tensor()``, ZeRO-3 parameters with ``GatheredParameters``.
    With ``fp32_master`` a parameter DeepSpeed manages (ZeRO-1/2/3) comes from the optimizer's fp32
    master copy instead of the bf16/fp16 weight, so a surgery under mixed precision starts from the
    exact fp32 values. Buffers are copied as they are. A collective: every rank calls it.

    Args:
        module: the model (plain, DDP, FSDP2, DeepSpeed engine or the module inside one).
        fp32_master: take DeepSpeed's fp32 master weights where there are any.

    Returns:
        key -> new CPU tensor (non-tensor entries such as ``_extra_state`` are passed through).
    """
    inner = _unwrap_container(module)
    param_ids = {id(p) for p in inner.parameters()}
    done: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in inner.state_dict(keep_vars=True).items():
        key = plain_name(key)
        if not isinstance(value, torch.Tensor):
            out[key] = value
            continue
        vid = id(value)
        if vid not in done:
            if vid in param_ids:
                done[vid] = _full_param_cpu(value, fp32_master)
            else:  # a buffer (or a tensor a state-dict hook produced)
                t = value.detach()
                done[vid] = (t.full_tensor() if isinstance(t, DTensor) else t).to("cpu", copy=True)
        out[key] = done[vid]
    return out


def batched_gather_full(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu",
                        local: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The full values of many (possibly sharded) tensors on every rank, with ONE collective.

    Every rank writes the elements it holds (its ``local_view``, counted once as in
    :func:`batched_full_reduce`) at their place in one zero-filled flat buffer holding all tensors;
    a single ``all_reduce(SUM)`` then leaves every full tensor on every rank, bit-identical (each
    element has exactly one non-zero contribution). Plain (replicated) tensors come from rank 0, so
    the result is rank 0's copy everywhere. The buffer holds all tensors at once (``dtype``): use it
    for statistics over many layers, not for weights larger than host memory.

    Args:
        tensors: name -> tensor of any layout (plain, FSDP2 DTensor sharded on any dims, ZeRO-3).
        dtype: dtype of the results (and of the buffer).
        device: where the results live.
        local: name -> this rank's piece to gather in place of ``local_view(tensors[name])``: a tensor
            laid out like that parameter (e.g. the weight EMA's shard); ``tensors`` then gives the layout.

    Returns:
        name -> plain full tensor of the full shape. Collective: every rank passes the same names.
    """
    shapes = {n: tuple(int(s) for s in _full_shape(t)) for n, t in tensors.items()}
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    flat = torch.zeros(sum(sizes.values()), dtype=dtype)
    off = 0
    for name, t in tensors.items():
        piece = flat.narrow(0, off, sizes[name])
        if _contributes(t):
            piece_of_t = local_view(t) if local is None else local[name]
            local_t = piece_of_t.detach().to("cpu", dtype)
            kind = layout(t)
            if kind == "dtensor":
                block = piece.view(shapes[name])
                for d, (start, length) in enumerate(_dtensor_ranges(t)):
                    block = block.narrow(d, start, length)
                block.copy_(local_t)
            elif kind == "zero3":
                start, length, _ = _zero3_span(t)
                piece.narrow(0, start, length).copy_(local_t.reshape(-1))
            else:
                piece.copy_(local_t.reshape(-1))
        off += sizes[name]
    if world_size() > 1 and tensors:
        dev = _comm_device(torch.device("cpu"))
        buf = flat.to(dev)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        flat = buf.to("cpu")
    out: dict[str, torch.Tensor] = {}
    off = 0
    for name in tensors:
        out[name] = flat.narrow(0, off, sizes[name]).view(shapes[name]).clone().to(device)
        off += sizes[name]
    return out
