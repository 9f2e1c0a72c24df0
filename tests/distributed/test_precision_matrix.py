"""Mixed precision on every backend: {no, bf16, fp16} x {single, ddp, fsdp, zero1, zero2, zero3} x
{resnet20 (GroupNorm), resnet20_bn (BatchNorm), deit_micro, transformer_tiny}, 10 optimizer steps each
through launch/run.sh. Every cell trains with a finite loss that falls, or is refused at start-up with
exactly one line (fp16 without CUDA). The full matrix is slow (72 launches); three cells run in the
default set: the DeepSpeed bf16 image model that used to crash in its first forward, BatchNorm under
FSDP2 bf16 (it used to crash there too), and the fp16 refusal."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, needs_fmnist

pytestmark = [pytest.mark.multiproc, needs_fmnist]

PRECISIONS = ["no", "bf16", "fp16"]
BACKENDS = ["single", "ddp", "fsdp", "zero1", "zero2", "zero3"]
MODELS = {
    "resnet20": ["--config", "configs/tiny_resnet20_dense.yaml", "model.norm=gn", "data.train_subset=320",
                 "data.val_subset=64", "data.batch_size=32", "optim.lr=0.02", "schedule.name=constant",
                 "schedule.warmup_epochs=0"],
    # BatchNorm: FSDP2 and DeepSpeed hand its weight in bf16 beside fp32 running statistics
    "resnet20_bn": ["--config", "configs/tiny_resnet20_dense.yaml", "model.norm=bn", "data.train_subset=320",
                    "data.val_subset=64", "data.batch_size=32", "optim.lr=0.02", "schedule.name=constant",
                    "schedule.warmup_epochs=0"],
    "deit_micro": ["--config", "configs/tiny_deit_dense.yaml", "data.train_subset=320", "data.val_subset=64",
                   "data.batch_size=32", "schedule.name=constant", "optim.lr=0.002"],
    "transformer_tiny": ["--config", "configs/tiny_transformer_dense.yaml", "model.name=transformer_tiny",
                         "data.name=copy", "data.max_tokens=512", "data.extra={num_train: 512, num_valid: 64, num_test: 32}",
                         "optim.lr=0.003", "schedule.name=constant", "data.extra.bleu_at_end=false"],
}


def _launch(precision: str, backend: str, model: str, out: str) -> subprocess.CompletedProcess:
    nproc = "1" if backend == "single" else "2"
    args = MODELS[model] + [f"run.mixed_precision={precision}", f"run.output_dir={out}", "run.name=m",
                            "run.max_steps=10", "run.epochs=10", "run.num_processes=0", "logging.log_every_steps=1",
                            "logging.progress_bar=false", "checkpoint.every_epoch=false", "checkpoint.save_final=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, DIST_SPARSE_SCRATCH=os.path.join(out, "tmp"))
    cmd = ["bash", os.path.join(ROOT, "launch", "run.sh"), backend, "--nproc", nproc, "--"] + args
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _check(precision: str, backend: str, model: str, tmp_path) -> None:
    proc = _launch(precision, backend, model, str(tmp_path))
    if precision == "fp16" and not torch.cuda.is_available():
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert lines == ["config error: run.mixed_precision = 'fp16' is not allowed; expected bf16, auto or no on "
                         "a machine without CUDA (fp16 autocast and loss scaling need a GPU)"], lines
        return
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    rows = [json.loads(ln) for ln in open(os.path.join(tmp_path, "m", "metrics.jsonl"))]
    losses = [r["loss"] for r in rows if r["event"] == "train"]
    assert len(losses) == 10 and all(l == l and abs(l) < 1e4 for l in losses), losses
    assert sum(losses[-3:]) < sum(losses[:3]), losses  # it learns
    start = [r for r in rows if r["event"] == "start"][0]
    assert start["backend"] == {"fsdp": "fsdp2"}.get(backend, backend)
    if backend.startswith("zero"):  # the engine's own view: micro-batch per rank = global batch / processes
        batch = 32 if model != "transformer_tiny" else None
        ds = start["deepspeed"]
        assert ds["zero_stage"] == int(backend[-1]) and ds["gradient_accumulation_steps"] == 1
        if batch:
            assert ds["train_micro_batch_size_per_gpu"] == batch // 2 and ds["train_batch_size"] == batch, ds
        assert ds["dtype"] == {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision], ds


@pytest.mark.parametrize("precision,backend,model", [("bf16", "zero2", "resnet20"), ("bf16", "fsdp", "resnet20_bn"),
                                                          ("fp16", "ddp", "resnet20")])
def test_precision_fast_cells(precision, backend, model, tmp_path):
    _check(precision, backend, model, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_precision_matrix(precision, backend, model, tmp_path):
    _check(precision, backend, model, tmp_path)
