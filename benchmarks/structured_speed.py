"""Step time of a structurally smaller model vs its dense original, measured side by side in one process.

The smaller model is built with the project's real surgery, so it is the model a run would train or
serve after its structural change:

* ``--method polarization``: a ResNet with residual blocks or channels removed physically by
  :func:`dist_sparse.surgery.channels.prune_resnet`. The decision ``arch`` is the one the method stores with
  its export (``{"gating", "position", "blocks": {block: [kept unit indices]}}``), read from ``--export`` or
  drawn with a seeded generator: ``--gating channel --keep 0.5`` keeps that fraction of the gated channels
  of every block, ``--gating layer --keep 0.5`` that fraction of the residual blocks.
* ``--method cuttlefish``: ResNet-18 as ``--config`` (default ``configs/tiny_resnet18_cuttlefish.yaml``)
  builds it for Fashion-MNIST, factorized by :func:`dist_sparse.surgery.lowrank.factorize_model`. The
  ranks come from ``--export`` or from ``--rank-ratio``: ``r = ceil(ratio * full rank)`` for every layer
  the method itself selects (so the stem, the classifier and the config's ``exclude`` globs stay full
  rank), keeping only the layers where the factorized form saves parameters.

Both models see the same pool of distinct batches (real Fashion-MNIST, else seeded random data), the
same threads, memory format and optimizer (SGD, momentum 0.9, Nesterov, weight decay 5e-4). A training
step is forward, cross-entropy, backward and the optimizer step; an inference step is an eval-mode
forward without autograd. After warm-up steps the two are timed in interleaved rounds (dense block,
small block, dense block, ...) so that machine noise hits both alike, and medians over the rounds are
compared with the ratio of forward FLOPs (``dist_sparse.metrics.flops``; a training step is 3 forwards
for both models, so its ratio is the same). ``speed-up / FLOPs ratio`` is the fraction of the FLOPs
reduction that wall-clock time realizes.

    python benchmarks/structured_speed.py --method polarization --gating channel --keep 0.5
    python benchmarks/structured_speed.py --method polarization --gating layer --keep 0.5 --model resnet56
    python benchmarks/structured_speed.py --method polarization --export runs/tiny_resnet20_polarization
    python benchmarks/structured_speed.py --method cuttlefish --rank-ratio 0.25 --threads 2 --json
    python benchmarks/structured_speed.py --method cuttlefish --export runs/tiny_resnet18_cuttlefish/model.safetensors

``--export`` takes an exported ``model.safetensors`` or the run directory that holds it; the dense model
is then the registered architecture of the export (its stored model name and arguments), the small one
the export as ``dist_sparse.load_exported`` rebuilds it.

Prints a table and one JSON line (``--json``) with the medians, the ratios and the model facts.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dist_sparse.metrics.flops import layer_forward_flops
from dist_sparse.models import create_model
from dist_sparse.surgery import channels as C
from dist_sparse.surgery import lowrank as LR
from dist_sparse.surgery.gates import gated_width, residual_blocks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUTTLEFISH_CONFIG = os.path.join("configs", "tiny_resnet18_cuttlefish.yaml")
SHAPES = {"num_classes": 10, "in_chans": 1, "img_size": 28}  # Fashion-MNIST
BASE_LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4


# ------------------------------------------------------------------------------------------------
# The pruned ResNet (polarization)
# ------------------------------------------------------------------------------------------------


def _kept_count(keep: float, n: int) -> int:
    return min(n, max(1, int(math.floor(keep * n + 0.5))))


def synthetic_arch(model: nn.Module, gating: str, position: str, keep: float, seed: int = 0) -> dict[str, Any]:
    """A pruning decision in the method's format, drawn with ``torch.Generator().manual_seed(seed)``.

    ``channel``: ``round(keep * width)`` (at least 1) channels kept in every block, a random subset;
    ``layer``: ``round(keep * blocks)`` (at least 1) blocks kept, a random subset, the others removed.
    """
    g = torch.Generator().manual_seed(int(seed))
    blocks = list(residual_blocks(model))
    if gating == "layer":
        kept = set(torch.randperm(len(blocks), generator=g)[:_kept_count(keep, len(blocks))].tolist())
        decision = {name: [0] if i in kept else [] for i, (name, _) in enumerate(blocks)}
    else:
        decision = {}
        for name, block in blocks:
            w = gated_width(block, gating, position)
            decision[name] = sorted(torch.randperm(w, generator=g)[:_kept_count(keep, w)].tolist())
    return {"gating": gating, "position": position, "blocks": decision}


def unit_totals(model: nn.Module, arch: dict[str, Any]) -> tuple[int, int, int]:
    """(units kept, units in total, blocks removed) of ``arch`` on the unpruned ``model``."""
    kept = total = removed = 0
    for name, block in residual_blocks(model):
        keep = list(arch["blocks"][name])
        kept += len(keep)
        total += gated_width(block, arch["gating"], arch.get("position", "after"))
        removed += int(not keep and (arch["gating"] == "layer" or arch.get("position", "after") == "after"))
    return kept, total, removed


def build_polarization(args) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """(dense, pruned, facts): the pruned model is ``prune_resnet`` of a copy of the dense one (same
    weights), or the export as ``load_exported`` rebuilds it."""
    torch.manual_seed(args.seed)
    if args.export:
        path, meta, arch = read_export(args.export, "polarization")
        if "pruned" not in arch:
            raise SystemExit(f"{path}: the export holds the gated model ({sorted(arch)}), not a pruned one: "
                             "the run ended before its pruning decision")
        dense = create_model(meta["model"], **json.loads(meta["model_kwargs"]))
        from dist_sparse import load_exported

        small, arch, model_name = load_exported(path), arch["pruned"], meta["model"]
    else:
        model_name = args.model or "resnet20"
        dense = create_model(model_name, **SHAPES)
        arch = synthetic_arch(dense, args.gating, args.position, args.keep, args.seed)
        small = C.prune_resnet(copy.deepcopy(dense), arch)
    kept, total, removed = unit_totals(dense, arch)
    facts = {"model": model_name, "gating": arch["gating"], "position": arch.get("position", "after"),
             "keep": None if args.export else args.keep, "units_kept": kept, "units_total": total,
             "blocks_removed": removed, "arch": arch}
    return dense, small, facts


# ------------------------------------------------------------------------------------------------
# The low-rank ResNet (cuttlefish)
# ------------------------------------------------------------------------------------------------


def cuttlefish_config(path: str):
    from dist_sparse.config import load_config

    if not os.path.isfile(path) and os.path.isfile(os.path.join(ROOT, path)):
        path = os.path.join(ROOT, path)
    cfg = load_config(path)
    if cfg.method.name != "cuttlefish":
        raise SystemExit(f"{path}: method.name is {cfg.method.name!r}, not 'cuttlefish'")
    return cfg


def ratio_ranks(model: nn.Module, method, ratio: float) -> tuple[dict[str, int], list[str]]:
    """``({layer: ceil(ratio * full rank)}, candidates)``: the candidates are the method's own selection
    (``Cuttlefish.select_layers``); a candidate is factorized only where that saves parameters."""
    candidates = method.select_layers(model)
    mods = dict(model.named_modules())
    ranks = {}
    for name in candidates:
        shape = tuple(mods[name].weight.shape)
        r = min(LR.full_rank(shape), max(1, math.ceil(ratio * LR.full_rank(shape))))
        if LR.saves_parameters(shape, r):
            ranks[name] = r
    return ranks, candidates


def build_cuttlefish(args) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """(dense, low-rank, facts): the low-rank model is ``factorize_model`` of a copy of the dense one
    (spectral split of its weights), or the export as ``load_exported`` rebuilds it."""
    torch.manual_seed(args.seed)
    if args.export:
        path, meta, arch = read_export(args.export, "cuttlefish")
        if not arch.get("ranks"):
            raise SystemExit(f"{path}: the export has no low-rank layers (the run never switched)")
        dense = create_model(meta["model"], **json.loads(meta["model_kwargs"]))
        from dist_sparse import load_exported

        small, model_name = load_exported(path), meta["model"]
        ranks, candidates, extra_bn = {k: int(v) for k, v in arch["ranks"].items()}, None, bool(arch.get("extra_bn"))
    else:
        from dist_sparse.methods import create_method
        from dist_sparse.tasks import model_kwargs

        cfg = cuttlefish_config(args.config)
        if args.model:
            cfg.model.name = args.model
        model_name = cfg.model.name
        dense = create_model(model_name, **model_kwargs(cfg, SHAPES))
        method = create_method(cfg.method, seed=args.seed)
        ranks, candidates = ratio_ranks(dense, method, args.rank_ratio)
        extra_bn = bool(cfg.method.extra_bn)
        small = LR.factorize_model(copy.deepcopy(dense), ranks, extra_bn=extra_bn)
    facts = {"model": model_name, "rank_ratio": None if args.export else args.rank_ratio, "extra_bn": extra_bn,
             "layers_factorized": len(ranks), "layers_candidate": None if candidates is None else len(candidates),
             "ranks": dict(sorted(ranks.items()))}
    return dense, small, facts


def frobenius_hook(model: nn.Module, ranks: dict[str, int], lam: float) -> Callable[[], None]:
    """After backward: the gradient of ``lam/2 ||B C||_F^2`` added to every factor pair (the method's
    Frobenius decay; those factors then get no plain weight decay, see :func:`param_groups`)."""
    mods = dict(model.named_modules())
    pairs = [LR.factor_pair(mods[n]) for n in ranks]

    def hook() -> None:
        for b, c in pairs:
            gb, gc = LR.frobenius_decay_grads(b.detach(), c.detach(), lam)
            b.grad.add_(gb)
            c.grad.add_(gc)
    return hook


def param_groups(model: nn.Module, no_decay: set[int]) -> list[dict[str, Any]]:
    plain = [p for p in model.parameters() if id(p) not in no_decay]
    factors = [p for p in model.parameters() if id(p) in no_decay]
    return [{"params": plain}] + ([{"params": factors, "weight_decay": 0.0}] if factors else [])


# ------------------------------------------------------------------------------------------------
# Data, export files, timing
# ------------------------------------------------------------------------------------------------


def read_export(path: str, method: str) -> tuple[str, dict[str, str], dict[str, Any]]:
    """(file, metadata, architecture) of an export file or of the run directory holding ``model.safetensors``."""
    from safetensors import safe_open

    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    if not os.path.isfile(path):
        raise SystemExit(f"--export: no exported model at {path}")
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata() or {}
    if "model" not in meta or "model_kwargs" not in meta:
        raise SystemExit(f"{path} was not written by a dist_sparse export")
    if meta.get("method") != method:
        raise SystemExit(f"{path} was exported by method {meta.get('method')!r}, not {method!r}")
    return path, meta, json.loads(meta.get("architecture", "{}") or "{}")


def make_batches(args) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``args.pool`` distinct batches of Fashion-MNIST (normalized), else of seeded random data.

    Cycling through different batches keeps the gradients realistic; many steps on ONE batch drive
    them into subnormal floats, which slows CPU kernels several times and would distort the comparison.
    """
    n, b = args.pool, args.batch
    if args.data == "fashion_mnist":
        try:
            from dist_sparse.data.vision import FASHION_MNIST_STATS, load_fashion_mnist

            d = load_fashion_mnist()
            (mean,), (std,) = FASHION_MNIST_STATS
            x = (d["train_x"][: n * b].float() / 255 - mean) / std
            y = d["train_y"][: n * b]
            if len(y) == n * b:
                return [(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]) for i in range(n)]
            print(f"(Fashion-MNIST not used: {len(y)} images < pool x batch = {n * b})")
        except Exception as err:  # data not installed: fall back to random batches
            print(f"(Fashion-MNIST not used: {err})")
    g = torch.Generator().manual_seed(args.seed)
    return [(torch.randn(b, SHAPES["in_chans"], SHAPES["img_size"], SHAPES["img_size"], generator=g),
             torch.randint(0, SHAPES["num_classes"], (b,), generator=g)) for _ in range(n)]


