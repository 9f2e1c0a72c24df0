"""``dist-sparse``: the command line. Argument parsing only; the work happens in the modules.

    dist-sparse train --config configs/tiny_resnet20_dense.yaml [key.sub=value ...]
    dist-sparse eval  --config configs/tiny_resnet20_dense.yaml --checkpoint runs/x/checkpoints/step_00000100
    dist-sparse export --config configs/tiny_resnet20_dense.yaml --checkpoint runs/x/checkpoints --out x.safetensors
    dist-sparse flops --config configs/tiny_resnet20_rigl.yaml [--checkpoint runs/x/checkpoints]
    dist-sparse slurm submit --config configs/tiny_resnet20_dense.yaml --nodes 1 --procs-per-node 2
    dist-sparse models | methods
"""
from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError


def _cmd_train(args) -> int:
    from .train import main as train_main

    argv = (["--config", args.config] if args.config else []) + (["--resume"] if args.resume else []) + args.overrides
    return train_main(argv)


def _cmd_eval(args) -> int:
    from .config import load_config
    from .train import Trainer

    try:
        cfg = load_config(args.config, list(args.overrides) + [f"checkpoint.resume={args.checkpoint}",
                                                               "logging.progress_bar=false"])
        trainer = Trainer(cfg)
        trainer.model.eval()
        result = trainer.task.evaluate(trainer.model, trainer.data.val, trainer.acc, trainer.epoch)
        if hasattr(trainer.task, "final_metrics"):
            result.update(trainer.task.final_metrics(trainer.model, trainer.data, trainer.acc, trainer.run_dir))
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return 2
    if trainer.acc.is_main_process:
        print(json.dumps(result, indent=1, sort_keys=True))
    trainer.acc.end_training()
    _shutdown()
    return 0


def _shutdown() -> None:
    from .distributed import shutdown

    shutdown()


def _cmd_check(args) -> int:
    """Validate a training command's config without starting any work (launch/run.sh runs it first)."""
    from .config import load_config

    try:
        load_config(args.config, list(args.overrides) + (["checkpoint.resume=auto"] if args.resume else []))
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return 2
    return 0


def _cmd_export(args) -> int:
    from .config import load_config
    from .train import Trainer

    try:
        cfg = load_config(args.config, list(args.overrides) + [f"checkpoint.resume={args.checkpoint}",
                                                               "logging.progress_bar=false"])
        trainer = Trainer(cfg)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return 2
    path = trainer.export(args.out)  # the finalized model: masks folded, gates removed, factors kept
    if path:
        print(f"wrote {path} (step {trainer.step}; load it with dist_sparse.load_exported)")
    trainer.acc.end_training()
    _shutdown()
    return 0


def _cmd_flops(args) -> int:
    """Per-layer forward FLOPs and densities of a config's model (finalized from a checkpoint, or as
    the method prepares it at the start of training)."""
    import tempfile

    import torch

    from .config import load_config
    from .data import build_data, calibration_batches
    from .methods import create_method
    from .metrics.flops import flops_summary, format_flops_table, layer_forward_flops
    from .metrics.layer_stats import count_parameters, layer_stats
    from .tasks import build_model, make_task

    try:
        extra = [f"checkpoint.resume={args.checkpoint}"] if args.checkpoint else []
        cfg = load_config(args.config, list(args.overrides) + extra + ["logging.progress_bar=false"])
        if args.checkpoint:
            from .train import Trainer

            trainer = Trainer(cfg)
            model, example = trainer.finalized_model(), trainer.method.ctx.example_input
            dense, where = trainer._registered_model(), f"checkpoint step {trainer.step}"
            trainer.acc.end_training()
            _shutdown()
        else:
            with tempfile.TemporaryDirectory() as tmp:
                data = build_data(cfg, rank=0, world_size=1, device=torch.device("cpu"), run_dir=tmp)
            task = make_task(data.task, cfg, data.info)
            example = tuple(x.cpu() for x in task.model_input(next(iter(calibration_batches(data.train, 1)))))
            torch.manual_seed(cfg.run.seed)
            dense = build_model(cfg, data.info)
            torch.manual_seed(cfg.run.seed)
            method = create_method(cfg.method, seed=cfg.run.seed)
            model, where = method.finalize(method.prepare(build_model(cfg, data.info))), "initial state"
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return 2
    stats = layer_stats(model)
    print(f"{cfg.model.name} / {cfg.method.name} ({where}); FLOPs per sample, a multiply-add = 2 FLOPs")
    print(format_flops_table(layer_forward_flops(model, example), stats))
    total, nonzero = count_parameters(model)
    summary = flops_summary(model, example, dense_reference=dense)
    print(f"parameters {total:,} (nonzero {nonzero:,}, {100 * nonzero / max(1, total):.1f} %); forward FLOPs "
          f"{summary['flops/forward_effective'] / 1e6:.2f} M effective = "
          f"{100 * summary['flops/forward_fraction']:.1f} % of dense")
    return 0


def _cmd_list(kind: str) -> int:
    if kind == "models":
        from .models import model_family, model_names

        for n in model_names():
            print(f"{n:24s} {model_family(n)}")
    else:
        from .methods import method_names

        print("\n".join(method_names()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dist-sparse", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (under accelerate launch / torchrun for several processes)")
    t.add_argument("--config", "-c", help="YAML config (see configs/)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the run")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    t.set_defaults(func=_cmd_train)
    e = sub.add_parser("eval", help="evaluate a checkpoint on the validation split")
    e.add_argument("--config", "-c", required=True)
    e.add_argument("--checkpoint", required=True, help="checkpoint directory (or a directory of them: newest)")
    e.add_argument("overrides", nargs="*")
    e.set_defaults(func=_cmd_eval)
    k = sub.add_parser("check", help="validate the config of a training command (one error line, exit 2)")
    k.add_argument("--config", "-c")
    k.add_argument("--resume", action="store_true")
    k.add_argument("overrides", nargs="*")
    k.set_defaults(func=_cmd_check)
    x = sub.add_parser("export", help="write one consolidated state_dict (safetensors) from a (sharded) checkpoint; "
                                      "launch it like the run that wrote the checkpoint")
    x.add_argument("--config", "-c", required=True)
    x.add_argument("--checkpoint", required=True, help="checkpoint directory (or a directory of them: newest)")
    x.add_argument("--out", required=True, help="output .safetensors file")
    x.add_argument("overrides", nargs="*")
    x.set_defaults(func=_cmd_export)
    f = sub.add_parser("flops", help="per-layer FLOPs, parameters and densities of a config's model")
    f.add_argument("--config", "-c", required=True)
    f.add_argument("--checkpoint", help="a checkpoint (or a directory of them): the finalized trained model")
    f.add_argument("overrides", nargs="*")
    f.set_defaults(func=_cmd_flops)
    sub.add_parser("models", help="list registered models").set_defaults(func=lambda a: _cmd_list("models"))
    sub.add_parser("methods", help="list registered methods").set_defaults(func=lambda a: _cmd_list("methods"))
    try:
        from . import slurm
    except ImportError:
        slurm = None
    if slurm is not None and hasattr(slurm, "add_subcommand"):
        slurm.add_subcommand(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
