"""Bad input that used to slip through: float spellings, duplicate keys, non-text files, model/data
pairings, a key that did nothing, and 20+ more malformed files and overrides. Each stops the CLI with
exit code 2 and exactly one line that names the key, the value and what is allowed."""
from __future__ import annotations

import pytest

from dist_sparse.config import ConfigError, load_config
from tests.conftest import TINY


def test_float_spellings_people_write_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  weight_decay: 3.05e-5\n  lr: 1e-1\n  eps: 1E-8\nschedule:\n  gamma: 5e-1\n")
    cfg = load_config(str(path), ["optim.momentum=9e-1", "optim.label_smoothing=1e-1"])
    assert cfg.optim.weight_decay == 3.05e-5 and cfg.optim.lr == 0.1 and cfg.optim.eps == 1e-8
    assert cfg.schedule.gamma == 0.5 and cfg.optim.momentum == 0.9 and cfg.optim.label_smoothing == 0.1
    assert load_config(TINY, ["optim.weight_decay=3e-5"]).optim.weight_decay == 3e-5
    assert load_config(TINY, ["run.name=1e5"]).run.name == "1e5"  # a string field keeps what was written
    assert load_config(TINY, ["data.extra.tag='3e-5'"]).data.extra["tag"] == "3e-5"  # quoted stays a string


@pytest.mark.parametrize("text,line", [("run: {epochs: 1, epochs: 2}\n", "lines 1 and 1"),
                                       ("run:\n  epochs: 1\n  seed: 3\n  epochs: 2\n", "lines 2 and 4"),
                                       ("optim:\n  lr: 0.1\noptim:\n  lr: 0.2\n", "lines 1 and 3")])
def test_duplicate_key_is_an_error_naming_key_and_lines(tmp_path, text, line):
    path = tmp_path / "d.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert line in str(err.value) and "\n" not in str(err.value)


def test_model_that_does_not_fit_the_data_is_refused_before_building():
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["model.name=transformer_wmt_base"])
    assert err.value.key == "data.name" and "translation data set" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["data.name=copy"])  # resnet20 on a translation data set
    assert err.value.key == "data.name" and "classification data set" in str(err.value)


def test_num_workers_is_refused_for_the_in_memory_set():
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["data.num_workers=4"])
    assert err.value.key == "data.num_workers"


FILES = {  # file content -> what the single error line must mention
    "latin1": (b"run:\n  name: caf\xe9\n", "UTF-8"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "UTF-8"),
    "nul_bytes": (b"run:\n  epochs: 1\x00\x00\n", "NUL"),
    "empty": (b"", "empty"),
    "only_comments": (b"# nothing here\n\n", "empty"),
    "duplicate_flow": (b"run: {epochs: 1, epochs: 2}\n", "twice"),
    "tabs": (b"run:\n\tepochs: 1\n", "valid YAML"),
    "scalar": (b"just text\n", "mapping"),
    "section_scalar": (b"run: 3\n", "run"),
    "list_section": (b"optim:\n  - lr\n", "optim"),
    "transformer_on_images": (b"model:\n  name: transformer_tiny\n", "translation data set"),
    "batch_not_divisible": (b"run:\n  num_processes: 3\ndata:\n  batch_size: 128\n", "multiple of run.num_processes"),
    "betas_out_of_range": (b"optim:\n  name: adamw\n  betas: [0.9, 1.5]\n", "optim.betas"),
    "milestone_fraction": (b"schedule:\n  name: step\n  milestones: [1.5]\n", "schedule.milestones"),
    "run_name_slash": (b"run:\n  name: a/b\n", "run.name"),
    "every_steps_negative": (b"checkpoint:\n  every_steps: -1\n", "checkpoint.every_steps"),
    "seed_float": (b"run:\n  seed: 1.5\n", "run.seed"),
    "extra_not_mapping": (b"model:\n  extra: 3\n", "model.extra"),
    "erk_typo": (b"method:\n  name: rigl\n  distribution: er\n", "method.distribution"),
    "gmp_end_before_start": (b"method:\n  name: gmp\n  sparsity: 0.5\n  s_init: 0.7\n", "method.s_init"),
    "growth_window_too_long": (b"method:\n  name: rigl\n  delta_t: 4\n  growth_grad_window: 9\n", "growth_grad_window"),
    "data_root_missing": (b"data:\n  root: /no/such/place\n", "data.root"),
    "resume_missing": (b"checkpoint:\n  resume: /no/such/ckpt\n", "checkpoint.resume"),
    "label_smoothing_one": (b"optim:\n  label_smoothing: 1.0\n", "optim.label_smoothing"),
    "precision_typo": (b"run:\n  mixed_precision: bf15\n", "run.mixed_precision"),
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_malformed_file_one_line_exit_2(name, tmp_path, capsys):
    from dist_sparse.train import main

    content, fragment = FILES[name]
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(content)
    assert main(["--config", str(path), f"run.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: "), err
    assert fragment in err[0], err[0]
    assert not (tmp_path / "run").exists()


OVERRIDES = {
    "no_equals": (["optim.lr"], "key.sub=value"),
    "into_a_scalar": (["optim.lr.x=1"], "optim.lr"),
    "unknown_section": (["trainer.epochs=3"], "trainer"),
    "bool_for_int": (["run.epochs=true"], "run.epochs"),
    "text_for_float": (["optim.lr=fast"], "optim.lr"),
    "list_for_float": (["optim.lr=[0.1]"], "optim.lr"),
    "negative_clip": (["optim.grad_clip=-1"], "optim.grad_clip"),
    "accum_zero": (["optim.grad_accum_steps=0"], "optim.grad_accum_steps"),
    "method_key_of_other_method": (["method.delta_t=5"], "method.delta_t"),  # dense has no delta_t
    "sparsity_text": (["method.name=rigl", "method.sparsity=high"], "method.sparsity"),
    "ema_decay_one": (["model.ema_decay=1.0"], "model.ema_decay = 1.0 is not allowed; expected a number in [0, 1)"),
    "ema_warmup_without_ema": (["model.ema_warmup=true"], "model.ema_warmup"),
}


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_malformed_override_one_line_exit_2(name, tmp_path, capsys):
    from dist_sparse.train import main

    overrides, fragment = OVERRIDES[name]
    assert main(["--config", TINY, f"run.output_dir={tmp_path}", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("config error: "), err
    assert fragment in err[0], err[0]
