"""The trainer's own cost: `dist-sparse train` against a plain torch loop, interleaved, in one run.

Both sides train the same model on the same data with the same optimizer, schedule and augmentation
(the plain loop draws its batches from the same rank-aware loader), for the same number of steps;
each side's time is its training loop only (the trainer's ``epoch_time`` records, the plain
loop's own clock), so start-up and evaluation are excluded on both sides. A second ratio covers the
steady state: from the end of optimizer step ``--skip`` to the last (the trainer's per-step ``time``
in its train rows, the plain loop's own marks), leaving out the first steps' one-time kernel set-up. Runs alternate trainer, plain, trainer,
plain, ... so machine noise hits both alike; the script prints every pair and the median ratio.

    python benchmarks/overhead.py --config configs/tiny_resnet20_dense.yaml --repeats 3 --samples 8192
    python benchmarks/overhead.py --nproc 2 ...     # 2-process DDP trainer vs a plain DDP loop
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

PLAIN = r'''
import json, math, os, sys, time, torch, torch.nn.functional as F
from dist_sparse.config import load_config
from dist_sparse.data import build_data
from dist_sparse.tasks import build_model
args = json.loads(sys.argv[1])
world = int(os.environ.get("WORLD_SIZE", "1")); rank = int(os.environ.get("RANK", "0"))
if world > 1:
    torch.distributed.init_process_group("gloo")
cfg = load_config(args["config"], args["overrides"])
if cfg.run.threads:
    torch.set_num_threads(cfg.run.threads)
data = build_data(cfg, rank=rank, world_size=world, device=torch.device("cpu"), run_dir=args["dir"])
torch.manual_seed(cfg.run.seed)
model = build_model(cfg, data.info)
if cfg.run.channels_last:
    model = model.to(memory_format=torch.channels_last)
decay = [p for p in model.parameters() if p.ndim > 1]; rest = [p for p in model.parameters() if p.ndim <= 1]
o = cfg.optim
opt = torch.optim.SGD([{"params": decay, "weight_decay": o.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                      lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
steps = min(len(data.train), args["steps"])
warm = int(round(cfg.schedule.warmup_epochs * len(data.train)))
lam = lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
amp = cfg.run.mixed_precision == "bf16"
t0 = time.perf_counter()
marks = []
for i, (x, y) in enumerate(data.train.iter_from(0)):
    if i >= steps:
        break
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = F.cross_entropy(net(x), y)
    loss.backward()
    opt.step(); opt.zero_grad(set_to_none=True); sched.step()
    marks.append(time.perf_counter() - t0)  # end of optimizer step i + 1
seconds = time.perf_counter() - t0
if rank == 0:
    print(json.dumps({"seconds": seconds, "steps": steps, "marks": marks, "last_loss": float(loss)}))
if world > 1:
    torch.distributed.destroy_process_group()
'''


def _launch(nproc: int, argv: list[str], env: dict) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable] + argv
    else:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"] + argv
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/tiny_resnet20_dense.yaml")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples", type=int, default=8192, help="training samples (data.train_subset)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: cores / nproc)")
    p.add_argument("--skip", type=int, default=4, help="first optimizer steps left out of the steady-state ratio")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    threads = args.threads or max(1, (os.cpu_count() or 2) // args.nproc)
    overrides = [f"data.train_subset={args.samples}", "data.val_subset=256", "run.epochs=1",
                 f"run.num_processes={args.nproc}", f"run.threads={threads}", "logging.progress_bar=false",
                 "checkpoint.every_epoch=false", "checkpoint.save_final=false", "logging.plots=false",
                 "logging.log_every_steps=1",
                 *args.overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT,
               **({"ACCELERATE_USE_CPU": "true"} if args.nproc > 1 else {}))
    pairs = []
    with tempfile.TemporaryDirectory() as tmp:
        plain_py = os.path.join(tmp, "plain_loop.py")  # torchrun runs a file, not ``-c``
        with open(plain_py, "w") as fh:
            fh.write(PLAIN)
        for r in range(args.repeats):
            out = os.path.join(tmp, f"t{r}")
            t = _launch(args.nproc, ["-m", "dist_sparse.train", "--config", args.config, *overrides,
                                     f"run.output_dir={out}", "run.name=t"], env)
            if t.returncode != 0:
                print(t.stderr[-3000:], file=sys.stderr)
                return 1
            rows = [json.loads(ln) for ln in open(os.path.join(out, "t", "metrics.jsonl"))]
            end = [r for r in rows if r["event"] == "end"][-1]
            loop_s = sum(r["epoch_time"] for r in rows if r["event"] == "epoch")  # the loop only
            at = {r["step"]: r["time"] for r in rows if r["event"] == "train"}  # end of each optimizer step
            spec = json.dumps({"config": args.config, "overrides": overrides, "dir": tmp, "steps": end["steps"]})
            q = _launch(args.nproc, [plain_py, spec], env)
            if q.returncode != 0:
                print(q.stderr[-3000:], file=sys.stderr)
                return 1
            plain = json.loads(q.stdout.strip().splitlines()[-1])
            n, k = end["steps"], args.skip
            # steady state: steps k+1 .. n on both sides (the first k carry one-time kernel set-up)
            steady = (at[n] - at[k], plain["marks"][n - 1] - plain["marks"][k - 1])
            pairs.append((loop_s, plain["seconds"], *steady))
            print(f"repeat {r}: whole loop trainer {loop_s:.1f} s / plain {plain['seconds']:.1f} s = "
                  f"{loop_s / plain['seconds']:.3f}; steps {k + 1}-{n}: {steady[0]:.1f} s / {steady[1]:.1f} s = "
                  f"{steady[0] / steady[1]:.3f}", flush=True)
    whole = statistics.median(a / b for a, b, _, _ in pairs)
    steady = statistics.median(c / d for _, _, c, d in pairs)
    print("| processes | steps | trainer s/step (median, steady) | plain loop s/step | ratio whole loop | "
          "ratio steady state |")
    print("|---|---|---|---|---|---|")
    span = n - k
    print(f"| {args.nproc} | {n} | {statistics.median(c for _, _, c, _ in pairs) / span:.3f} | "
          f"{statistics.median(d for _, _, _, d in pairs) / span:.3f} | {whole:.3f} | {steady:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
