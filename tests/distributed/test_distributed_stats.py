"""dist_sparse.distributed on 2 gloo processes: every statistic of a sharded tensor equals the value
computed on the full tensor in one process, for replicated (plain/DDP), FSDP2 DTensor and DeepSpeed
ZeRO-3 layouts, over seeded shapes whose dims 2 ranks cannot split evenly and values full of ties.
``count_where`` is checked per tensor, ``batched_full_reduce`` in single calls that mix layouts
(plain + FSDP2 + Replicate/HSDP DTensors; ZeRO-3 + FSDP2 + plain), counting its all_reduce calls (one).

Run: python -m pytest -q tests/distributed/test_distributed_stats.py
"""
from __future__ import annotations

import importlib.util
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from dist_sparse import distributed as D
from tests.distributed import _stats_worker as W

pytestmark = pytest.mark.multiproc

WORLD = 2
SEEDS = [0, 1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(layout: str, seeds=SEEDS) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(W.WORKERS[layout], args=(WORLD, _free_port(), seeds), nprocs=WORLD, join=True)


def test_plain_replicated_and_helpers():
    """Replicated tensors (DDP, ZeRO-1/2 params), all_reduce_coalesced, broadcast, consistency check."""
    _spawn("plain")


def test_fsdp2_dtensor():
    """fully_shard on a cpu mesh (Shard(0), uneven and empty shards) and a Shard(-1) DTensor."""
    _spawn("fsdp2")


def _deepspeed_skip_reason() -> str | None:
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install deepspeed)"
    try:
        import deepspeed  # noqa: F401
    except Exception as err:  # an installed but broken deepspeed
        return f"import deepspeed failed: {type(err).__name__}: {err}"
    return None


def test_zero3_partitions():
    """deepspeed.zero.Init partitions (flat, zero-padded last partition)."""
    reason = _deepspeed_skip_reason()
    if reason:
        pytest.skip(reason)
    _spawn("zero3", seeds=SEEDS[:2])


def test_single_process_without_process_group():
    """Every function works without torch.distributed initialised and matches the reference."""
    assert not torch.distributed.is_initialized()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: intra-op threads only add contention on a shared box
    try:
        _single_process_checks()
    finally:
        torch.set_num_threads(threads)


def _single_process_checks() -> None:
    for seed in SEEDS:
        for full in W.full_tensors(seed):
            W.check_tensor(full, full.clone(), f"single seed={seed} {tuple(full.shape)}")
            W.check_writeback(full, torch.nn.Parameter(full.clone()), f"single writeback seed={seed}")
        W.check_batched({f"t{i}": (f, f.clone()) for i, f in enumerate(W.full_tensors(seed))}, f"single seed={seed}")
    assert D.world_size() == 1 and D.rank() == 0 and D.is_main()
    D.barrier()
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    assert D.assert_same_across_ranks(torch.ones(3), "ones") == D.assert_same_across_ranks(torch.ones(3), "x")
    out = D.all_reduce_coalesced({"a": torch.ones(2), "b": torch.tensor(3)}, "sum")
    assert torch.equal(out["a"], torch.ones(2)) and int(out["b"]) == 3
    with pytest.raises(ValueError, match="op = 'avg'"):
        D.all_reduce_coalesced({"a": torch.ones(2)}, "avg")
    with pytest.raises(ValueError, match=r"k = 0 is not allowed; expected an integer in \[1, 4\]"):
        D.global_kth_value(torch.ones(4), 0)
    with pytest.raises(ValueError, match="k = 5"):
        D.global_topk_mask(torch.ones(4), 5)
    with pytest.raises(ValueError, match="full shape"):
        D.distribute_like(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="shaped like its input"):
        D.count_where(torch.ones(4), lambda x: x.sum() > 0)
    with pytest.raises(TypeError, match="bool"):
        D.batched_full_reduce({"a": torch.ones(2)}, lambda x: x > 0)
    assert D.batched_full_reduce({}, lambda x: x.sum()) == {}
