"""Rebuild (mid-run architecture change) under every backend, 2 processes through launch/run.sh.

The methods live outside the package (tests/methods/rebuild_methods.py) and reach the launched ranks
through ``DIST_SPARSE_PLUGINS``:

* ``test_prune_channels`` removes half of ``layer2.1.conv1``'s output channels (the smallest L1 norm of
  the full weight, decided on every rank; whole groups under GroupNorm) with ``bn1`` and ``conv2``'s
  input channels: -9,248 parameters.
* ``test_factorize_linear`` (rank 4) replaces ``fc`` 64->10 (650) by 64->4 (256) + 4->10 (50): -344.

Per backend (ddp, fsdp = FSDP2, zero2, zero3; a small Fashion-MNIST subset, 3 epochs, rebuild at the
end of epoch 0):

* the run trains through the rebuild: the parameter count in metrics.jsonl changes by exactly the
  hand-computed amount, the training loss stays finite and keeps falling, the final evaluation runs and
  the exported model loads (strict) into the new architecture;
* resume into the new architecture: a copy of the checkpoint written right after the rebuild (the
  state a run killed there leaves behind) resumes with ``checkpoint.resume=auto`` and ends like the
  uninterrupted run (same parameter count; val loss equal to 1e-6 relative, weights to 1e-5; observed:
  bit-identical under all four backends);
* ``method.fail=true``: the surgery raises on rank 0; every rank stops within the timeout with the one
  line ``error: rebuild (...) failed on rank 0: ValueError: planned failure`` and no traceback of it
  (the launcher prints its own ChildFailedError report; a rank still in interpreter teardown when the
  other has exited gets SIGTERM from torchrun, after it printed the line).

Only the DDP prune cells run by default (3 launches of ~30 s each on an idle 2-core box, more under
load); the rest are slow (about 13 min):
    python -m pytest -q -m slow tests/distributed/test_rebuild_backends.py -p no:cacheprovider
The surgery itself is checked in-process first (exact when the removed channels' outputs are zero).
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import tests.methods.rebuild_methods as RM
from tests.conftest import ROOT, TINY, child_env, needs_fmnist, read_metrics
from tests.distributed.test_backends import EXPECT, _needs

PLUGIN = "tests.methods.rebuild_methods"
RUN_SH = os.path.join(ROOT, "launch", "run.sh")
NPROC = 2
LAUNCH_TIMEOUT = 420  # s; a launch that takes longer is a hang (the first ZeRO launch JIT-builds a comm op)
FAIL_TIMEOUT = 300  # s; a failed rebuild must stop every rank well before this

# A ResNet-20 block of stage 2 (32 channels, 3x3 convs): removing k of conv1's 32 output channels
# removes k*32*9 conv1 weights, 2k norm entries (weight, bias) and 32*k*9 conv2 weights.
PRUNE_K = 16
PRUNE_DELTA = -(PRUNE_K * 32 * 9 + 2 * PRUNE_K + 32 * PRUNE_K * 9)  # -9,248
FACT_RANK = 4
FACT_DELTA = (64 * FACT_RANK + FACT_RANK * 10 + 10) - (64 * 10 + 10)  # -344

METHODS = {
    "prune": (["method.name=test_prune_channels", "method.block=layer2.1", "method.fraction=0.5"], PRUNE_DELTA,
              "pruned"),
    "factorize": (["method.name=test_factorize_linear", f"method.rank={FACT_RANK}"], FACT_DELTA, "factorized"),
}
# BatchNorm where it is synchronised or its buffers are broadcast before the rebuild; GroupNorm on ZeRO-2
# (the configuration the backend tests train), so both norm paths of the surgery run sharded.
NORM = {"ddp": "bn", "fsdp": "bn", "zero2": "gn", "zero3": "bn"}
COMMON = ["--config", TINY, "data.train_subset=512", "data.val_subset=256", "data.batch_size=64", "optim.lr=0.05",
          "logging.progress_bar=false", "logging.log_every_steps=0", "run.channels_last=false",
          f"run.num_processes={NPROC}", "checkpoint.keep_last=3"]
STEPS_PER_EPOCH = 512 // 64


# ------------------------------------------------------------------------------------------------
# The surgery itself, in one process
# ------------------------------------------------------------------------------------------------


def _model(norm: str) -> nn.Module:
    from dist_sparse.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1, norm=norm)
    with torch.no_grad():  # non-trivial norm parameters and statistics
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _method(**fields):
    from dist_sparse.config import config_from_dict
    from dist_sparse.methods import create_method

    return create_method(config_from_dict({"method": fields}).method)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("norm", ["bn", "gn"])
@pytest.mark.parametrize("select", ["l1", "every_second"])
def test_prune_surgery_is_exact_when_removed_channels_are_zero(norm, select):
    model = _model(norm)
    method = _method(name="test_prune_channels", block="layer2.1", select=select)
    kept = method.decide(model)
    block = model.layer2[1]
    n_units, per = RM.removal_units(block)
    assert (n_units, per) == ((32, 1) if norm == "bn" else (8, 4))  # GroupNorm2d(32): 8 groups of 4
    assert len(kept) == n_units // 2
    if select == "l1":  # the kept units have the largest L1 norms of conv1's weight
        score = block.conv1.weight.detach().abs().reshape(n_units, -1).sum(1)
        assert score[kept].min() >= score[[u for u in range(n_units) if u not in kept]].max()
    else:
        assert kept == list(range(0, n_units, 2))
    removed = [u * per + i for u in range(n_units) if u not in kept for i in range(per)]
    with torch.no_grad():  # the removed channels output zero after bn1 (and ReLU)
        block.bn1.weight[removed] = 0
        block.bn1.bias[removed] = 0
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    rng = torch.get_rng_state()
    pruned = RM.prune_block_channels(copy.deepcopy(model), "layer2.1", kept)
    assert torch.equal(torch.get_rng_state(), rng)  # the surgery draws no random numbers
    assert _n_params(pruned) - _n_params(model) == PRUNE_DELTA
    assert pruned.layer2[1].conv1.out_channels == pruned.layer2[1].conv2.in_channels == PRUNE_K
    for mode in ("eval", "train"):  # train: batch statistics of the kept channels are unchanged too
        a, b = copy.deepcopy(model), copy.deepcopy(pruned)
        ya, yb = getattr(a, mode)()(x), getattr(b, mode)()(x)
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    if norm == "bn":  # running statistics follow their channels
        keep = torch.tensor(kept)
        assert torch.equal(pruned.layer2[1].bn1.running_var, block.bn1.running_var[keep])


def test_factorize_surgery_and_state():
    model = _model("gn").eval()
    x = torch.randn(4, 1, 16, 16)
    full = RM.factorize_fc(copy.deepcopy(model), 0).eval()
    assert _n_params(full) - _n_params(model) == 100  # exact at full rank: 640 + 110 vs 650
    torch.testing.assert_close(full(x), model(x), rtol=1e-5, atol=1e-5)
    low = RM.factorize_fc(copy.deepcopy(model), FACT_RANK)
    assert _n_params(low) - _n_params(model) == FACT_DELTA


@pytest.mark.parametrize("name, fields", [("test_prune_channels", {"block": "layer2.1"}),
                                          ("test_factorize_linear", {"rank": FACT_RANK})])
def test_rebuild_commit_state_prepare_and_failure(name, fields, tmp_path):
    """The Rebuild protocol in one process: surgery, commit, a state that round-trips weights_only and
    makes ``prepare`` build the new architecture; ``fail`` makes the surgery raise."""
    from dist_sparse.driver import run_surgery
    from dist_sparse.errors import RunError

    method = _method(name=name, **fields)
    model = _model("bn")
    ref = copy.deepcopy(model)
    assert method.on_epoch_end(model, 1, {}) is None  # not the configured epoch
    req = method.on_epoch_end(model, 0, {})
    new_sd = run_surgery(model, req, lambda: method.prepare(_model("bn")))
    path = tmp_path / "m.pt"
    torch.save(method.state_dict(), path)
    fresh = _method(name=name, **fields)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    built = fresh.prepare(_model("bn"))
    built.load_state_dict(new_sd, strict=True)  # the resumed architecture takes the rebuilt weights
    assert _n_params(built) == _n_params(ref) + (PRUNE_DELTA if name == "test_prune_channels" else FACT_DELTA)
    assert fresh.on_epoch_end(built, 0, {}) is None  # done once
    exported = type(fresh).build_exported(_model("bn"), json.loads(json.dumps(fresh.architecture())))
    exported.load_state_dict(new_sd, strict=True)

    failing = _method(name=name, fail=True, **fields)
    req = failing.on_epoch_end(_model("bn"), 0, {})
    with pytest.raises(RunError, match=r"^rebuild \(.+\) failed on rank 0: ValueError: planned failure$"):
        run_surgery(_model("bn"), req, lambda: failing.prepare(_model("bn")))
    assert failing.state_dict() == _method(name=name, **fields).state_dict()  # no commit


# ------------------------------------------------------------------------------------------------
# Launched runs
# ------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    rc: int
    stdout: str
    stderr: str
    seconds: float


def _launch(backend: str, out: str, name: str, args: list[str], timeout: float = LAUNCH_TIMEOUT) -> Launch:
    """launch/run.sh <backend> --nproc 2 with the test methods; a launch past ``timeout`` is killed
    (its whole process group: launcher and ranks) and fails the test as a hang."""
    env = child_env(DIST_SPARSE_PLUGINS=PLUGIN, DIST_SPARSE_SCRATCH=os.path.join(out, "tmp"), PYTHON=sys.executable)
    cmd = ["bash", RUN_SH, backend, "--nproc", str(NPROC), "--"] + COMMON + [
        f"model.norm={NORM[backend]}", f"run.output_dir={out}", f"run.name={name}"] + args
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{backend}: the launch hung (> {timeout:.0f} s)\n{stdout[-2000:]}\n{stderr[-4000:]}")
    return Launch(proc.returncode, stdout, stderr, time.time() - start)


def _ok(backend: str, res: Launch) -> Launch:
    if res.rc != 0:
        raise AssertionError(f"{backend} launch failed (rc {res.rc}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return res


def _cells(fast: set[tuple]) -> list:
    return [pytest.param(*c, marks=() if c in fast else pytest.mark.slow, id="-".join(c)) for c in CELLS]


CELLS = [(b, m) for b in ("ddp", "fsdp", "zero2", "zero3") for m in ("prune", "factorize")]


@needs_fmnist
@pytest.mark.multiproc
@pytest.mark.parametrize("backend, method", _cells({("ddp", "prune")}))
def test_trains_through_rebuild_and_resumes_into_new_architecture(backend, method, tmp_path):
    _needs(backend)
    from dist_sparse.checkpoint import load_exported, read_meta

    margs, delta, flag = METHODS[method]
    out = str(tmp_path)
    full = _ok(backend, _launch(backend, out, "full", margs + ["run.epochs=3"]))
    rows = read_metrics(os.path.join(out, "full"))
    start = [r for r in rows if r["event"] == "start"]
    epochs = [r for r in rows if r["event"] == "epoch"]
    end = [r for r in rows if r["event"] == "end"]
    assert len(start) == 1 and len(end) == 1
    assert start[0]["backend"] == EXPECT[backend] and start[0]["processes"] == NPROC, start
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert [e["method"][flag] for e in epochs] == [0, 1, 1]  # rebuilt once, at the end of epoch 0
    assert end[0]["params"] - start[0]["params"] == delta, (start[0]["params"], end[0]["params"])
    assert full.stdout.count("rebuilt the model") == 1
    losses = [e["train_loss"] for e in epochs]
    assert all(math.isfinite(v) for v in losses + [e["val_loss"] for e in epochs]), epochs
    assert losses[2] < losses[1] < losses[0], losses  # training goes on after the rebuild
    assert end[0]["val_samples"] == 256 and math.isfinite(end[0]["val_loss"]) and end[0]["val_acc"] > 0.15, end
    assert end[0]["steps"] == 3 * STEPS_PER_EPOCH
    model_full = load_exported(os.path.join(out, "full", "model.safetensors"))  # strict, new architecture
    assert _n_params(model_full) == end[0]["params"]

    # A run killed right after the rebuild leaves this checkpoint (written after the new model was
    # prepared); resume from a copy of it into a fresh run directory.
    ckpt = os.path.join(out, "full", "checkpoints", f"step_{STEPS_PER_EPOCH:08d}")
    meta = read_meta(ckpt)
    assert meta["epoch"] == 1 and meta["batch_in_epoch"] == 0 and len(meta["rebuilds"]) == 1, meta
    os.makedirs(os.path.join(out, "cut", "checkpoints"))
    shutil.copytree(ckpt, os.path.join(out, "cut", "checkpoints", os.path.basename(ckpt)))
    resumed = _ok(backend, _launch(backend, out, "cut", margs + ["run.epochs=3", "checkpoint.resume=auto"]))
    assert "resumed from" in resumed.stdout and "rebuilt the model" not in resumed.stdout
    rows2 = read_metrics(os.path.join(out, "cut"))
    start2 = [r for r in rows2 if r["event"] == "start"]
    epochs2 = [r for r in rows2 if r["event"] == "epoch"]
    end2 = [r for r in rows2 if r["event"] == "end"]
    assert start2[0]["params"] == end[0]["params"]  # the new architecture was built before loading
    assert [e["epoch"] for e in epochs2] == [1, 2] and [e["method"][flag] for e in epochs2] == [1, 1]
    assert end2[0]["params"] == end[0]["params"] and end2[0]["steps"] == end[0]["steps"]
    a, b = end[0]["val_loss"], end2[0]["val_loss"]
    assert abs(a - b) <= 1e-6 * abs(a), (backend, method, a, b)
    model_cut = load_exported(os.path.join(out, "cut", "model.safetensors"))
    sd_full, sd_cut = model_full.state_dict(), model_cut.state_dict()
    assert sd_full.keys() == sd_cut.keys()
    for k in sd_full:
        torch.testing.assert_close(sd_cut[k], sd_full[k], rtol=0, atol=1e-5, msg=lambda m: f"{k}: {m}")
    print(f"\n{backend}/{method}: full {full.seconds:.0f}s, resume {resumed.seconds:.0f}s, val_loss {a!r} vs {b!r}, "
          f"max |dw| {max((sd_cut[k].float() - sd_full[k].float()).abs().max().item() for k in sd_full):.3g}")


FAIL_CELLS = [pytest.param(b, marks=() if b == "ddp" else pytest.mark.slow, id=b)
              for b in ("ddp", "fsdp", "zero2", "zero3")]
FAIL_LINE = re.compile(r"^error: rebuild \(prune layer2\.1\.conv1 to \d+ units\) failed on rank 0: "
                       r"ValueError: planned failure$", re.M)


@needs_fmnist
@pytest.mark.multiproc
@pytest.mark.parametrize("backend", FAIL_CELLS)
def test_failed_surgery_stops_every_rank_with_one_line(backend, tmp_path):
    _needs(backend)
    out = str(tmp_path)
    res = _launch(backend, out, "fail", METHODS["prune"][0] + ["method.fail=true", "run.epochs=2",
                                                              "data.train_subset=128", "data.val_subset=64"],
                  timeout=FAIL_TIMEOUT)
    assert res.rc != 0, res.stdout[-2000:]
    lines = FAIL_LINE.findall(res.stderr)
    assert len(lines) == NPROC, res.stderr[-6000:]  # printed by every rank, once
    # The launcher reports the failed children with a traceback of its own (ChildFailedError); no
    # rank shows one for the RunError.
    assert "RunError" not in res.stderr and "raise RunError" not in res.stderr, res.stderr[-6000:]
    assert not re.search(r'File ".*dist_sparse/(train|driver)\.py"', res.stderr), res.stderr[-6000:]
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", res.stderr)  # torchrun's summary of the ranks, if any
    assert all(c in ("1", "-15") for c in codes), codes  # exit 1 (or SIGTERM from the agent after printing)
    rows = read_metrics(os.path.join(out, "fail"))
    assert [r["epoch"] for r in rows if r["event"] == "epoch"] == [0]
    assert not any(r["event"] == "end" for r in rows)
    ck_dir = os.path.join(out, "fail", "checkpoints")
    assert not os.path.isdir(ck_dir) or not any(n.startswith("step_") and not n.endswith(".tmp")
                                                for n in os.listdir(ck_dir))  # nothing saved after the failure
    print(f"\n{backend}: failed run stopped in {res.seconds:.0f}s; exit codes {codes}")
