"""Training FLOPs of a mask-based method (RigL, SET, Static, GMP) as a fraction of dense training, from its
schedule: the per-layer densities and the steps with dense weight gradients are fixed by the config (not by
the data or the seed), so they can be replayed without training.

    python benchmarks/masked_train_flops.py --config configs/tiny_resnet20_rigl.yaml method.sparsity=0.85
    python benchmarks/masked_train_flops.py --config configs/tiny_resnet20_gmp.yaml method.sparsity=0.85

A step is counted with :func:`dist_sparse.metrics.flops.training_flops`: ``3 * F_S`` on a sparse step (forward,
backward to the activations and to the weights all on the masked weights), ``2 * F_S + F_D`` on a RigL
update step (its dense weight gradient), where ``F_S`` is the forward FLOPs at that step's per-layer
densities. GMP is dense until its first pruning step, then follows its cubic ramp. The steps per epoch are
the trainer's (training images // global batch). Prints the fraction and the test (inference) fraction at the
final densities.
"""
from __future__ import annotations

import argparse
import sys

import torch

from dist_sparse import tasks
from dist_sparse.config import load_config
from dist_sparse.metrics.flops import RunFlops, layer_forward_flops, sparse_forward_flops
from dist_sparse.methods import create_method
from dist_sparse.methods.base import OptimizerInfo, RunContext
from dist_sparse.methods.masked import MaskedMethod
from dist_sparse.models import create_model


def fractions(cfg, train_size: int = 60000) -> dict:
    """``{"train": Train F, "test": Test F, "steps": N, "dense_grad_steps": U}`` of ``cfg``'s method."""
    info = {"num_classes": 10, "in_chans": 1, "img_size": 28}
    model = create_model(cfg.model.name, **{k: v for k, v in tasks.model_kwargs(cfg, info).items() if v is not None})
    spe = train_size // cfg.data.batch_size
    total = spe * cfg.run.epochs
    method = create_method(cfg.method, seed=cfg.run.seed)
    if not isinstance(method, MaskedMethod):
        raise ValueError(f"method.name = {cfg.method.name!r}: expected a mask-based method (rigl, set, static, gmp)")
    example = torch.zeros(1, info["in_chans"], info["img_size"], info["img_size"])
    method.setup(RunContext(total_steps=total, steps_per_epoch=spe, example_input=(example,),
                            optimizer=OptimizerInfo(cfg.optim.name, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                                    momentum=cfg.optim.momentum)))
    model = method.prepare(model)
    method.bind(model, torch.optim.SGD(model.parameters(), lr=0.0))
    report = layer_forward_flops(model, example)
    run = RunFlops(report)
    gmp = getattr(method, "layer_sparsity", None)
    sched = getattr(method, "schedule", None)
    current = method.densities()
    dense_grad_steps = 0
    for t in range(total):
        update = gmp is None and sched is not None and sched.is_update(t)
        dense_grad_steps += int(update)
        run.add_step(current, "sparse_fwd_dense_bwd" if update else "sparse")
        if gmp is not None and sched.is_update(t):  # GMP prunes after step t: later steps are sparser
            current = {n: 1.0 - gmp(n, t) for n in method.names}
    test = sparse_forward_flops(report, current) / report.total  # at the densities of the last step
    return {"train": run.fraction(), "test": test, "steps": total, "steps_per_epoch": spe,
            "dense_grad_steps": dense_grad_steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--train-size", type=int, default=60000, help="training images (Fashion-MNIST: 60000)")
    p.add_argument("overrides", nargs="*", help="key.sub=value, as for dist-sparse train")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    try:
        f = fractions(cfg, args.train_size)
    except ValueError as err:
        p.error(str(err))
    print(f"{cfg.method.name}: {f['steps']} steps ({f['steps_per_epoch']}/epoch, {f['dense_grad_steps']} with dense "
          f"weight gradients), sparsity {cfg.method.sparsity}, {cfg.method.distribution}: "
          f"Train F {f['train']:.3f}, Test F {f['test']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
