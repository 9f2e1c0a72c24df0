"""DeiT hard distillation: the loss of Touvron et al. 2021 (eq. 3) against a hand computation, the
config checks, and a short real run with a teacher exported by a previous run."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from dist_sparse.config import load_config
from dist_sparse.errors import ConfigError
from dist_sparse.tasks import ClassificationTask
from tests.conftest import ROOT, TINY, needs_fmnist, read_metrics, run_train

DEIT = os.path.join(ROOT, "configs", "tiny_deit_dense.yaml")


def test_hard_distillation_loss_is_half_ce_plus_half_ce_to_the_teacher_argmax():
    torch.manual_seed(0)
    cls, dist = torch.randn(6, 4), torch.randn(6, 4)
    y = torch.randint(0, 4, (6,))
    teacher_logits = torch.randn(6, 4)
    task = ClassificationTask(load_config(DEIT, []), {})
    task.teacher = _Fixed(teacher_logits)
    x = torch.zeros(6, 3)
    got = task.loss(lambda _: (cls, dist), (x, y))
    want = 0.5 * F.cross_entropy(cls, y, label_smoothing=task.cfg.optim.label_smoothing) \
        + 0.5 * F.cross_entropy(dist, teacher_logits.argmax(1))
    torch.testing.assert_close(got, want)


class _Fixed(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.out


@pytest.mark.parametrize("override,key", [
    (["model.distillation=soft"], "model.distillation"),
    (["model.teacher=resnet20"], "model.teacher"),
    (["model.distillation=hard"], "model.teacher"),
    (["model.distillation=hard", "model.teacher=resnet20"], "model.teacher_checkpoint"),
])
def test_distillation_keys_are_checked(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(DEIT, override)
    assert err.value.key == key


def test_distillation_needs_a_deit():
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["model.distillation=hard", "model.teacher=resnet20"])
    assert err.value.key == "model.distillation"


@pytest.mark.slow
@needs_fmnist
def test_deit_learns_from_an_exported_teacher(tmp_path):
    quiet = ["logging.progress_bar=false", "run.num_processes=0", f"run.output_dir={tmp_path}",
             "data.train_subset=512", "data.val_subset=128", "logging.log_every_steps=1"]
    run_train(["--config", TINY, "run.epochs=1", "run.name=teacher", "checkpoint.every_epoch=false", *quiet])
    teacher = tmp_path / "teacher" / "model.safetensors"
    assert teacher.is_file()
    run_train(["--config", DEIT, "run.epochs=2", "run.name=student", "model.distillation=hard",
               f"model.teacher={teacher}", "data.batch_size=64", *quiet])
    rows = read_metrics(str(tmp_path / "student"))
    losses = [r["loss"] for r in rows if r["event"] == "train"]
    end = [r for r in rows if r["event"] == "end"][0]
    assert sum(losses[-3:]) < sum(losses[:3]) and end["val_acc"] > 0.13  # chance: 0.1
    # the student's export has the distillation token and head and loads as a plain model
    from dist_sparse import load_exported

    student = load_exported(str(tmp_path / "student" / "model.safetensors"))
    assert student.dist_token is not None and student.head_dist is not None
    out = student(torch.zeros(2, 1, 28, 28))
    assert out.shape == (2, 10)  # eval: the mean of both heads
