"""The same global batch on 1 process and on 2 processes under DDP, FSDP2, ZeRO-2 and ZeRO-3 gives the
same parameters after 10 steps, 2 epochs of 5 (ResNet-20 with GroupNorm and zero-initialised residual
branches: no batch statistics, a stable start). The 2-process weights come from the consolidated export
at the end of the run (model.safetensors), which also proves the export of sharded state loads into a
plain model. The runs keep a weight EMA (decay 0.5): its export (model_ema.safetensors, gathered from
each rank's shard of the average) and its evaluation (the average swapped into the sharded weights)
must equal the single process's too. The evaluation after the first epoch swaps the average in and out
of the shards, so the final weights also prove that training went on from the live weights."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, TINY, child_env, needs_fmnist, read_metrics, run_train

pytestmark = [needs_fmnist, pytest.mark.multiproc]

COMMON = ["--config", TINY, "model.norm=gn", "model.extra.zero_init_residual=true", "run.max_steps=10",
          "run.epochs=2", "optim.lr=0.05", "run.deterministic=true", "data.batch_size=64",
          "data.train_subset=320", "data.val_subset=128", "logging.progress_bar=false", "run.num_processes=0",
          "run.channels_last=false", "checkpoint.every_epoch=false", "model.ema_decay=0.5",
          "run.mixed_precision=no"]  # fp32: "auto" is bf16 on a CPU with AVX512-BF16, where 1e-5 cannot hold


def _launch(backend: str, out: str) -> None:
    env = child_env(DIST_SPARSE_SCRATCH=os.path.join(out, "tmp"), PYTHON=sys.executable)
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = ["bash", os.path.join(ROOT, "launch", "run.sh"), backend, "--nproc", "2", "--"] + COMMON + [
        f"run.output_dir={out}", f"run.name={backend}", "run.num_processes=2"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{backend}: {p.stdout[-2000:]}\n{p.stderr[-5000:]}"


def _weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def _check(backend: str, tmp_path) -> None:
    if backend.startswith("zero"):
        pytest.importorskip("deepspeed")
    run_train(COMMON + [f"run.output_dir={tmp_path}", "run.name=one"])
    _launch(backend, str(tmp_path))
    for export in ("model.safetensors", "model_ema.safetensors"):
        ref = _weights(str(tmp_path / "one" / export))
        got = _weights(str(tmp_path / backend / export))
        assert ref.keys() == got.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-5, msg=lambda m: f"{backend} {export} {k}: {m}")
    ends = {name: [r for r in read_metrics(str(tmp_path / name)) if r["event"] == "end"][-1] for name in ("one", backend)}
    assert ends["one"]["ema_val_loss"] != ends["one"]["val_loss"]  # the average is not the live model
    for key in ("val_loss", "ema_val_loss"):
        assert abs(ends[backend][key] - ends["one"][key]) < 1e-4, (key, ends)
    from dist_sparse.models import create_model

    plain = create_model("resnet20", num_classes=10, in_chans=1, norm="gn", zero_init_residual=True)
    plain.load_state_dict(got, strict=True)  # the export is a plain state dict


def test_ddp_equals_single_process(tmp_path):
    _check("ddp", tmp_path)


@pytest.mark.slow
def test_fsdp2_equals_single_process(tmp_path):
    _check("fsdp", tmp_path)


@pytest.mark.slow
def test_zero2_equals_single_process(tmp_path):
    _check("zero2", tmp_path)


@pytest.mark.slow
def test_zero3_equals_single_process(tmp_path):
    _check("zero3", tmp_path)