class Subject:
    """One model with its optimizer and its own position in the batch pool."""

    def __init__(self, model: nn.Module, no_decay: Optional[set[int]] = None,
                 after_backward: Optional[Callable[[], None]] = None):
        self.model = model
        self.opt = torch.optim.SGD(param_groups(self.model, no_decay or set()), lr=BASE_LR, momentum=MOMENTUM,
                                   nesterov=True, weight_decay=WEIGHT_DECAY)
        self.after_backward = after_backward
        self.seen = {"train": 0, "infer": 0}

    def _next(self, batches, mode: str):
        batch = batches[self.seen[mode] % len(batches)]
        self.seen[mode] += 1
        return batch

    def block(self, mode: str, batches, n: int) -> float:
        """``n`` training or inference steps; seconds per step."""
        if mode == "train":
            self.model.train()
            t0 = time.perf_counter()
            for _ in range(n):
                x, y = self._next(batches, mode)
                loss = F.cross_entropy(self.model(x), y)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                if self.after_backward is not None:
                    self.after_backward()
                self.opt.step()
            return (time.perf_counter() - t0) / n
        self.model.eval()
        with torch.no_grad():
            t0 = time.perf_counter()
            for _ in range(n):
                self.model(self._next(batches, mode)[0])
            return (time.perf_counter() - t0) / n


