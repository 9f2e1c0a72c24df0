"""AutoSparse under 2 processes: the same per-layer nnz, s, alpha and FLOPs as one process.

Gloo, torch.multiprocessing (one spawn for every scenario): the same global batch of 16 as 1x16, 2x8
(DDP), 2x4 with 2 accumulation steps (DDP no_sync), and 2x8 under FSDP2 (every parameter sharded on
dim 0, so the 7-row layer and every 1-element ``s`` are split unevenly: rank 1 holds no element of
``s``). float64, so the cross-world-size sums agree; after every epoch end the per-layer statistics
(gathered exact counts, no padding) are compared. bf16 autocast under DDP and FSDP2 must train and stay
identical on both ranks. A schedule that differs on one rank fails the epoch-boundary check with a
clear error.

DeepSpeed ZeRO-1/2/3 go through the trainer (``launch/run.sh``), marked slow:
    python -m pytest -q -m slow tests/distributed/test_autosparse_dist.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.conftest import ROOT, child_env, free_port, needs_fmnist, read_metrics, run_train

pytestmark = pytest.mark.multiproc

GLOBAL_BATCH = 16
SPE, EPOCHS = 3, 3
VARIANTS = {"ga": {"name": "autosparse", "s_init": -2.5, "alpha0": 0.8, "schedule": "cosine", "alpha_cutoff": 2},
            "backward": {"name": "autosparse", "s_init": -2.5, "alpha0": 0.8, "schedule": "constant", "alpha_cutoff": None,
                         "backward_density": 0.5}}


def _model(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 24), nn.Tanh(), nn.Linear(24, 3)).to(dtype)


def _method(variant: str):
    from dist_sparse.config import config_from_dict
    from dist_sparse.methods import create_method
    from dist_sparse.methods.base import OptimizerInfo, RunContext

    method = create_method(config_from_dict({"method": dict(VARIANTS[variant])}).method, seed=3)
    method.setup(RunContext(total_steps=SPE * EPOCHS, steps_per_epoch=SPE,
                            optimizer=OptimizerInfo("sgd", 0.2, 1e-3, 0.9)))
    return method


def _batch(step: int, dtype):
    g = torch.Generator().manual_seed(700 + step)
    x = torch.randn(GLOBAL_BATCH, 10, generator=g, dtype=torch.float64)
    return x.to(dtype), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _run(mode: str, variant: str, rank: int, world: int) -> dict:
    """Train SPE * EPOCHS steps; return the method's per-layer statistics after every epoch end."""
    bf16 = mode.startswith("bf16")
    dtype = torch.float32 if bf16 else torch.float64
    method = _method(variant)
    model = method.prepare(_model(dtype))
    accum = 2 if mode == "accum" else 1
    wrapped = model
    if mode in ("ddp", "accum", "bf16_ddp"):
        wrapped = nn.parallel.DistributedDataParallel(model)
    elif mode in ("fsdp2", "bf16_fsdp2"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    params = dict(model.named_parameters())
    s_names = [n for n in params if n.endswith(".s")]
    opt = torch.optim.SGD([{"params": [p for n, p in params.items() if n not in s_names]},
                           {"params": [params[n] for n in s_names], "weight_decay": 1e-3}],
                          lr=0.2, momentum=0.9, weight_decay=1e-3)
    method.bind(model, opt)
    per_rank = GLOBAL_BATCH // world
    micro = per_rank // accum
    epochs, losses = [], []
    for t in range(SPE * EPOCHS):
        x, y = _batch(t, dtype)
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        opt.zero_grad(set_to_none=True)
        for i in range(accum):
            xs, ys = x[i * micro:(i + 1) * micro], y[i * micro:(i + 1) * micro]
            ctx = wrapped.no_sync() if (mode == "accum" and i < accum - 1) else _null()
            with ctx:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss = nn.functional.cross_entropy(wrapped(xs), ys) / accum
                loss.backward()
            losses.append(float(loss.detach()))
        method.after_backward(model, t)
        opt.step()
        method.after_step(model, t)
        if (t + 1) % SPE == 0:
            epochs.append({"alpha": method.alpha, "train_flops": method.train_flops_fraction(),
                           "layers": {n: dict(r) for n, r in method.last.items()}})
            if t + 1 < SPE * EPOCHS:
                method.on_epoch_end(model, t // SPE, {"train_loss": 1.0})
    from dist_sparse.methods.autosparse import AutoSparse  # noqa: F401  (registered)
    from tests.methods.harness import digest

    return {"epochs": epochs, "losses": losses, "state": digest(method.state_dict())}


def _corrupt_check(rank: int) -> str:
    method = _method("ga")
    model = method.prepare(_model())
    method.bind(model, torch.optim.SGD(model.parameters(), lr=0.1))
    if rank == 1:
        method.schedule.alpha0 = 0.5  # a schedule that differs on one rank
    try:
        method.on_epoch_end(model, 0, {"train_loss": 1.0})
    except RuntimeError as err:
        return str(err)
    return "no error"


MODES = ("ddp", "accum", "fsdp2", "bf16_ddp", "bf16_fsdp2")


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {(m, v): _run(m, v, rank, world) for m in MODES for v in VARIANTS
                  if not (m.startswith("bf16") and v != "ga")}
        result["corrupt"] = _corrupt_check(rank)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, free_port(), d), nprocs=2, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def single_process():
    return {v: _run("single", v, 0, 1) for v in VARIANTS}


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", ["ddp", "accum", "fsdp2"])
def test_same_statistics_as_one_process(mode, variant, single_process, two_process_results):
    ref = single_process[variant]["epochs"]
    assert len(ref) == EPOCHS
    first, last = ref[0]["layers"], ref[-1]["layers"]
    assert any(first[n]["nnz"] != last[n]["nnz"] for n in first)  # the thresholds did prune / revive
    # cosine over 3 epochs: 0.8 * (1 + cos(pi / 3)) / 2 = 0.6 in epoch 1, cut to 0 from epoch 2
    assert [e["alpha"] for e in ref] == pytest.approx([0.8, 0.6, 0.0] if variant == "ga" else [0.8] * 3)
    r0, r1 = (two_process_results[r][(mode, variant)] for r in range(2))
    assert r0["state"] == r1["state"], "the method state differs between the ranks"
    for e, (want, got) in enumerate(zip(ref, r0["epochs"])):
        assert got["alpha"] == want["alpha"]
        assert _close(got["train_flops"], want["train_flops"]), (e, got["train_flops"], want["train_flops"])
        for n, w in want["layers"].items():
            g = got["layers"][n]
            assert g["nnz"] == w["nnz"] and g["revived"] == w["revived"] and g["pruned"] == w["pruned"], (mode, e, n)
            assert _close(g["s"], w["s"]) and _close(g["threshold"], w["threshold"]), (mode, e, n, g["s"], w["s"])
            if variant == "backward":
                assert g["backward_density"] == w["backward_density"]


@pytest.mark.parametrize("mode", ["bf16_ddp", "bf16_fsdp2"])
def test_bf16_trains_and_stays_identical_on_both_ranks(mode, two_process_results):
    r0, r1 = (two_process_results[r][(mode, "ga")] for r in range(2))
    assert r0["state"] == r1["state"]
    assert all(torch.isfinite(torch.tensor(r0["losses"])))
    assert r0["epochs"][-1]["layers"] != r0["epochs"][0]["layers"]


def test_a_schedule_that_differs_on_one_rank_fails_clearly(two_process_results):
    for res in two_process_results:
        msg = res["corrupt"]
        assert "differs across ranks" in msg and "alpha for epoch 1" in msg and "[1]" in msg, msg


# ------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-1/2/3 through the trainer (slow)
# ------------------------------------------------------------------------------------------------

TINY = ["--config", "configs/tiny_resnet20_autosparse.yaml", "model.norm=gn", "model.extra.zero_init_residual=true",
        "run.max_steps=8", "run.epochs=2", "data.batch_size=64", "data.train_subset=256", "data.val_subset=128",
        "data.augment=false", "run.deterministic=true", "logging.progress_bar=false", "run.channels_last=false",
        "checkpoint.every_epoch=false", "method.s_init=-4", "method.alpha_cutoff=1", "run.num_processes=0"]


def _launch(backend: str, out: str, extra: list[str]) -> None:
    env = child_env(DIST_SPARSE_SCRATCH=os.path.join(out, "tmp"), PYTHON=sys.executable)
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = ["bash", os.path.join(ROOT, "launch", "run.sh"), backend, "--nproc", "2", "--"] + TINY + extra + [
        f"run.output_dir={out}", f"run.name={backend}"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{backend}: {p.stdout[-2000:]}\n{p.stderr[-5000:]}"


def _epoch_reports(run_dir: str) -> list[dict]:
    return [e["method"] for e in read_metrics(run_dir) if e["event"] == "epoch"]


@needs_fmnist
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zero1", "zero2", "zero3"])
def test_deepspeed_matches_one_process(backend, tmp_path):
    pytest.importorskip("deepspeed")
    run_train(TINY + [f"run.output_dir={tmp_path}", "run.name=one"])
    _launch(backend, str(tmp_path), [])
    ref, got = _epoch_reports(str(tmp_path / "one")), _epoch_reports(str(tmp_path / backend))
    assert len(ref) == len(got) == 2
    for want, have in zip(ref, got):
        assert have["autosparse/alpha"] == want["autosparse/alpha"]
        for k, v in want.items():
            if k.startswith(("nnz/", "revived/", "pruned/")):
                layer = k.split("/", 1)[1]
                d = want[f"density/{layer}"]
                numel = round(want[f"nnz/{layer}"] / d) if d else 0
                # fp32 sums in another order: a weight within ~1e-7 of T may land on the other side
                assert abs(have[k] - v) <= max(2, 1e-3 * numel), (backend, k, have[k], v)
            elif k.startswith(("s/", "threshold/")):
                assert abs(have[k] - v) <= 1e-5 * max(1.0, abs(v)), (backend, k, have[k], v)
    end = [e for e in read_metrics(str(tmp_path / backend)) if e["event"] == "end"][0]
    assert end["nonzero_params"] < end["params"]  # the export holds W^ with its zeros


@needs_fmnist
@pytest.mark.slow
def test_deepspeed_bf16_trains(tmp_path):
    pytest.importorskip("deepspeed")
    _launch("zero2", str(tmp_path), ['run.mixed_precision=bf16', "run.deterministic=false"])
    ev = read_metrics(str(tmp_path / "zero2"))
    epochs = [e for e in ev if e["event"] == "epoch"]
    assert all(json.dumps(e["train_loss"]) not in ("NaN", "Infinity") for e in epochs)
    assert epochs[-1]["method"]["sparsity/global"] > 0
