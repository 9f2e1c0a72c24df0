"""Throughput of the real trainer on 1 process vs N processes (same global batch), side by side.

Each configuration is launched through ``launch/run.sh`` (so the backend is real: DDP over gloo on a
CPU box, NCCL on GPUs), runs one epoch of ``--samples`` training images, and the epoch's wall time
from metrics.jsonl gives images/s. Runs alternate (1, N, 1, N, ...) and the median is reported.

    python benchmarks/scaling.py --config configs/tiny_resnet20_dense.yaml --nproc 2 --repeats 2
    python benchmarks/scaling.py --config configs/tiny_resnet20_rigl.yaml --backend fsdp model.norm=gn
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_run(backend: str, nproc: int, args, out: str, tag: str) -> float:
    overrides = [f"run.output_dir={out}", f"run.name={tag}", "run.epochs=1", f"data.train_subset={args.samples}",
                 "data.val_subset=256", "logging.progress_bar=false", "checkpoint.every_epoch=false",
                 "checkpoint.save_final=false", f"run.num_processes={nproc}"] + args.overrides
    env = dict(os.environ, PYTHON=sys.executable)
    cmd = ["bash", os.path.join(ROOT, "launch", "run.sh"), backend if nproc > 1 else "single"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    cmd += ["--", "--config", args.config] + overrides
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    with open(os.path.join(out, tag, "metrics.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    epoch = [r for r in rows if r["event"] == "epoch"][-1]
    return args.samples / epoch["epoch_time"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/tiny_resnet20_dense.yaml")
    p.add_argument("--backend", default="ddp")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    res: dict[int, list[float]] = {1: [], args.nproc: []}
    with tempfile.TemporaryDirectory() as out:
        for i in range(args.repeats):
            for n in (1, args.nproc):
                res[n].append(one_run(args.backend, n, args, out, f"n{n}_{i}"))
    one, many = statistics.median(res[1]), statistics.median(res[args.nproc])
    print(f"config={args.config} backend={args.backend} samples/epoch={args.samples} repeats={args.repeats}")
    print("| processes | train images/s (median) |")
    print("|---|---|")
    print(f"| 1 | {one:.0f} |")
    print(f"| {args.nproc} | {many:.0f} |")
    print(f"| ratio {args.nproc}/1 | {many / one:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