def forward_flops(model: nn.Module, example: torch.Tensor) -> float:
    """Forward FLOPs per sample (FlopCounterMode convention: a multiply-add is 2 FLOPs)."""
    return float(layer_forward_flops(model, example).per_sample().total)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from dist_sparse.methods.polarization import PolarizationConfig

    pdef = PolarizationConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", choices=["polarization", "cuttlefish"], default="polarization")
    p.add_argument("--model", default=None,
                   help="polarization: the ResNet (default resnet20); cuttlefish: overrides the config's model name")
    p.add_argument("--export", default=None, help="an exported model.safetensors (or its run directory) of that method")
    p.add_argument("--gating", choices=["layer", "channel"], default=pdef.gating, help="polarization, synthetic")
    p.add_argument("--position", choices=["before", "middle", "after"], default=pdef.position,
                   help="polarization, synthetic channel gating: where the gated channels sit")
    p.add_argument("--keep", type=float, default=0.5, help="polarization, synthetic: fraction of units kept")
    p.add_argument("--config", default=CUTTLEFISH_CONFIG, help="cuttlefish: the run YAML that builds the model")
    p.add_argument("--rank-ratio", type=float, default=0.25, help="cuttlefish: r = ceil(ratio * full rank)")
    p.add_argument("--frob-decay", action="store_true",
                   help="cuttlefish: add the method's Frobenius decay to the low-rank training step")
    p.add_argument("--modes", default="train,infer", help="comma list of train, infer")
    p.add_argument("--steps", type=int, default=30, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model and mode")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--pool", type=int, default=16, help="distinct batches cycled through")
    p.add_argument("--data", choices=["fashion_mnist", "random"], default="fashion_mnist")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("train", "infer") for m in modes):
        p.error(f"--modes {args.modes!r}: a comma list of train, infer")
    if not 0 < args.keep <= 1:
        p.error(f"--keep {args.keep}: a fraction in (0, 1]")
    if not 0 < args.rank_ratio <= 1:
        p.error(f"--rank-ratio {args.rank_ratio}: a fraction in (0, 1]")
    if min(args.steps, args.rounds, args.batch, args.pool) < 1 or args.warmup < 0:
        p.error("--steps, --rounds, --batch, --pool must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.export and args.model:
        print(f"(--model {args.model} ignored: the model is the export's)")
    if args.method == "polarization":
        dense, small, facts = build_polarization(args)
        label = "pruned"
    else:
        dense, small, facts = build_cuttlefish(args)
        label = "low-rank"
    if args.channels_last:
        dense, small = (m.to(memory_format=torch.channels_last) for m in (dense, small))
    hook, no_decay = None, set()
    if args.method == "cuttlefish" and args.frob_decay:
        hook = frobenius_hook(small, facts["ranks"], WEIGHT_DECAY)
        mods = dict(small.named_modules())
        no_decay = {id(w) for n in facts["ranks"] for w in LR.factor_pair(mods[n])}
    batches = make_batches(args)
    if args.channels_last:
        batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
    runs = {"dense": Subject(dense), label: Subject(small, no_decay, hook)}

    example = batches[0][0][:1]
    params = {k: C.count_params(s.model) for k, s in runs.items()}
    flops = {k: forward_flops(s.model, example) for k, s in runs.items()}
    for mode in modes:  # warm-up (allocations, oneDNN primitives)
        for s in runs.values():
            if args.warmup:
                s.block(mode, batches, args.warmup)
    times: dict[str, dict[str, list[float]]] = {m: {k: [] for k in runs} for m in modes}
    for mode in modes:
        for _ in range(args.rounds):
            for name, s in runs.items():
                times[mode][name].append(s.block(mode, batches, args.steps))

    flops_ratio = flops["dense"] / flops[label]
    med = {m: {k: statistics.median(v) for k, v in times[m].items()} for m in modes}
    speedup = {m: med[m]["dense"] / med[m][label] for m in modes}

    if args.method == "polarization":
        what = (f"gating={facts['gating']} position={facts['position']} "
                + (f"export={args.export}" if args.export else f"keep={args.keep} seed={args.seed}")
                + f" units kept {facts['units_kept']}/{facts['units_total']}, blocks removed {facts['blocks_removed']}")
    else:
        what = ((f"export={args.export}" if args.export else f"config={args.config} rank_ratio={args.rank_ratio}")
                + f" layers factorized {facts['layers_factorized']}"
                + (f"/{facts['layers_candidate']} candidates" if facts["layers_candidate"] is not None else "")
                + (" frob_decay" if args.frob_decay else ""))
    print(f"method={args.method} model={facts['model']} batch={args.batch} threads={torch.get_num_threads()} "
          f"steps={args.steps} rounds={args.rounds} channels_last={args.channels_last} data={args.data} {what}")
    print(f"| quantity | dense | {label} | dense/{label} |")
    print("|---|---|---|---|")
    print(f"| params | {params['dense']:,} | {params[label]:,} | {params['dense'] / params[label]:.3f} |")
    print(f"| forward MFLOPs/sample | {flops['dense'] / 1e6:.3f} | {flops[label] / 1e6:.3f} | "
          f"{flops_ratio:.3f} (FLOPs ratio) |")
    names = {"train": "train", "infer": "inference"}
    for m in modes:
        print(f"| {names[m]} ms/step (median of {args.rounds} x {args.steps}) | {1000 * med[m]['dense']:.2f} | "
              f"{1000 * med[m][label]:.2f} | {speedup[m]:.3f} (speed-up) |")
    for m in modes:
        print(f"| {names[m]} speed-up / FLOPs ratio | | | {speedup[m] / flops_ratio:.3f} |")
    if args.json:
        out: dict[str, Any] = {"method": args.method, "model": facts["model"], "source": "export" if args.export
                               else "synthetic", "batch": args.batch, "threads": torch.get_num_threads(),
                               "steps": args.steps, "rounds": args.rounds, "channels_last": args.channels_last,
                               "data": args.data, "params_dense": params["dense"], "params_small": params[label],
                               "flops_dense": flops["dense"], "flops_small": flops[label], "flops_ratio": flops_ratio}
        for m in modes:
            out.update({f"{m}_ms_dense": 1000 * med[m]["dense"], f"{m}_ms_small": 1000 * med[m][label],
                        f"{m}_speedup": speedup[m], f"{m}_realized": speedup[m] / flops_ratio,
                        f"{m}_ms_rounds": {"dense": [1000 * t for t in times[m]["dense"]],
                                           "small": [1000 * t for t in times[m][label]]}})
        out.update({k: v for k, v in facts.items() if k not in ("model", "arch")})
        if args.method == "cuttlefish":
            out["frob_decay"] = bool(args.frob_decay)
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
