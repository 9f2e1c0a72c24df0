"""Checkpoints that never leave a moment without a valid one, resume on another number of processes,
clean exits, and precision settings that cannot work refused at start-up."""
from __future__ import annotations

import os

import pytest
import torch

from dist_sparse import checkpoint as ck
from dist_sparse.config import ConfigError, load_config
from tests.conftest import TINY, needs_fmnist, read_metrics, run_train


class _FakeAccelerator:
    is_main_process = True

    def __init__(self):
        self.saved = 0

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        self.saved += 1
        with open(os.path.join(path, "model.bin"), "w") as fh:
            fh.write(str(self.saved))


def test_resaving_a_step_keeps_a_valid_checkpoint_at_every_moment(tmp_path, monkeypatch):
    acc, d = _FakeAccelerator(), str(tmp_path / "ck")
    first = ck.save_checkpoint(acc, d, 5, {"step": 5}, {"m": 1}, keep_last=1)
    assert ck.find_latest(d) == first
    seen = []
    real_replace = os.replace

    def watching_replace(src, dst):  # after every rename inside a save there must be a valid checkpoint
        real_replace(src, dst)
        if os.path.dirname(dst) == d:
            seen.append(ck.find_latest(d))

    monkeypatch.setattr(ck.os, "replace", watching_replace)
    again = ck.save_checkpoint(acc, d, 5, {"step": 5}, {"m": 2}, keep_last=1)
    assert again == first and all(p is not None for p in seen) and len(seen) == 2
    with open(os.path.join(again, "model.bin")) as fh:
        assert fh.read() == "2"  # the new copy won
    assert sorted(os.listdir(d)) == ["step_00000005"]


def test_a_crash_between_the_two_renames_resumes_from_the_old_copy(tmp_path, monkeypatch):
    acc, d = _FakeAccelerator(), str(tmp_path / "ck")
    ck.save_checkpoint(acc, d, 5, {"step": 5}, {"m": 1}, keep_last=1)
    real_replace = os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # meta.json.part -> meta.json, final -> .old, then tmp -> final: crash here
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(acc, d, 5, {"step": 5}, {"m": 2}, keep_last=1)
    latest = ck.find_latest(d)
    assert latest is not None and latest.endswith("step_00000005.old")
    assert ck.read_meta(latest) == {"step": 5}
    monkeypatch.setattr(ck.os, "replace", real_replace)
    final = ck.save_checkpoint(acc, d, 6, {"step": 6}, {"m": 3}, keep_last=1)  # the next save tidies up
    assert ck.find_latest(d) == final and sorted(os.listdir(d)) == ["step_00000006"]


def test_fp16_without_cuda_is_refused_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: fp16 is allowed")
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["run.mixed_precision=fp16"])
    assert err.value.key == "run.mixed_precision" and "without CUDA" in str(err.value)


def test_auto_precision_follows_the_hardware():
    from dist_sparse.backend import fast_bf16, resolve_mixed_precision

    assert resolve_mixed_precision("auto") == ("bf16" if fast_bf16() else "no")
    assert resolve_mixed_precision("bf16") == "bf16" and resolve_mixed_precision("no") == "no"


@needs_fmnist
@pytest.mark.multiproc
def test_ddp_checkpoint_resumes_on_one_process_and_exits_cleanly(tmp_path):
    """2 -> 1 process: the data order is a list of global batches, so a DDP run continues exactly
    where it stopped; every process exits 0 (the process group is shut down)."""
    common = ["--config", TINY, "model.norm=gn", "model.extra.zero_init_residual=true", "data.train_subset=512",
              "data.val_subset=128", "data.batch_size=64", "run.epochs=1", "checkpoint.every_steps=4",
              "checkpoint.every_epoch=false", "logging.log_every_steps=1", "logging.progress_bar=false",
              "run.num_processes=0", 'run.mixed_precision="no"', "schedule.name=constant",  # lr independent of max_steps
              f"run.output_dir={tmp_path}"]
    ref = run_train(common + ["run.name=ref"], nproc=2)
    assert "terminate called" not in ref.stderr and "Traceback" not in ref.stderr
    run_train(common + ["run.name=cut", "run.max_steps=4", "checkpoint.every_epoch=true"], nproc=2)  # saves step 4
    resumed = run_train(common + ["run.name=cut", "checkpoint.resume=auto"], nproc=1)
    assert "resuming a 2-process checkpoint on 1 processes" in resumed.stdout + resumed.stderr
    want = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "ref")) if r["event"] == "train"}
    got = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "cut")) if r["event"] == "train"}
    assert sorted(got) == sorted(want) == list(range(1, 9))
    for step in range(5, 9):  # after the resume: 1 process on the same global batches
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), step
