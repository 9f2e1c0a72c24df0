"""``dist-sparse``: the command line. Argument parsing only; the work happens in the modules.

    dist-sparse train --config configs/tiny_resnet20_dense.yaml [key.sub=value ...]
    dist-sparse eval  --config configs/tiny_resnet20_dense.yaml --checkpoint runs/x/checkpoints/step_00000100
    dist-sparse export --config configs/tiny_resnet20_dense.yaml --checkpoint runs/x/checkpoints --out x.safetensors
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
    return 0


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
    from .checkpoint import export_weights
    from .config import load_config
    from .train import Trainer

    try:
        cfg = load_config(args.config, list(args.overrides) + [f"checkpoint.resume={args.checkpoint}",
                                                               "logging.progress_bar=false"])
        trainer = Trainer(cfg)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return 2
    path = export_weights(trainer.acc, trainer.model, args.out, {"model": cfg.model.name, "method": cfg.method.name,
                                                                 "step": str(trainer.step)})
    if path:
        print(f"wrote {path} (step {trainer.step}, {trainer.n_params:,} parameters)")
    trainer.acc.end_training()
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
