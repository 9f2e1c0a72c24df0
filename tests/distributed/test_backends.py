"""End to end: the trainer under every backend through launch/run.sh with 2 processes.

For each backend: train ResNet-20 (GroupNorm, so ranks need no BatchNorm sync) for 2 short epochs,
check the training loss fell and the backend is the one asked for, then relaunch with one more epoch
and checkpoint.resume=auto and check it resumed from the saved step instead of starting over.

Each launch costs 20-60 s on a 2-core box, so every case is marked slow:
    python -m pytest -q -m slow tests/distributed/test_backends.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKENDS = ["ddp", "fsdp", "zero1", "zero2", "zero3"]
EXPECT = {"ddp": "ddp", "fsdp": "fsdp2", "zero1": "zero1", "zero2": "zero2", "zero3": "zero3"}
COMMON = ["--config", "configs/tiny_resnet20_dense.yaml", "model.norm=gn", "data.train_subset=512",
          "data.val_subset=128", "data.batch_size=64", "optim.lr=0.05", "schedule.name=constant",
          "schedule.warmup_epochs=0", "logging.progress_bar=false", "logging.log_every_steps=0",
          "run.channels_last=false"]

pytestmark = [pytest.mark.multiproc]


def _launch(backend: str, out: str, epochs: int, resume: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", DIST_SPARSE_SCRATCH=os.path.join(out, "tmp"))
    args = COMMON + [f"run.output_dir={out}", f"run.name={backend}", f"run.epochs={epochs}",
                     f"checkpoint.resume={resume}"]
    cmd = ["bash", os.path.join(ROOT, "launch", "run.sh"), backend, "--nproc", "2", "--"] + args
    env.setdefault("PYTHON", sys.executable)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{backend} launch failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def _events(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _needs(backend: str) -> None:
    if backend.startswith("zero"):
        try:
            import deepspeed  # noqa: F401
        except Exception as err:  # not installed, or broken
            pytest.skip(f"deepspeed does not import: {type(err).__name__}: {err}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_train_and_resume(backend, tmp_path):
    _needs(backend)
    out = str(tmp_path)
    _launch(backend, out, epochs=2, resume="never")
    ev = _events(os.path.join(out, backend, "metrics.jsonl"))
    start = [e for e in ev if e["event"] == "start"][0]
    assert start["backend"] == EXPECT[backend] and start["processes"] == 2, start
    epochs = [e for e in ev if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"], epochs
    steps_2 = epochs[1]["step"]
    assert steps_2 == 2 * epochs[0]["step"] > 0

    proc = _launch(backend, out, epochs=3, resume="auto")
    assert "resumed from" in proc.stdout + proc.stderr
    ev2 = _events(os.path.join(out, backend, "metrics.jsonl"))[len(ev):]
    epochs2 = [e for e in ev2 if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs2] == [2], epochs2  # only the new epoch ran
    assert epochs2[0]["step"] == 3 * epochs[0]["step"]
    assert epochs2[0]["train_loss"] < epochs[0]["train_loss"]
    # the consolidated export of the (possibly sharded) final state loads into a plain model
    from safetensors.torch import load_file

    from dist_sparse.models import create_model

    plain = create_model("resnet20", num_classes=10, in_chans=1, norm="gn")
    plain.load_state_dict(load_file(os.path.join(out, backend, "model.safetensors")), strict=True)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_hook_and_writeback(backend, tmp_path):
    """backend.backward's hook sees the full gradient (even under ZeRO, where accelerate's backward
    already steps), and a gather_full writeback survives the next optimizer step (_stats_ds_grad.py)."""
    _needs(backend)
    env = dict(os.environ, OMP_NUM_THREADS="1", DIST_SPARSE_SCRATCH=str(tmp_path), PYTHON=sys.executable)
    cmd = ["bash", os.path.join(ROOT, "launch", "run.sh"), backend, "--nproc", "2",
           "--module", "tests.distributed._stats_ds_grad", "--"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert proc.stdout.count(f"OK {EXPECT[backend]} processes=2") == 2, proc.stdout[-2000:]


TRANSFORMER = ["--config", "configs/tiny_transformer_dense.yaml", "model.name=transformer_tiny", "data.name=copy",
               "data.max_tokens=512", "data.extra={num_train: 512, num_valid: 64, num_test: 32}",
               'run.mixed_precision="no"', "optim.lr=0.003", "schedule.warmup_steps=5", "optim.grad_clip=0",
               "logging.progress_bar=false", "logging.log_every_steps=1", "data.extra.bleu_limit=16",
               "data.extra.beam_size=1"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_transformer_trains_resumes_and_exports(backend, tmp_path):
    """The tiny Transformer (copy task) under each backend: loss falls, resume continues from the saved
    step, and the consolidated export loads into a plain model (strict)."""
    _needs(backend)
    out = str(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", DIST_SPARSE_SCRATCH=os.path.join(out, "tmp"), PYTHON=sys.executable)

    def launch(steps: int, resume: str) -> None:
        args = TRANSFORMER + [f"run.output_dir={out}", "run.name=t", "run.epochs=10", f"run.max_steps={steps}",
                              f"checkpoint.resume={resume}", "checkpoint.every_steps=4"]
        cmd = ["bash", os.path.join(ROOT, "launch", "run.sh"), backend, "--nproc", "2", "--"] + args
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{backend}: {p.stdout[-2000:]}\n{p.stderr[-6000:]}"

    launch(8, "never")
    launch(16, "auto")
    ev = _events(os.path.join(out, "t", "metrics.jsonl"))
    losses = {e["step"]: e["loss"] for e in ev if e["event"] == "train"}
    assert sorted(losses) == list(range(1, 17))  # the resumed launch continued at step 9
    assert [e["step"] for e in ev if e["event"] == "start"] == [0, 8]
    assert sum(losses[s] for s in range(13, 17)) < sum(losses[s] for s in range(1, 5))
    from safetensors.torch import load_file

    from dist_sparse.models import create_model

    sd = load_file(os.path.join(out, "t", "model.safetensors"))
    model = create_model("transformer_tiny", vocab_size=sd["embed_tokens.weight"].shape[0])
    model.load_state_dict(sd, strict=True)


PIPELINE_PRECISION = {"ddp": "no", "fsdp": "bf16", "zero1": "no", "zero2": "bf16", "zero3": "bf16"}


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_image_folder_pipeline_trains_and_resumes(backend, tmp_path):
    """The decoded-image pipeline under each backend: PNG files decoded and augmented by 2 DataLoader
    workers per rank (RandomResizedCrop, Random Erasing, Mixup/CutMix soft targets), bf16 on the sharded
    backends; the loss stays finite, a relaunch resumes at the saved step, the export loads."""
    _needs(backend)
    from tests.unit.test_pipeline import write_fmnist_folder

    write_fmnist_folder(tmp_path / "png", per_class=32)
    out = str(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", DIST_SPARSE_SCRATCH=os.path.join(out, "tmp"), PYTHON=sys.executable)
    args = ["--config", "configs/tiny_resnet20_dense.yaml", "model.norm=gn", "data.name=image_folder",
            f"data.root={tmp_path / 'png'}", "data.num_workers=2", "data.extra.img_size=28", "data.extra.channels=1",
            "data.extra.mean=[0.286]", "data.extra.std=[0.353]", "data.transform=rrc", "data.scale=[0.35, 1.0]",
            "data.mixup=0.8", "data.cutmix=1.0", "data.batch_size=64", "optim.lr=0.05", "schedule.warmup_epochs=0",
            f"run.mixed_precision={PIPELINE_PRECISION[backend]}", "logging.progress_bar=false",
            "logging.log_every_steps=1", "run.channels_last=false", f"run.output_dir={out}", "run.name=p"]

    def launch(epochs: int, resume: str) -> None:
        cmd = ["bash", os.path.join(ROOT, "launch", "run.sh"), backend, "--nproc", "2", "--"] + args + [
            f"run.epochs={epochs}", f"checkpoint.resume={resume}"]
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{backend}: {p.stdout[-2000:]}\n{p.stderr[-6000:]}"

    launch(1, "never")
    launch(2, "auto")
    ev = _events(os.path.join(out, "p", "metrics.jsonl"))
    starts = [e for e in ev if e["event"] == "start"]
    assert [s["step"] for s in starts] == [0, 5] and starts[0]["backend"] == EXPECT[backend]
    losses = {e["step"]: e["loss"] for e in ev if e["event"] == "train"}
    assert sorted(losses) == list(range(1, 11))  # 320 images / 64 = 5 steps per epoch, resumed at 6
    assert all(0 < v < 10 for v in losses.values()), losses
    from safetensors.torch import load_file

    from dist_sparse.models import create_model

    plain = create_model("resnet20", num_classes=10, in_chans=1, norm="gn")
    plain.load_state_dict(load_file(os.path.join(out, "p", "model.safetensors")), strict=True)
