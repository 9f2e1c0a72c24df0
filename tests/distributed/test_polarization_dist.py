"""Polarization on 2 ranks: the regularizer, the consensus decision and the prune Rebuild.

In-process (gloo, torch.multiprocessing, one spawn for every default check):

* 5.7 (a) the logged R_polar on 2 ranks holding halves of a batch equals the single-process value;
  (b) after backward and DDP averaging, the gate-head gradients equal the single-process gradients
  (equal 4+4 and unequal 5+3 local batches, a model without norm layers); (c) a rank-local R_polar
  differs (rank 0 all open, rank 1 all closed: local 0, global 0.25);
* 5.8 the consensus mask derived on 2 ranks with different shards equals the one-process mask on the
  union; a mask perturbed on one rank makes the cross-rank check fail;
* DDP and FSDP2 (fully_shard on a CPU mesh): a short run on the same global batches gives the same gate
  decision and pruned architecture as one process;
* the contract harness under DDP: prune + fine-tune Rebuild after epoch 1, the decision is the one of
  the single-process run, and a run resumed from the checkpoint written right after the rebuild ends
  like the uninterrupted one.

ZeRO-1/2/3 (and DDP/FSDP2 through the trainer) run ``launch/run.sh <backend> --nproc 2`` and are marked
slow:  python -m pytest -q -m slow tests/distributed/test_polarization_dist.py -p no:cacheprovider
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.multiproc

WORLD = 2


def _gated_model(seed: int = 0):
    from dist_sparse.models import create_model
    from dist_sparse.surgery.gates import insert_gates

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = create_model("resnet20", num_classes=4, in_chans=1, width_mult=0.25, norm="none")
    return insert_gates(m, "channel", "after", depth=2, hidden=4, init_bias=0.0, init_std=1.0, seed=seed)


def _batch(n: int = 8, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def _reg_grads(model, x):
    """R_polar + 0.3 R_act of the global batch (its gradient on the gate heads) and the logged R_polar."""
    from dist_sparse.methods.polarization import global_gate_means, polar_terms
    from dist_sparse.surgery.gates import gated_blocks

    out = model(x)
    blocks = gated_blocks(model.module if hasattr(model, "module") else model)
    gbars = global_gate_means([b.last_gates for _, b in blocks])
    polar, act = polar_terms(gbars)
    (polar + 0.3 * act + 0 * out.sum()).backward()  # 0 * out: every parameter joins DDP's reduction
    inner = model.module if hasattr(model, "module") else model
    grads = {n: p.grad.detach().clone() for n, p in inner.named_parameters() if ".gate." in n}
    return float(polar.detach()), grads


def _short_train(model, steps: int, rows, method):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(steps):
        x, y = _batch(8, seed=100 + s)
        x, y = x[rows], y[rows]
        loss = F.cross_entropy(model(x), y) + method.regularizer(model.module if hasattr(model, "module") else model)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _polar_method(**kw):
    from dist_sparse.methods.base import RunContext
    from dist_sparse.methods.polarization import Polarization, PolarizationConfig

    m = Polarization(PolarizationConfig(gating="channel", lambda_polar=3.0, lambda_act=0.3, **kw))
    m.setup(RunContext(total_steps=10, steps_per_epoch=10))
    return m


def _consensus(model, rows):
    from dist_sparse.methods.polarization import derive_consensus

    batches = [(_batch(8, seed=500 + i)[0][rows],) for i in range(2)]
    return derive_consensus(model, batches, lambda m, b: m(b[0]))


def _rows(rank: int, world: int, n: int = 8):
    per = n // world
    return slice(rank * per, (rank + 1) * per)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = {}
    try:
        from dist_sparse import distributed as D
        from dist_sparse.methods.polarization import global_gate_means, polar_terms

        # 5.7 (a)(b): equal and unequal local batches
        x, _ = _batch(8)
        for split, rows in (("equal", [slice(0, 4), slice(4, 8)]), ("unequal", [slice(0, 5), slice(5, 8)])):
            model = torch.nn.parallel.DistributedDataParallel(_gated_model())
            result[f"polar_{split}"], result[f"grads_{split}"] = _reg_grads(model, x[rows[rank]])
        # 5.7 (c): rank 0 all open, rank 1 all closed
        g = torch.full((3, 2), 1.0 if rank == 0 else 0.0)
        result["naive"] = float(polar_terms([g.mean(0)])[0])
        result["global"] = float(polar_terms(global_gate_means([g]))[0])
        # 5.8: consensus on shards == consensus on the union; a perturbed mask is caught
        model = _gated_model()
        result["consensus"] = _consensus(model, _rows(rank, world))["keep"]
        bad = torch.tensor([1, 0, 1], dtype=torch.uint8) if rank == 0 else torch.tensor([1, 1, 1], dtype=torch.uint8)
        try:
            D.assert_same_across_ranks(bad, "perturbed mask")
            result["perturbed_caught"] = False
        except RuntimeError:
            result["perturbed_caught"] = True
        # DDP short run -> decision
        method = _polar_method()
        ddp = torch.nn.parallel.DistributedDataParallel(_gated_model())
        _short_train(ddp, 6, _rows(rank, world), method)
        result["ddp_keep"] = _consensus(ddp.module, _rows(rank, world))["keep"]
        # FSDP2 short run -> decision
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        method = _polar_method()
        fs = _gated_model()
        fully_shard(fs, mesh=init_device_mesh("cpu", (world,)))
        _short_train(fs, 6, _rows(rank, world), method)
        result["fsdp_keep"] = _consensus(fs, _rows(rank, world))["keep"]
        # the contract harness under DDP: prune + fine-tune Rebuild, then resume after the rebuild
        from tests.methods.harness import STEPS_PER_EPOCH, Run, digest

        full = Run("polarization", world=world, rank=rank).train()
        first = Run("polarization", world=world, rank=rank).train(until=2 * STEPS_PER_EPOCH)
        resumed = Run("polarization", world=world, rank=rank, state=first.checkpoint()).train()
        result["harness"] = {"pruned": full.method.pruned, "rebuilds": full.rebuilds,
                             "resumed_same": resumed.losses == full.losses
                             and digest(resumed.module.state_dict()) == digest(full.module.state_dict()),
                             "consensus": full.method.consensus}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_process_reference() -> dict:
    from tests.methods.harness import Run

    ref = {}
    x, _ = _batch(8)
    ref["polar"], ref["grads"] = _reg_grads(_gated_model(), x)
    ref["consensus"] = _consensus(_gated_model(), slice(0, 8))["keep"]
    method = _polar_method()
    m = _gated_model()
    _short_train(m, 6, slice(0, 8), method)
    ref["trained_keep"] = _consensus(m, slice(0, 8))["keep"]
    run = Run("polarization").train()
    ref["harness_pruned"] = run.method.pruned
    return ref


def test_polarization_two_ranks(tmp_path):
    torch.set_num_threads(1)
    mp.spawn(_worker, args=(WORLD, free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    ref = _single_process_reference()
    for r in (r0, r1):
        for split in ("equal", "unequal"):
            assert abs(r[f"polar_{split}"] - ref["polar"]) <= 1e-6, split  # 5.7 (a)
            for n, g in ref["grads"].items():  # 5.7 (b)
                assert torch.allclose(r[f"grads_{split}"][n], g, rtol=1e-5, atol=1e-7), (split, n)
        assert r["naive"] == 0.0 and abs(r["global"] - 0.25) < 1e-7  # 5.7 (c)
        assert r["consensus"] == ref["consensus"] and r["perturbed_caught"]  # 5.8
        assert r["ddp_keep"] == ref["trained_keep"] and r["fsdp_keep"] == ref["trained_keep"]
        h = r["harness"]
        assert h["rebuilds"] == 1 and h["pruned"] == ref["harness_pruned"] and h["resumed_same"]
    assert r0["harness"] == r1["harness"]
    assert any(g.abs().sum() > 0 for g in ref["grads"].values())  # the check is not vacuous


# ------------------------------------------------------------------------------------------------
# The trainer under every backend (slow)
# ------------------------------------------------------------------------------------------------

COMMON = ["--config", os.path.join(ROOT, "configs", "tiny_resnet20_polarization.yaml"), "data.train_subset=256",
          "data.val_subset=128", "data.batch_size=64", "logging.progress_bar=false", "logging.log_every_steps=0",
          "run.channels_last=false", "run.epochs=3", "method.finetune_epochs=1", "method.calibration_batches=2",
          "checkpoint.keep_last=3", "logging.plots=false", "optim.lr=0.02",
          # the plumbing settings of this check, independent of the config's tuned controller
          "method.polar_schedule=constant", "method.lambda_polar=1.0", "method.lambda_act=0.3",
          "method.target_sparsity=-1", "method.act_weighting=uniform"]


def _launch(backend: str, out: str, nproc: int, extra: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", DIST_SPARSE_SCRATCH=os.path.join(out, "tmp"), PYTHONPATH=ROOT)
    env.setdefault("PYTHON", sys.executable)
    args = COMMON + [f"run.output_dir={out}", f"run.num_processes={nproc}"] + extra
    cmd = ["bash", os.path.join(ROOT, "launch", "run.sh"), backend, "--nproc", str(nproc), "--"] + args
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{backend} launch failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")


def _decision(run_dir: str) -> dict:
    from dist_sparse import checkpoint as ckpt

    return ckpt.load_method_state(ckpt.find_latest(os.path.join(run_dir, "checkpoints")))["pruned"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp", "zero1", "zero2", "zero3"])
def test_trainer_backend_matches_one_process(backend, tmp_path):
    from tests.distributed.test_backends import _needs

    _needs(backend)
    norm = "model.norm=none"  # no batch statistics: 2 ranks train like one process up to rounding
    out = str(tmp_path)
    _launch("ddp", out, 1, [norm, "run.name=one"])
    _launch(backend, out, 2, [norm, "run.name=two"])
    one, two = _decision(os.path.join(out, "one")), _decision(os.path.join(out, "two"))
    assert one is not None and two == one
    from dist_sparse.checkpoint import load_exported

    model = load_exported(os.path.join(out, "two", "model.safetensors"))
    assert not any(type(m).__module__.startswith("dist_sparse.surgery") for m in model.modules())
