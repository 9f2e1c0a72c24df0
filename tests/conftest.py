"""Shared test helpers: a tiny Fashion-MNIST run config, subprocess launchers, free ports."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark(name: str):
    """The module ``benchmarks/<name>.py`` (the benchmarks are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
FMNIST = "/usr/share/datasets/fashion-mnist"


def have_fashion_mnist() -> bool:
    return os.path.isfile(os.path.join(os.environ.get("DIST_SPARSE_DATA", FMNIST), "train-images-idx3-ubyte.gz")) \
        or os.path.isfile(os.path.join(FMNIST, "train-images-idx3-ubyte.gz"))


needs_fmnist = pytest.mark.skipif(not have_fashion_mnist(),
                                  reason="Fashion-MNIST missing: apt-get install -y dataset-fashion-mnist")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": ROOT})
    env.update(extra)
    return env


def run_train(args: list[str], nproc: int = 1, env: dict | None = None, timeout: int = 600,
              check: bool = True) -> subprocess.CompletedProcess:
    """Run the trainer in a subprocess: plain python for 1 process, torchrun (gloo) for more."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "dist_sparse.train"] + args
        e = child_env(**(env or {}))
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "dist_sparse.train"] + args
        e = child_env(ACCELERATE_USE_CPU="true", **(env or {}))
    p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"trainer failed ({p.returncode}):\nSTDOUT\n{p.stdout[-4000:]}\nSTDERR\n{p.stderr[-6000:]}")
    return p


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


TINY = os.path.join(ROOT, "configs", "tiny_resnet20_dense.yaml")
