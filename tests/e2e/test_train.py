"""End-to-end training on real Fashion-MNIST: learning, 1 vs 2 processes, kill + resume, rebuild."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, TINY, child_env, needs_fmnist, read_metrics, run_train

pytestmark = [needs_fmnist]

SMALL = ["data.train_subset=2048", "data.val_subset=1000", "logging.progress_bar=false", "run.num_processes=0"]


def _final_weights(run_dir: str) -> dict[str, torch.Tensor]:
    from dist_sparse.checkpoint import find_latest
    from safetensors.torch import load_file

    latest = find_latest(os.path.join(run_dir, "checkpoints"))
    return load_file(os.path.join(latest, "model.safetensors"))


def test_single_process_learns_and_writes_run_dir(tmp_path):
    run_train(["--config", TINY, f"run.output_dir={tmp_path}", "run.name=a", "run.epochs=2", *SMALL])
    run_dir = tmp_path / "a"
    rows = read_metrics(str(run_dir))
    epochs = [r for r in rows if r["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert epochs[-1]["val_acc"] > 0.6  # chance is 0.10
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert rows[-1]["event"] == "end" and rows[-1]["params"] == 269_722 - 2 * 9 * 16  # resnet20, 1 input channel
    assert (run_dir / "config.yaml").is_file()
    assert len(os.listdir(run_dir / "checkpoints")) == 2  # keep_last


@pytest.mark.multiproc
def test_one_vs_two_processes_same_global_batch(tmp_path):
    # GroupNorm (no batch statistics) and zero-initialised residual branches: a stable start, so the
    # float32 rounding differences of a 64 vs 2x32 batch (~3e-8 after one step) are not amplified.
    common = ["--config", TINY, "model.norm=gn", "model.extra.zero_init_residual=true", "run.max_steps=20",
              "run.epochs=1", "optim.lr=0.05",
              "checkpoint.every_epoch=true", "run.deterministic=true", "data.batch_size=64",
              "run.mixed_precision=no", *SMALL]  # fp32: "auto" is bf16 on CPUs with AVX512-BF16
    run_train(common + [f"run.output_dir={tmp_path}", "run.name=one"], nproc=1)
    p = run_train(common + [f"run.output_dir={tmp_path}", "run.name=two"], nproc=2)
    assert "processes=2" in p.stdout
    a, b = _final_weights(str(tmp_path / "one")), _final_weights(str(tmp_path / "two"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
    first = read_metrics(str(tmp_path / "one"))
    assert [r for r in first if r["event"] == "end"][0]["steps"] == 20


def _losses(run_dir: str) -> dict[int, float]:
    out = {}
    for r in read_metrics(run_dir):
        if r["event"] == "train":
            out[r["step"]] = r["loss"]  # a resumed run repeats steps: the last record wins
    return out


RIGL = os.path.join(ROOT, "configs", "tiny_resnet20_rigl.yaml")


FOLDER = ["data.name=image_folder", "data.root={folder}", "data.num_workers=2", "data.extra.img_size=28",
          "data.extra.channels=1", "data.extra.mean=[0.286]", "data.extra.std=[0.353]"]


@pytest.mark.parametrize("config, extra", [(TINY, []), (RIGL, ["method.delta_t=5", "model.ema_decay=0.9"]),
                                           (TINY, FOLDER)],
                         ids=["dense", "rigl", "png_folder_2_workers"])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, config, extra):
    """SIGKILL mid-run, resume: every later step's loss equals the uninterrupted run's (for RigL the
    replayed steps include a mask update, so masks, schedule and optimizer state must resume exactly;
    for the PNG folder, decoded and augmented by 2 worker processes, the data order and every
    sample's augmentation must continue exactly). The RigL run keeps a weight EMA: its evaluation and
    export continue exactly too, and the exported average is as sparse as the model (same zeros)."""
    if "data.root={folder}" in extra:
        from tests.unit.test_pipeline import write_fmnist_folder

        write_fmnist_folder(tmp_path / "png", per_class=160)
        extra = [e.format(folder=tmp_path / "png") for e in extra]
    args = ["--config", config, *extra, "run.epochs=2", "run.deterministic=true", "checkpoint.every_steps=4",
            "logging.log_every_steps=1", "data.train_subset=1536", "data.val_subset=256",
            "logging.progress_bar=false", "run.num_processes=0", f"run.output_dir={tmp_path}"]
    run_train(args + ["run.name=ref"])
    ref = _losses(str(tmp_path / "ref"))
    assert len(ref) == 24

    run_dir = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "dist_sparse.train"] + args + ["run.name=cut"], cwd=ROOT,
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(_losses(str(run_dir)) or {0: 0}) >= 14:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(str(run_dir)))
    assert 14 <= killed_at < 24, "the run should die mid-training"
    run_train(args + ["run.name=cut", "checkpoint.resume=auto"])
    got = _losses(str(run_dir))
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == ref[step], (step, got[step], ref[step])
    ends = [r for r in read_metrics(str(run_dir)) if r["event"] == "end"]
    ref_end = [r for r in read_metrics(str(tmp_path / "ref")) if r["event"] == "end"][0]
    assert ends[-1]["val_acc"] == ref_end["val_acc"]
    assert ends[-1]["nonzero_params"] == ref_end["nonzero_params"]
    if "model.ema_decay=0.9" in extra:
        from safetensors.torch import load_file

        assert ends[-1]["ema_val_loss"] == ref_end["ema_val_loss"] != ref_end["val_loss"]
        ema, ema_ref = load_file(str(run_dir / "model_ema.safetensors")), load_file(str(tmp_path / "ref" / "model_ema.safetensors"))
        live = load_file(str(run_dir / "model.safetensors"))
        for k in ema_ref:
            assert torch.equal(ema[k], ema_ref[k]), k
            if live[k].ndim > 1:  # masked weights: the average has exactly the model's zeros
                assert torch.equal(ema[k] == 0, live[k] == 0), k


KILL_IN_SAVE = r"""
import os, signal, sys, torch
import dist_sparse.checkpoint as ck
real_save = torch.save
count = {"n": 0}
def dying_save(obj, f, *a, **k):
    if str(f).endswith("method.pt"):
        count["n"] += 1
        if count["n"] == 2:      # the second checkpoint: die half way through writing it
            real_save(obj, f, *a, **k)
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)
ck.torch.save = dying_save
from dist_sparse.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    from dist_sparse.checkpoint import find_latest, read_meta

    args = ["--config", TINY, "run.epochs=1", "checkpoint.every_steps=3", "checkpoint.every_epoch=false",
            "data.train_subset=1024", "data.val_subset=256", "logging.progress_bar=false", "run.num_processes=0",
            f"run.output_dir={tmp_path}", "run.name=k"]
    p = subprocess.run([sys.executable, "-c", KILL_IN_SAVE] + args, cwd=ROOT, env=child_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL
    ck_dir = tmp_path / "k" / "checkpoints"
    assert any(n.endswith(".tmp") for n in os.listdir(ck_dir))  # the half-written one
    latest = find_latest(str(ck_dir))
    assert latest.endswith("step_00000003") and read_meta(latest)["step"] == 3
    run_train(args + ["checkpoint.resume=auto"])
    rows = read_metrics(str(tmp_path / "k"))
    assert rows[-1]["event"] == "end" and rows[-1]["steps"] == 8
    assert not any(n.endswith(".tmp") for n in os.listdir(ck_dir))


def test_export_checkpoint_equals_final_weights(tmp_path):
    from safetensors.torch import load_file

    args = ["--config", TINY, "run.max_steps=3", "run.epochs=1", f"run.output_dir={tmp_path}", "run.name=e", *SMALL]
    run_train(args)
    out = tmp_path / "exported.safetensors"
    p = subprocess.run([sys.executable, "-m", "dist_sparse.cli", "export", "--config", TINY, "--checkpoint",
                        str(tmp_path / "e" / "checkpoints"), "--out", str(out), f"run.output_dir={tmp_path}",
                        "run.name=e", *SMALL], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "step 3" in p.stdout
    final, exported = load_file(str(tmp_path / "e" / "model.safetensors")), load_file(str(out))
    assert final.keys() == exported.keys()
    for k in final:
        assert torch.equal(final[k], exported[k]), k


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    """2 micro-batches of 32 with grad_accum_steps=2 == one batch of 64 (GroupNorm: no batch statistics)."""
    common = ["--config", TINY, "model.norm=gn", "model.extra.zero_init_residual=true", "run.max_steps=6",
              "run.epochs=1", "optim.lr=0.05", "run.deterministic=true", "data.augment=false",
              "checkpoint.every_epoch=false", f"run.output_dir={tmp_path}", "run.mixed_precision=no", *SMALL]
    run_train(common + ["run.name=big", "data.batch_size=64"])
    run_train(common + ["run.name=acc", "data.batch_size=32", "optim.grad_accum_steps=2"])
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "big" / "model.safetensors")), load_file(str(tmp_path / "acc" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=lambda m: f"{k}: {m}")
    ends = [r for r in read_metrics(str(tmp_path / "acc")) if r["event"] == "end"]
    assert ends[0]["steps"] == 6  # optimizer steps, not micro-batches


def test_world_size_mismatch_is_refused_before_work(tmp_path):
    p = run_train(["--config", TINY, "run.num_processes=2", f"run.output_dir={tmp_path}"], check=False)
    assert p.returncode == 2
    assert "config error: run.num_processes = 2 is not allowed; expected the number of processes this run was " \
           "launched with (1)" in p.stderr
    assert "Traceback" not in p.stderr
