"""RigL under DeepSpeed ZeRO-1/2/3 equals RigL under DDP: the same masks, the same weights after 12 steps
(mask updates at steps 0, 4 and 8 - the last drops 12.5 % - with skip_sgd_on_update=false), masked weights exactly zero.

Both runs go through the real trainer (launch/run.sh, 2 CPU processes); ResNet-20 with GroupNorm and
zero-initialised residual branches keeps the comparison free of batch statistics. The ZeRO runs prove
that gradient masks reach DeepSpeed's gradient partitions, new masks reach the fp32 master copy (else
the engine's next step would bring dropped weights back) and dropped/grown positions lose their
momentum in the partitioned optimizer state (else the ZeRO weights would drift from the DDP ones).
On CPU/gloo the ZeRO weights come out bit-identical to the DDP ones; leaving out any one of the three
writes makes them differ by 2e-5 to 8e-2 and changes the reported regrown count."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, child_env, needs_fmnist, read_metrics

pytestmark = [needs_fmnist, pytest.mark.multiproc, pytest.mark.slow]

RIGL = os.path.join(ROOT, "configs", "tiny_resnet20_rigl.yaml")
COMMON = ["--config", RIGL, "model.norm=gn", "model.extra.zero_init_residual=true", "method.delta_t=4",
          "method.skip_sgd_on_update=false", "method.t_end=1.0", "method.alpha=0.5", "run.max_steps=12", "run.epochs=1", "run.deterministic=true",
          "data.train_subset=1024", "data.val_subset=128", "data.batch_size=64", "run.channels_last=false",
          "logging.progress_bar=false", "run.num_processes=2", "checkpoint.every_epoch=false"]


def _launch(backend: str, out: str, extra: list[str] = ()) -> str:
    env = child_env(DIST_SPARSE_SCRATCH=os.path.join(out, "tmp"), PYTHON=sys.executable)
    env.pop("ACCELERATE_USE_CPU", None)
    cmd = ["bash", os.path.join(ROOT, "launch", "run.sh"), backend, "--nproc", "2", "--"] + COMMON + [
        f"run.output_dir={out}", f"run.name={backend}"] + list(extra)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{backend}: {p.stdout[-2000:]}\n{p.stderr[-5000:]}"
    return os.path.join(out, backend)


def _final_report(run_dir: str) -> dict:
    reps = [e["method"] for e in read_metrics(run_dir) if e.get("event") in ("epoch", "end") and isinstance(e.get("method"), dict)]
    assert reps, f"no method report in {run_dir}/metrics.jsonl"
    return reps[-1]


def _sparse_zeros(weights: dict[str, torch.Tensor], report: dict) -> tuple[int, int]:
    """(zeros, expected zeros) over the sparse weights named in the report's density/<name> keys."""
    zeros = expected = 0
    for key, d in report.items():
        if not key.startswith("density/"):
            continue
        w = weights[key[len("density/"):]]
        zeros += int((w == 0).sum())
        expected += w.numel() - int(round(d * w.numel()))
    return zeros, expected


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rigl_ddp"))
    return _launch("ddp", out)


@pytest.mark.parametrize("stage", ["zero2", "zero1", "zero3"])
def test_rigl_zero_equals_ddp(stage, ddp_run, tmp_path):
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    got_dir = _launch(stage, str(tmp_path))
    ref = load_file(os.path.join(ddp_run, "model.safetensors"))
    got = load_file(os.path.join(got_dir, "model.safetensors"))
    rep_ref, rep_got = _final_report(ddp_run), _final_report(got_dir)
    assert rep_got["sparsity/updates"] == 3  # steps 0, 4, 8
    assert {k: v for k, v in rep_got.items() if "time" not in k} == \
        {k: v for k, v in rep_ref.items() if "time" not in k}
    # Every masked weight is exactly 0 (grown weights whose gradient stayed 0 - branches behind a
    # zero-initialised GroupNorm - are 0 too), and exactly as many entries are 0 as under DDP.
    zeros, expected = _sparse_zeros(got, rep_got)
    assert expected > 0 and zeros >= expected, f"{stage}: {zeros} zeros in the sparse weights, < {expected} masked"
    assert _sparse_zeros(ref, rep_ref) == (zeros, expected)
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-5, msg=lambda m: f"{stage} {k}: {m}")


def test_skip_sgd_on_update_refused_under_zero(tmp_path):
    pytest.importorskip("deepspeed")
    env = child_env(DIST_SPARSE_SCRATCH=os.path.join(str(tmp_path), "tmp"), PYTHON=sys.executable)
    env.pop("ACCELERATE_USE_CPU", None)
    args = [a for a in COMMON if not a.startswith("method.skip_sgd_on_update")] + [
        "method.skip_sgd_on_update=true", "run.max_steps=2", f"run.output_dir={tmp_path}", "run.name=skip"]
    cmd = ["bash", os.path.join(ROOT, "launch", "run.sh"), "zero2", "--nproc", "2", "--"] + args
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0
    assert "method.skip_sgd_on_update" in p.stdout + p.stderr
