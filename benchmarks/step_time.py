"""Step time of a method vs dense, measured side by side in one process.

Both runs go through ``dist_sparse.driver.Driver`` (the step order the trainer uses: regularizer, backward,
``after_backward``, optimizer step, schedule, ``after_step``) with a plain single-process loop, and use the
same model, batch, optimizer and number of threads. They are interleaved in rounds
(dense block, method block, dense block, ...) so that machine noise hits both alike. A block is
``delta_t`` optimizer steps, so the method's mask-update step is included once per block: the ratio is
the average over a whole update period, as RigL's cost claim is stated.

    python benchmarks/step_time.py --model resnet20 --method rigl --sparsity 0.8 --delta-t 100
    python benchmarks/step_time.py --model deit_micro --method rigl --img-size 28 --in-chans 1
    python benchmarks/step_time.py --model resnet20 --config configs/tiny_resnet20_autosparse.yaml

``--config`` takes the method section (and the model name, unless ``--model`` is given) from a run's YAML,
so a method is timed with exactly the settings it trains with; the steps of the timed run form one epoch
(for AutoSparse: alpha is its epoch-0 value, the costlier case of a non-zero Gradient Annealing scale).

Prints a table and one JSON line (``--json``) with the medians and the ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from dist_sparse.config import config_from_dict, config_to_dict, load_config
from dist_sparse.driver import Driver, PlainLoop
from dist_sparse.methods import create_method
from dist_sparse.methods.base import OptimizerInfo, RunContext
from dist_sparse.models import create_model


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def build(args, method_name: str, example) -> Driver:
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10, in_chans=args.in_chans, img_size=args.img_size)
    mdict = {"name": method_name}
    if method_name != "dense" and args.method_section is not None:
        mdict = dict(args.method_section)
    elif method_name != "dense":
        mdict.update(sparsity=args.sparsity, delta_t=args.delta_t, t_end=1.0)
    cfg = config_from_dict({"model": {"name": args.model}, "method": mdict})
    total = args.rounds * args.delta_t * 2 + 10
    method = create_method(cfg.method, seed=0)
    method.setup(RunContext(total_steps=total, steps_per_epoch=total,
                            optimizer=OptimizerInfo("sgd", lr=0.01, weight_decay=5e-4, momentum=0.9),
                            example_input=example))
    model = method.prepare(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    driver = Driver(method, PlainLoop(), _loss)
    driver.attach(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    return driver


def make_batches(args) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A pool of distinct batches: real Fashion-MNIST when the shapes fit, else seeded random data.

    Training many steps on ONE batch drives gradients into subnormal floats, which slows CPU kernels
    by 5x and would distort the comparison; a pool of different batches keeps the run realistic.
    """
    n = args.pool
    if args.img_size == 28 and args.in_chans == 1:
        try:
            from dist_sparse.data.vision import FASHION_MNIST_STATS, load_fashion_mnist

            d = load_fashion_mnist()
            x = (d["train_x"][: n * args.batch].float() / 255 - FASHION_MNIST_STATS[0][0]) / FASHION_MNIST_STATS[1][0]
            y = d["train_y"][: n * args.batch]
            return [(x[i * args.batch:(i + 1) * args.batch], y[i * args.batch:(i + 1) * args.batch]) for i in range(n)]
        except Exception as err:  # data not installed: fall back to random batches
            print(f"(Fashion-MNIST not used: {err})")
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(args.batch, args.in_chans, args.img_size, args.img_size, generator=g),
             torch.randint(0, 10, (args.batch,), generator=g)) for _ in range(n)]


def run_block(driver: Driver, batches, n: int) -> float:
    """``n`` optimizer steps through the driver; seconds per step."""
    t0 = time.perf_counter()
    for _ in range(n):
        driver.micro_step(batches[driver.step % len(batches)])
    return (time.perf_counter() - t0) / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model name (default: the config's, else resnet20)")
    p.add_argument("--method", default=None, help="method name (default: the config's, else rigl)")
    p.add_argument("--config", default=None, help="take the method section (and model name) from this YAML")
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--delta-t", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--img-size", type=int, default=28)
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--pool", type=int, default=32, help="distinct batches cycled through")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.method_section = None
    if args.config:
        cfg = config_to_dict(load_config(args.config))
        args.method_section = {k: v for k, v in cfg["method"].items() if v is not None}
        if args.method is not None and args.method != args.method_section["name"]:
            p.error(f"--method {args.method} differs from the config's method.name "
                    f"{args.method_section['name']!r}; give one of them")
        args.method = args.method_section["name"]
        args.model = args.model or cfg["model"]["name"]
    args.method = args.method or "rigl"
    args.model = args.model or "resnet20"
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = make_batches(args)
    if args.channels_last:
        batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
    example = (batches[0][0][:1],)
    runs = {"dense": build(args, "dense", example), args.method: build(args, args.method, example)}
    for driver in runs.values():  # warm-up (allocations, oneDNN primitives); counts as steps 0-2
        run_block(driver, batches, 3)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for name, driver in runs.items():
            times[name].append(run_block(driver, batches, args.delta_t))
    dense = statistics.median(times["dense"])
    other = statistics.median(times[args.method])
    ratio = other / dense
    print(f"model={args.model} batch={args.batch} threads={torch.get_num_threads()} delta_t={args.delta_t} "
          f"rounds={args.rounds} " + (f"config={args.config}" if args.config else f"sparsity={args.sparsity}"))
    print(f"| run | median ms/step (over {args.delta_t}-step blocks) |")
    print("|---|---|")
    print(f"| dense | {1000 * dense:.1f} |")
    print(f"| {args.method} | {1000 * other:.1f} |")
    print(f"| ratio {args.method}/dense | {ratio:.3f} |")
    if args.json:
        print(json.dumps({"model": args.model, "method": args.method, "dense_ms": 1000 * dense,
                          "method_ms": 1000 * other, "ratio": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
