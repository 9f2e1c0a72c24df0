"""`dist-sparse flops` and the finalized export of a masked run, as a user runs them."""
from __future__ import annotations

import subprocess
import sys

import torch

from tests.conftest import ROOT, child_env, needs_fmnist, read_metrics, run_train

pytestmark = [needs_fmnist]

RIGL = "configs/tiny_resnet20_rigl.yaml"
SMALL = ["data.train_subset=256", "data.val_subset=128", "data.batch_size=32", "logging.progress_bar=false",
         "run.num_processes=0", "method.delta_t=2"]


def _cli(*args):
    p = subprocess.run([sys.executable, "-m", "dist_sparse.cli", *args], cwd=ROOT, env=child_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_flops_table_and_finalized_export_of_a_rigl_run(tmp_path):
    import dist_sparse

    common = [f"run.output_dir={tmp_path}", "run.name=f", "run.max_steps=4", *SMALL]  # the run's own settings
    run_train(["--config", RIGL, *common])
    end = read_metrics(str(tmp_path / "f"))[-1]
    assert end["event"] == "end" and 0.3 < end["flops/forward_fraction"] < 0.5  # ERK 80 %: ~36.5 % of dense

    out = _cli("flops", "--config", RIGL, "--checkpoint", str(tmp_path / "f" / "checkpoints"), *common)
    assert "layer3.2.conv2" in out and "total" in out and "% of dense" in out
    assert f"nonzero {end['nonzero_params']:,}" in out  # one source for the number: the same as the run's

    path = tmp_path / "exported.safetensors"
    _cli("export", "--config", RIGL, "--checkpoint", str(tmp_path / "f" / "checkpoints"), "--out", str(path), *common)
    model = dist_sparse.load_exported(str(path))
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    assert nonzero == end["nonzero_params"]
    final = dist_sparse.load_exported(str(tmp_path / "f" / "model.safetensors"))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), final(x))
