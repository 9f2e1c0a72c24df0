"""benchmarks/seed_table.py: mean +- sample std over seeds, vs dense, unfinished runs left out."""
import json

from tests.conftest import load_benchmark


def _run(root, name, acc, nonzero, method="autosparse", sparsity=None, finished=True):
    d = root / name
    d.mkdir()
    recs = [{"event": "start", "params": 1000}]
    m = {"flops/train_fraction": 0.4, "flops/test_fraction": 0.2}
    if sparsity is not None:
        m["sparsity/global"] = sparsity
    recs.append({"event": "epoch", "epoch": 0, "method": m if method != "dense" else {}})
    if finished:
        recs.append({"event": "end", "method": method, "val_acc": acc, "nonzero_params": nonzero, "params": 1000,
                     "time_s": 10.0, "flops/forward_fraction": 0.25 if method != "dense" else 1.0})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_mean_std_and_delta(tmp_path, capsys):
    _run(tmp_path, "d_s0", 0.90, 1000, method="dense")
    _run(tmp_path, "d_s1", 0.92, 1000, method="dense")
    _run(tmp_path, "a_s0", 0.89, 200, sparsity=0.8)
    _run(tmp_path, "a_s1", 0.91, 300, sparsity=0.7)
    _run(tmp_path, "a_s2", 0.5, 300, sparsity=0.7, finished=False)
    mod = load_benchmark("seed_table")
    assert mod.main(["--runs", str(tmp_path), "dense=d_s*", "auto=a_s*"]) == 0
    out, err = capsys.readouterr()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in out.splitlines()[2:]}
    # dense: 91.00 +- 1.41 (sample std of 90, 92); Train F and Test F of dense are 1
    assert rows["dense"][:2] == ["2", "91.00 +- 1.41"] and rows["dense"][4] == "-" and rows["dense"][6:8] == ["1.000 +- 0.000", "1.000 +- 0.000"]
    # auto: the unfinished seed is left out; 90.00 +- 1.41, -1.00 vs dense, sparsity 75.0 +- 7.1
    assert rows["auto"][:4] == ["2", "90.00 +- 1.41", "-1.00", "75.0 +- 7.1"]
    assert rows["auto"][5] == "250 +- 71" and rows["auto"][6] == "0.400 +- 0.000" and rows["auto"][7] == "0.200 +- 0.000"
    assert "a_s2" in err and "did not finish" in err


def test_polarization_rows(tmp_path):
    # polarization: sparsity = parameters removed physically; Train F dense until the pruning step, then Test F
    d = tmp_path / "p_s0"
    d.mkdir()
    recs = [{"event": "epoch", "epoch": 0, "method": {"polar/prune_rate_params_physical": 0.5}},
            {"event": "rebuild", "step": 60, "epoch": 0},
            {"event": "end", "method": "polarization", "val_acc": 0.9, "nonzero_params": 500, "params": 500,
             "time_s": 1.0, "steps": 100, "flops/forward_fraction": 0.5}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    run = load_benchmark("seed_table").read_run(str(d))
    assert run["sparsity"] == 50.0 and run["test_f"] == 0.5
    assert abs(run["train_f"] - (60 + 40 * 0.5) / 100) < 1e-12


def test_cuttlefish_rows(tmp_path, capsys):
    # cuttlefish: parameters removed from the whole model, the switch epoch, Train F full rank until the rebuild
    for name, switched in (("c_s0", True), ("c_s1", False)):
        d = tmp_path / name
        d.mkdir()
        m = {"switched": 1, "switch_epoch": 8} if switched else {"switched": 0}
        end_params = 250 if switched else 1000
        recs = [{"event": "start", "params": 1000}, {"event": "epoch", "epoch": 0, "method": m}]
        if switched:
            recs.append({"event": "rebuild", "step": 80, "epoch": 7})
        recs.append({"event": "end", "method": "cuttlefish", "val_acc": 0.9, "nonzero_params": end_params,
                     "params": end_params, "time_s": 1.0, "steps": 100,
                     "flops/forward_fraction": 0.4 if switched else 1.0})
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    mod = load_benchmark("seed_table")
    run = mod.read_run(str(tmp_path / "c_s0"))
    assert run["sparsity"] == 75.0 and run["switch_epoch"] == 8 and run["test_f"] == 0.4
    assert abs(run["train_f"] - (80 + 20 * 0.4) / 100) < 1e-12
    never = mod.read_run(str(tmp_path / "c_s1"))
    assert never["sparsity"] is None and never["switch_epoch"] is None and never["train_f"] == 1.0
    assert mod.main(["--runs", str(tmp_path), "cf=c_s*"]) == 0
    row = capsys.readouterr().out.splitlines()[2].split("|")
    assert row[6].strip() == "8, none"
