"""A mean +- std table over seeds from finished run directories (the final ``end`` and ``epoch`` records of
each run's ``metrics.jsonl``).

    python benchmarks/seed_table.py --runs runs dense='tab_dense_s*' autosparse='tab_autosparse_s*'

Each ``label=glob`` is one row; the glob selects that row's run directories (one per seed) under ``--runs``.
Columns: final test top-1, sparsity of the method's sparse layers (polarization and cuttlefish: parameters
removed from the whole model), the epochs trained before cuttlefish's switch, non-zero parameters, training and test
FLOPs as fractions of dense (logged by the method; for polarization and cuttlefish from the step of the
rebuild: dense before it, the pruned / low-rank model after it; for RigL, SET, Static and GMP, which do not log training
FLOPs, replayed from the run's config by ``masked_train_flops.py``), and training time. The std is the sample standard
deviation (n - 1). ``--json`` adds one JSON line per row with the per-seed values.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys


def read_run(path: str) -> dict:
    """The numbers of one finished run; raises if it did not finish."""
    end, last_epoch, rebuild_step, start_params = None, None, None, None
    with open(os.path.join(path, "metrics.jsonl")) as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("event") == "end":
                end = rec
            elif rec.get("event") == "start":
                start_params = rec.get("params")
            elif rec.get("event") == "epoch":
                last_epoch = rec
            elif rec.get("event") == "rebuild" and rebuild_step is None:
                rebuild_step = rec["step"]
    if end is None:
        raise ValueError(f"{path}: no 'end' record in metrics.jsonl (the run did not finish)")
    method = (last_epoch or {}).get("method") or {}
    if not isinstance(method, dict):
        method = {}
    out = {"run": os.path.basename(path), "acc": 100 * end["val_acc"], "nonzero": end["nonzero_params"],
           "params": end["params"], "time_s": end.get("time_s"),
           "test_f": method.get("flops/test_fraction", end.get("flops/forward_fraction")),
           "train_f": method.get("flops/train_fraction")}
    if end.get("method") == "dense":
        out["train_f"] = out["test_f"] = 1.0
    elif end.get("method") in ("polarization", "cuttlefish") and out["test_f"] is not None and rebuild_step is not None:
        # polarization: gated training computes every branch (dense, gate heads not counted); after the
        # physical pruning each step costs the pruned model's share. cuttlefish: full rank before the
        # switch, the low-rank model's share after it
        out["train_f"] = (rebuild_step + (end["steps"] - rebuild_step) * out["test_f"]) / max(1, end["steps"])
    elif end.get("method") == "cuttlefish" and out["test_f"] is not None:
        out["train_f"] = out["test_f"]  # never switched: full rank throughout
    sp = method.get("sparsity/global")
    if sp is None:  # masked methods: the sparsity over their sparse tensors
        sp = method.get("sparsity")
    if sp is None:  # polarization: the fraction of the parameters its physical pruning removed
        sp = method.get("polar/prune_rate_params_physical")
    if sp is None and end.get("method") == "cuttlefish" and method.get("switched"):
        # cuttlefish: the fraction of the whole model's parameters the switch removed
        sp = 1.0 - end["params"] / start_params if start_params else None
    out["sparsity"] = None if sp is None else 100 * sp
    out["switch_epoch"] = method.get("switch_epoch")
    if out["train_f"] is None and os.path.isfile(os.path.join(path, "config.yaml")):
        out["train_f"] = _masked_train_f(os.path.join(path, "config.yaml"), end)
    return out


def _masked_train_f(config_path: str, end: dict) -> float | None:
    """Train F of a mask-based method (RigL, SET, Static, GMP), replayed from the run's resolved config by
    ``masked_train_flops.py`` (those methods do not log it; it depends on the schedule only)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import masked_train_flops
    from dist_sparse.config import load_config

    cfg = load_config(config_path)
    try:
        f = masked_train_flops.fractions(cfg, train_size=end["steps"] // cfg.run.epochs * cfg.data.batch_size)
    except ValueError:  # not a mask-based method
        return None
    return f["train"]


def _ms(values: list, fmt: str) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.mean(vals))} +- {fmt.format(statistics.stdev(vals))}"


def _switch(runs: list) -> str:
    """Cuttlefish's switch epochs per seed (full-rank epochs before it), '-' where none."""
    vals = [r.get("switch_epoch") for r in runs]
    return "-" if all(v is None for v in vals) else ", ".join("none" if v is None else str(v) for v in vals)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="runs", help="parent directory of the run directories")
    p.add_argument("--json", action="store_true")
    p.add_argument("rows", nargs="+", help="label=glob, one per row")
    args = p.parse_args(argv)
    table = []
    for spec in args.rows:
        if "=" not in spec:
            p.error(f"row {spec!r}: expected label=glob")
        label, pattern = spec.split("=", 1)
        paths = sorted(d for d in glob.glob(os.path.join(args.runs, pattern)) if os.path.isdir(d))
        if not paths:
            p.error(f"row {label!r}: no run directory matches {os.path.join(args.runs, pattern)!r}")
        runs = []
        for d in paths:
            try:
                runs.append(read_run(d))
            except (OSError, ValueError) as err:  # still running or failed: left out, said on stderr
                print(f"(left out: {err})", file=sys.stderr)
        if runs:
            table.append((label, runs))
    dense = next((runs for label, runs in table if label == "dense"), None)  # the row called "dense"
    dense_acc = statistics.mean(r["acc"] for r in dense) if dense else None
    print("| run | seeds | test top-1 % | vs dense | sparsity % | switch epoch | non-zero params | Train F | Test F | time s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, runs in table:
        acc = [r["acc"] for r in runs]
        delta = "-" if dense_acc is None or runs is dense else f"{statistics.mean(acc) - dense_acc:+.2f}"
        print(f"| {label} | {len(runs)} | {_ms(acc, '{:.2f}')} | {delta} | {_ms([r['sparsity'] for r in runs], '{:.1f}')} "
              f"| {_switch(runs)} | {_ms([r['nonzero'] for r in runs], '{:,.0f}')} | {_ms([r['train_f'] for r in runs], '{:.3f}')} "
              f"| {_ms([r['test_f'] for r in runs], '{:.3f}')} | {_ms([r['time_s'] for r in runs], '{:.0f}')} |")
    if args.json:
        for label, runs in table:
            print(json.dumps({"row": label, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
