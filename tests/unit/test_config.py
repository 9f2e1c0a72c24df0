"""Config schema: defaults, overrides, and one clear error line for every kind of bad input."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dist_sparse.config import ConfigError, load_config, parse_overrides
from tests.conftest import ROOT, TINY, child_env


def test_defaults_and_overrides():
    cfg = load_config(TINY, ["optim.lr=0.05", "run.epochs=2", "data.extra.foo=bar", "run.name=x"])
    assert cfg.optim.lr == 0.05 and cfg.run.epochs == 2 and cfg.data.extra == {"foo": "bar"}
    assert cfg.model.name == "resnet20" and cfg.method.name == "dense"
    assert cfg.run_dir.endswith("runs/x") or cfg.run_dir == "runs/x"


def test_int_widens_to_float_and_yaml_values():
    assert parse_overrides(["a.b=1", "c=true", "d=[1, 2]", "e=hello"]) == [
        ("a.b", 1), ("c", True), ("d", [1, 2]), ("e", "hello")]
    cfg = load_config(TINY, ["optim.lr=1"])
    assert isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("override, key, fragment", [
    ("optim.lrr=0.1", "optim.lrr", "known key of optim"),
    ("optim.lr=-1", "optim.lr", "> 0"),
    ("optim.lr=fast", "optim.lr", "a number"),
    ("run.epochs=0", "run.epochs", ">= 1"),
    ("run.epochs=1.5", "run.epochs", "an integer"),
    ("model.name=resnet1000", "model.name", "resnet20"),
    ("method.name=magic", "method.name", "dense"),
    ("data.name=imagenet22k", "data.name", "fashion_mnist"),
    ("optim.name=lion", "optim.name", "'sgd'"),
    ("run.mixed_precision=fp8", "run.mixed_precision", "'bf16'"),
    ("checkpoint.resume=/no/such/dir", "checkpoint.resume", "never, auto"),
    ("bogus.key=1", "bogus", "known key of the config"),
])
def test_bad_values_name_key_value_and_allowed(override, key, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    msg = str(err.value)
    assert err.value.key == key, msg
    assert fragment in msg and "\n" not in msg
    assert repr(err.value.value) in msg


def test_missing_file():
    with pytest.raises(ConfigError) as err:
        load_config("/no/such.yaml")
    assert err.value.key == "--config" and "/no/such.yaml" in str(err.value)


def test_cli_prints_one_line_and_exits_2():
    p = subprocess.run([sys.executable, "-m", "dist_sparse.train", "--config", TINY, "optim.lr=0"], cwd=ROOT,
                       env=child_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert lines == ["config error: optim.lr = 0.0 is not allowed; expected a number > 0"], p.stderr
    assert "Traceback" not in p.stderr


def test_every_config_file_loads():
    import glob
    import os

    files = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
    assert files
    for f in files:
        try:
            load_config(f)
        except ConfigError as err:  # a data set that is not installed here is the only excuse
            assert err.key == "data.root" or "install" in str(err), f"{f}: {err}"


def test_launcher_rejects_a_bad_config_before_starting_processes():
    p = subprocess.run(["bash", "launch/run.sh", "ddp", "--nproc", "2", "--", "--config", TINY, "run.epochs=0"],
                       cwd=ROOT, env=child_env(PYTHON=sys.executable), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip() == "config error: run.epochs = 0 is not allowed; expected an integer >= 1"


MALFORMED = {
    "not_a_mapping": "- run\n- model\n",
    "bad_yaml": "run: {epochs: 3\n",
    "unknown_section": "runn:\n  epochs: 3\n",
    "unknown_run_key": "run:\n  epochz: 3\n",
    "epochs_string": "run:\n  epochs: three\n",
    "epochs_zero": "run:\n  epochs: 0\n",
    "lr_zero": "optim:\n  lr: 0\n",
    "lr_negative": "optim:\n  lr: -0.1\n",
    "momentum_too_big": "optim:\n  momentum: 1.5\n",
    "unknown_optimizer": "optim:\n  name: lion\n",
    "betas_short": "optim:\n  betas: [0.9]\n",
    "unknown_model": "model:\n  name: resnet1000\n",
    "width_negative": "model:\n  width_mult: -1\n",
    "unknown_dataset": "data:\n  name: imagenet22k\n",
    "batch_zero": "data:\n  batch_size: 0\n",
    "missing_data_root": "data:\n  root: /nonexistent/fashion\n",
    "unknown_method": "method:\n  name: magic\n",
    "sparsity_one": "method:\n  name: rigl\n  sparsity: 1.0\n",
    "sparsity_negative": "method:\n  name: rigl\n  sparsity: -0.1\n",
    "delta_t_zero": "method:\n  name: rigl\n  delta_t: 0\n",
    "unknown_schedule": "schedule:\n  name: linear\n",
    "keep_last_zero": "checkpoint:\n  keep_last: 0\n",
    "method_not_mapping": "method: rigl\n",
    "bool_as_text": "logging:\n  progress_bar: yes please\n",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_config_files_stop_with_one_line_and_exit_2(name, tmp_path, capsys):
    from dist_sparse.train import main

    path = tmp_path / f"{name}.yaml"
    path.write_text(MALFORMED[name])
    assert main(["--config", str(path), f"run.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: "), err
    assert "Traceback" not in err[0]
    assert not (tmp_path / "run").exists()  # stopped before any work (no run directory)
