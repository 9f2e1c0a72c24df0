"""RigL under 2 gloo processes: masks bit-identical on every rank and equal to a 1-process run.

Acceptance check 3 of specs/rigl.md: same seed, same global batch (16 = 1x16 = 2x8 = 2x4 with 2
accumulation steps, and FSDP2 with 2x8), float64 so the cross-world-size sums agree; the masks after
each of the first updates must be identical. Also: a deliberately corrupted mask on one rank fails the
run-time checksum with a clear error.
"""
from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytestmark = pytest.mark.multiproc

GLOBAL_BATCH = 16
STEPS = 9  # updates at 0, 2, 4, 6 (delta_t 2, T_end = 0.75 * 10 = 7)
FIELDS = {"name": "rigl", "sparsity": 0.8, "delta_t": 2, "distribution": "erk", "alpha": 0.4}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 3)).double()


def _method():
    from dist_sparse.config import config_from_dict
    from dist_sparse.methods import create_method

    cfg = config_from_dict({"method": dict(FIELDS)}).method
    from dist_sparse.methods.base import RunContext

    method = create_method(cfg, seed=7)
    method.setup(RunContext(total_steps=10, steps_per_epoch=10))
    return method


def _global_batch(step: int):
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(GLOBAL_BATCH, 10, generator=g, dtype=torch.float64), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)


def _run(mode: str, rank: int, world: int) -> list[dict[str, torch.Tensor]]:
    """Train STEPS steps; return the full masks after every update (in step order)."""
    model = _model()
    method = _method()
    model = method.prepare(model)
    accum = 2 if mode == "accum" else 1
    wrapped = model
    if mode in ("ddp", "accum"):
        wrapped = nn.parallel.DistributedDataParallel(model)
    elif mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    method.bind(model, opt)
    history = []
    per_rank = GLOBAL_BATCH // world
    micro = per_rank // accum
    for t in range(STEPS):
        x, y = _global_batch(t)
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        opt.zero_grad(set_to_none=True)
        for i in range(accum):
            xs, ys = x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro]
            last = i == accum - 1
            ctx = wrapped.no_sync() if (mode == "accum" and not last) else _null()
            with ctx:
                loss = nn.functional.cross_entropy(wrapped(xs), ys) / accum
                loss.backward()
        method.after_backward(model, t)
        opt.step()
        method.after_step(model, t)
        if method.last.get("step") == t:
            history.append({n: m.detach().cpu().clone() for n, m in method.masks.items()})
    # the local weights are exactly zero where the mask is 0
    from dist_sparse import distributed as D

    for n, p in model.named_parameters():
        if n in method.masks:
            local = D.local_view(p).detach()
            assert torch.count_nonzero(local[~D.distribute_like(method.masks[n].to(local.device), p)]) == 0
    return history


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _corrupt_check(rank: int) -> str:
    from dist_sparse.surgery.masking import make_generator, random_mask

    method = _method()
    model = method.prepare(_model())
    method.bind(model, torch.optim.SGD(model.parameters(), lr=0.1))
    if rank == 1:
        n = method.names[1]
        method.masks[n] = random_mask(method.shapes[n], method.active[n], make_generator(99, n))
    try:
        method._check_same_masks("rigl masks after the update at step 4")
    except RuntimeError as err:
        return str(err)
    return "no error"


MODES = ("ddp", "accum", "fsdp2", "corrupt")


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for mode in MODES:  # one spawn for every scenario: process start-up dominates the cost
            result = _corrupt_check(rank) if mode == "corrupt" else _run(mode, rank, world)
            torch.save(result, os.path.join(out_dir, f"{mode}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, _free_port(), d), nprocs=2, join=True)
        return {m: [torch.load(os.path.join(d, f"{m}_{r}.pt"), weights_only=False) for r in range(2)]
                for m in MODES}


@pytest.fixture(scope="module")
def single_process_history():
    return _run("single", 0, 1)


@pytest.mark.parametrize("mode", ["ddp", "accum", "fsdp2"])
def test_masks_identical_across_ranks_and_world_sizes(mode, single_process_history, two_process_results):
    ref = single_process_history
    assert len(ref) == 4  # updates at steps 0, 2, 4, 6
    assert any(not torch.equal(ref[0][n], ref[-1][n]) for n in ref[0])  # the masks did move
    h0, h1 = two_process_results[mode]
    assert len(h0) == len(h1) == len(ref)
    for u in range(len(ref)):
        for n in ref[u]:
            assert torch.equal(h0[u][n], h1[u][n]), f"rank 0 vs rank 1, update {u}, {n}"
            assert torch.equal(h0[u][n], ref[u][n]), f"2 processes ({mode}) vs 1 process, update {u}, {n}"


def test_mask_mismatch_fails_with_clear_error(two_process_results):
    for msg in two_process_results["corrupt"]:
        assert "differs across ranks" in msg and "step 4" in msg and "[1]" in msg
