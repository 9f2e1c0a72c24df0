"""Worker bodies for test_distributed_stats.py: run in 2 spawned gloo processes.

Every rank builds the same full tensors from a seed, shards them in one layout (plain/replicated,
FSDP2 DTensor, ZeRO-3 partition), calls dist_sparse.distributed on the shards and compares with the
value computed on the full tensor in this one process. Any mismatch raises (mp.spawn re-raises it).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist

from dist_sparse import distributed as D

# Shapes with dims that 2 ranks cannot split evenly, a dim-0 of 1 (one rank holds nothing) and 1-D.
SHAPES = [(5, 3), (7,), (3, 4, 2), (1, 5), (2, 3, 3, 3), (9, 1), (4, 6)]


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def full_tensors(seed: int) -> list[torch.Tensor]:
    """Seeded full tensors: continuous values with zeros, and integer-valued ones full of ties."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(SHAPES):
        if (i + seed) % 2:
            x = torch.randint(-2, 3, shape, generator=g).float()  # many ties, incl. many zeros
        else:
            x = torch.randn(shape, generator=g)
            x[torch.rand(shape, generator=g) < 0.3] = 0.0
        out.append(x)
    return out


def reference_topk_mask(full: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Single-process definition: stable order by value, ties by lower flat index."""
    flat = full.reshape(-1).double()
    # a stable sort keeps tied values in flat-index order
    order = torch.sort(-flat if largest else flat, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(full.shape)


def _ks(n: int) -> list[int]:
    return sorted({1, max(1, n // 3), max(1, n - 1), n})


def check_tensor(full: torch.Tensor, sharded: torch.Tensor, where: str) -> None:
    """Compare every statistic on ``sharded`` with the value computed on ``full``."""
    f64 = full.double()
    assert D.full_numel(sharded) == full.numel(), where
    torch.testing.assert_close(D.full_sum(sharded).cpu(), f64.sum(), msg=f"sum {where}")
    torch.testing.assert_close(D.full_sum_of_squares(sharded).cpu(), f64.square().sum(), msg=f"sumsq {where}")
    assert D.full_count_nonzero(sharded) == int(torch.count_nonzero(full)), f"nnz {where}"
    assert D.count_where(sharded, lambda x: x > 0.5) == int((full > 0.5).sum()), f"count_where {where}"
    assert D.count_where(sharded, lambda x: x == 0) == int((full == 0).sum()), f"count_where == 0 {where}"
    torch.testing.assert_close(D.full_mean(sharded).cpu(), f64.mean(), msg=f"mean {where}")
    torch.testing.assert_close(D.full_norm(sharded).cpu(), f64.norm(), msg=f"norm {where}")
    flat = full.reshape(-1)
    for k in _ks(full.numel()):
        for largest in (True, False):
            v = D.global_kth_value(sharded, k, largest=largest)
            ref = torch.sort(flat, descending=largest).values[k - 1]
            assert float(v) == float(ref), f"kth {where} k={k} largest={largest}: {float(v)} != {float(ref)}"
            m = D.global_topk_mask(sharded, k, largest=largest)
            ref_m = reference_topk_mask(full, k, largest)
            exp = D.distribute_like(ref_m, sharded)
            assert m.shape == D.local_view(sharded).shape, f"mask shape {where}"
            assert torch.equal(m.cpu(), exp.cpu()), f"topk mask {where} k={k} largest={largest}"
            ones = torch.tensor([int(m.sum())])
            copies = 1
            if dist.is_initialized():
                dist.all_reduce(ones)  # sum over shards; replicated layouts count every copy
                copies = dist.get_world_size() if D.layout(sharded) == "plain" else 1
            assert int(ones) == k * copies, f"topk count {where}: {int(ones)} != {k * copies}"
    with D.gather_full(sharded) as g:
        assert torch.equal(g.cpu(), full), f"gather_full {where}"


def check_writeback(full: torch.Tensor, sharded: torch.Tensor, where: str) -> None:
    """Zero the entries outside the top half in the full tensor; the shard must follow."""
    k = max(1, full.numel() // 2)
    keep = reference_topk_mask(full.abs(), k, True)
    with D.gather_full(sharded, writeback=True) as g:
        g.mul_(keep.to(g.dtype))
    expected = full * keep
    assert torch.equal(D.local_view(sharded).cpu(), D.distribute_like(expected, sharded).cpu()), where
    with D.gather_full(sharded) as g:
        assert torch.equal(g.cpu(), expected), f"writeback gather {where}"


def _stat_fn(x: torch.Tensor) -> torch.Tensor:
    """An additive float64 statistic: [sum, sum of squares, count of non-zeros, count of x > 0.5]."""
    x = x.double()
    return torch.stack([x.sum(), x.square().sum(), (x != 0).sum().double(), (x > 0.5).sum().double()])


def _int_stat_fn(x: torch.Tensor) -> torch.Tensor:
    """An additive int64 statistic of shape (2, 2)."""
    return torch.stack([(x > 0).sum(), (x < 0).sum(), (x == 0).sum(), torch.tensor(x.numel())]).reshape(2, 2)


def check_batched(named: dict[str, tuple[torch.Tensor, torch.Tensor]], where: str) -> None:
    """batched_full_reduce over name -> (full, sharded) of mixed layouts: one all_reduce, exact values."""
    sharded = {n: s for n, (_f, s) in named.items()}
    for fn in (_stat_fn, _int_stat_fn):
        calls = []
        real = dist.all_reduce if dist.is_initialized() else None

        def counting(*args, **kwargs):
            calls.append(args[0].numel())
            return real(*args, **kwargs)

        if real is not None:
            dist.all_reduce = counting
        try:
            got = D.batched_full_reduce(sharded, fn)
        finally:
            if real is not None:
                dist.all_reduce = real
        expected_calls = 1 if dist.is_initialized() and dist.get_world_size() > 1 else 0
        assert len(calls) == expected_calls, f"batched_full_reduce {where}: {len(calls)} all_reduce calls"
        assert list(got) == list(sharded), f"batched_full_reduce {where}: keys/order"
        for n, (full, _s) in named.items():
            want = fn(full)
            assert got[n].dtype == want.dtype and got[n].shape == want.shape, f"{where} {n}: {got[n]}"
            if want.dtype == torch.float64:
                torch.testing.assert_close(got[n].cpu(), want, rtol=1e-12, atol=1e-12, msg=f"{where} {n}")
            else:
                assert torch.equal(got[n].cpu(), want), f"{where} {n}: {got[n]} != {want}"


# -------------------------------------------------------------------------------- layouts


class _Holder(torch.nn.Module):
    """A module whose only content is parameters p0, p1, ... of the given shapes."""

    def __init__(self, shapes: list) -> None:
        super().__init__()
        for i, shape in enumerate(shapes):
            self.register_parameter(f"p{i}", torch.nn.Parameter(torch.zeros(shape)))


def worker_plain(rank: int, world: int, port: int, seeds: list[int]) -> None:
    _init(rank, world, port)
    try:
        for seed in seeds:
            for i, full in enumerate(full_tensors(seed)):
                check_tensor(full, full.clone(), f"plain seed={seed} #{i} {tuple(full.shape)}")
                p = torch.nn.Parameter(full.clone())
                check_writeback(full, p, f"plain writeback seed={seed} #{i}")
            check_batched({f"t{i}": (f, f.clone()) for i, f in enumerate(full_tensors(seed))}, f"plain seed={seed}")
        _check_replicated_helpers(rank, world)
    finally:
        dist.destroy_process_group()


def _check_replicated_helpers(rank: int, world: int) -> None:
    # all_reduce_coalesced: rank r contributes (r + 1); one collective per dtype
    d = {"a": torch.full((2, 3), float(rank + 1)), "b": torch.tensor([rank + 1, 10 * (rank + 1)]),
         "c": torch.tensor(float(rank + 1), dtype=torch.float64)}
    tot = sum(range(1, world + 1))
    s = D.all_reduce_coalesced(d, "sum")
    assert torch.equal(s["a"], torch.full((2, 3), float(tot))) and s["a"].shape == (2, 3)
    assert torch.equal(s["b"], torch.tensor([tot, 10 * tot])) and s["b"].dtype == torch.int64
    assert float(s["c"]) == tot and s["c"].dim() == 0
    assert float(D.all_reduce_coalesced({"x": torch.tensor(float(rank + 1))}, "mean")["x"]) == tot / world
    assert int(D.all_reduce_coalesced({"x": torch.tensor(rank + 1)}, "max")["x"]) == world
    assert int(D.all_reduce_coalesced({"x": torch.tensor(rank + 1)}, "min")["x"]) == 1
    assert torch.equal(d["a"], torch.full((2, 3), float(rank + 1))), "input must not be modified"
    # broadcast_object: rank 0 decides
    got = D.broadcast_object({"rank": rank, "mask": torch.arange(3) * (rank + 1)}, src=0)
    assert got["rank"] == 0 and torch.equal(got["mask"], torch.arange(3))
    # assert_same_across_ranks: equal passes (and returns the same digest), different raises
    h = D.assert_same_across_ranks(torch.arange(6.0).reshape(2, 3), "same tensor")
    assert D.broadcast_object(h) == h
    D.assert_same_across_ranks(b"abc", "same bytes")
    for bad, what in ((torch.tensor([0.0, float(rank)]), "mask of layer1.conv"), (bytes([rank]), "decision")):
        try:
            D.assert_same_across_ranks(bad, what)
        except RuntimeError as err:
            msg = str(err)
            assert what in msg and "[1]" in msg, msg
        else:
            raise AssertionError(f"assert_same_across_ranks did not raise for {what}")
    assert D.world_size() == world and D.rank() == rank and D.is_main() == (rank == 0)
    D.barrier()


def worker_fsdp2(rank: int, world: int, port: int, seeds: list[int]) -> None:
    _init(rank, world, port)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        mesh2 = init_device_mesh("cpu", (world, 1), mesh_dim_names=("rep", "shard"))
        for seed in seeds:
            fulls = full_tensors(seed)
            mod = _Holder([f.shape for f in fulls])
            with torch.no_grad():
                for i, f in enumerate(fulls):
                    getattr(mod, f"p{i}").copy_(f)
            fully_shard(mod, mesh=mesh)
            # one call mixing FSDP2 shards, Shard(-1) and Replicate DTensors, a 2-D (Replicate, Shard)
            # mesh (HSDP-like) and replicated plain tensors
            named = {f"fsdp{i}": (f, getattr(mod, f"p{i}")) for i, f in enumerate(fulls)}
            named.update({f"plain{i}": (f, f.clone()) for i, f in enumerate(fulls[:3])})
            named["shard_last"] = (fulls[0], distribute_tensor(fulls[0].clone(), mesh, [Shard(1)]))
            named["replicate"] = (fulls[1], distribute_tensor(fulls[1].clone(), mesh, [Replicate()]))
            named["hsdp"] = (fulls[2], distribute_tensor(fulls[2].clone(), mesh2, [Replicate(), Shard(0)]))
            check_batched(named, f"mixed fsdp2/plain seed={seed}")
            for i, f in enumerate(fulls):
                p = getattr(mod, f"p{i}")
                assert isinstance(p, DTensor), type(p)
                check_tensor(f, p, f"fsdp2 seed={seed} #{i} {tuple(f.shape)} local {tuple(p.to_local().shape)}")
                check_writeback(f, p, f"fsdp2 writeback seed={seed} #{i}")
            # a different placement: sharded along the last dim (not what FSDP2 does, but a DTensor)
            for i, f in enumerate(fulls):
                if f.dim() >= 2:
                    d = distribute_tensor(f.clone(), mesh, [Shard(f.dim() - 1)])
                    check_tensor(f, d, f"dtensor Shard(-1) seed={seed} #{i} {tuple(f.shape)}")
            dmask = D.distribute_like(torch.ones_like(fulls[0]), getattr(mod, "p0"), as_dtensor=True)
            assert isinstance(dmask, DTensor) and torch.equal(dmask.full_tensor(), torch.ones_like(fulls[0]))
    finally:
        dist.destroy_process_group()


def worker_zero3(rank: int, world: int, port: int, seeds: list[int]) -> None:
    _init(rank, world, port)
    try:
        import deepspeed
        import importlib

        # (``import deepspeed.comm.torch as m`` binds the real torch package: deepspeed.comm imports torch)
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel on first use (~40 s
        # here); it only speeds up all_reduce and is not what we test, so skip it.
        ds_torch_comm.build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo")
        cfg = {"train_batch_size": world, "zero_optimization": {"stage": 3}}
        for seed in seeds:
            fulls = full_tensors(seed)
            with deepspeed.zero.Init(config_dict_or_path=cfg):
                mod = _Holder([f.shape for f in fulls])
            # zero.Init partitions at registration; write the seeded values through GatheredParameters
            for i, f in enumerate(fulls):
                p = getattr(mod, f"p{i}")
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    p.data.copy_(f)
                assert D.layout(p) == "zero3" and p.ds_tensor.numel() * world >= f.numel()
                check_tensor(f, p, f"zero3 seed={seed} #{i} {tuple(f.shape)}")
            # one call mixing ZeRO-3 partitions, FSDP2 shards and replicated plain tensors
            holder = _Holder([f.shape for f in fulls])
            with torch.no_grad():
                for i, f in enumerate(fulls):
                    getattr(holder, f"p{i}").copy_(f)
            fully_shard(holder, mesh=init_device_mesh("cpu", (world,)))
            named = {f"z3_{i}": (f, getattr(mod, f"p{i}")) for i, f in enumerate(fulls)}
            named.update({f"fsdp{i}": (f, getattr(holder, f"p{i}")) for i, f in enumerate(fulls)})
            named.update({f"plain{i}": (f, f.clone()) for i, f in enumerate(fulls[::2])})
            check_batched(named, f"mixed zero3/fsdp2/plain seed={seed}")
            for i, f in enumerate(fulls):
                check_writeback(f, getattr(mod, f"p{i}"), f"zero3 writeback seed={seed} #{i}")
    finally:
        dist.destroy_process_group()


WORKERS: dict[str, Callable] = {"plain": worker_plain, "fsdp2": worker_fsdp2, "zero3": worker_zero3}
