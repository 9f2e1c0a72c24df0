"""Contract, 2 ranks: every registered method takes bit-identical decisions on both ranks.

Two gloo processes train each method under DDP, each rank on its rows of the same global batches; the
method's whole state (masks, thresholds, gates, ranks, counters) must hash the same on both ranks after
the run, and the run must have learnt (finite losses).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port

pytestmark = pytest.mark.multiproc


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from dist_sparse import distributed as D
        from tests.methods.harness import Run, contract_methods, digest

        result = {}
        for name in contract_methods():
            run = Run(name, world=world, rank=rank).train()
            h = digest(run.method.state_dict())
            D.assert_same_across_ranks(h, f"{name} state after training")  # raises on a difference
            result[name] = {"digest": h, "losses": run.losses}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_decisions_identical_on_two_ranks(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert set(r0) == set(r1) and {"rigl", "set", "static", "gmp", "oneshot", "dense"} <= set(r0)
    for name in r0:
        assert r0[name]["digest"] == r1[name]["digest"], name
        assert r0[name]["losses"] == r1[name]["losses"], name  # all-reduced: the same global loss
        assert all(torch.isfinite(torch.tensor(r0[name]["losses"]))), name
