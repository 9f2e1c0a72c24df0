"""benchmarks/step_time.py takes a method section from a run's YAML (tiny settings; checks output, not time)."""
import json
import os

import pytest

from tests.conftest import ROOT, load_benchmark


@pytest.mark.parametrize("cfg,name", [("tiny_resnet20_autosparse.yaml", "autosparse"),
                                      ("tiny_resnet20_str.yaml", "str")])
def test_config_method_is_timed(cfg, name, capsys):
    mod = load_benchmark("step_time")
    rc = mod.main(["--config", os.path.join(ROOT, "configs", cfg), "--batch", "4", "--pool", "2",
                   "--delta-t", "2", "--rounds", "1", "--img-size", "16", "--json"])
    assert rc == 0
    out = capsys.readouterr().out
    line = json.loads(out.strip().splitlines()[-1])
    assert line["method"] == name and line["model"] == "resnet20"
    assert line["dense_ms"] > 0 and line["method_ms"] > 0
    assert f"config={os.path.join(ROOT, 'configs', cfg)}" in out


def test_method_differing_from_config_is_refused(capsys):
    mod = load_benchmark("step_time")
    with pytest.raises(SystemExit):
        mod.main(["--config", os.path.join(ROOT, "configs", "tiny_resnet20_str.yaml"), "--method", "rigl"])
    assert "differs from the config's method.name 'str'" in capsys.readouterr().err
