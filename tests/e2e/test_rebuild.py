"""Rebuild: a method that changes the architecture mid-run (the classifier becomes a two-factor
low-rank product, exactly equal at full rank); the trainer re-prepares model, optimizer and schedule,
training goes on, and a checkpoint written after the change resumes into the new architecture."""
from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT, TINY, child_env, needs_fmnist, read_metrics

pytestmark = [needs_fmnist]

SCRIPT = r'''
import sys, torch
from torch import nn
from dist_sparse.methods import Method, Rebuild, register_method

def factorize_fc(model):
    fc = model.fc
    u, s, vh = torch.linalg.svd(fc.weight.detach().double(), full_matrices=False)
    first = nn.Linear(fc.in_features, len(s), bias=False)
    second = nn.Linear(len(s), fc.out_features)
    first.weight.data = (s.sqrt()[:, None] * vh).float()
    second.weight.data = (u * s.sqrt()[None, :]).float()
    second.bias.data = fc.bias.detach().clone()
    model.fc = nn.Sequential(first, second)
    return model

@register_method
class SplitFC(Method):
    name = "test_split_fc"
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.split = False
    def prepare(self, model):
        if self.split:              # resume / rebuild: build the post-surgery architecture
            model = factorize_fc(model)
        return model
    def on_epoch_end(self, model, epoch, metrics=None):
        if epoch == 0 and not self.split:
            def commit():
                self.split = True
            return Rebuild(surgery=factorize_fc, commit=commit, reason="fc -> low-rank pair")
        return None
    def report(self):
        return {"split": int(self.split)}
    def state_dict(self):
        return {"split": self.split}
    def load_state_dict(self, s):
        self.split = bool(s["split"])

from dist_sparse.train import main
sys.exit(main(sys.argv[1:]))
'''


def _run(args):
    p = subprocess.run([sys.executable, "-c", SCRIPT] + args, cwd=ROOT, env=child_env(), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-5000:]
    return p


def test_rebuild_mid_run_and_resume(tmp_path):
    base = ["--config", TINY, "method.name=test_split_fc", "data.train_subset=1024", "data.val_subset=500",
            "logging.progress_bar=false", "run.num_processes=0", f"run.output_dir={tmp_path}", "run.name=r"]
    _run(base + ["run.epochs=3"])
    rows = read_metrics(str(tmp_path / "r"))
    epochs = [r for r in rows if r["event"] == "epoch"]
    start = [r for r in rows if r["event"] == "start"][0]
    end = [r for r in rows if r["event"] == "end"][0]
    assert [e["method"]["split"] for e in epochs] == [0, 1, 1]
    # fc 64->10 (650 params) became 64->10 (640, no bias) + 10->10 (110): +100 parameters exactly
    assert end["params"] - start["params"] == 100
    assert epochs[2]["train_loss"] < epochs[0]["train_loss"]  # training went on after the rebuild
    assert end["val_acc"] > 0.3  # chance is 0.1

    _run(base + ["run.epochs=4", "checkpoint.resume=auto"])  # resumes into the factorized model (strict load)
    rows = read_metrics(str(tmp_path / "r"))
    assert [r["epoch"] for r in rows if r["event"] == "epoch"] == [0, 1, 2, 3]
    assert rows[-1]["event"] == "end" and rows[-1]["params"] == end["params"]
