"""One typed configuration schema, loaded from YAML, with ``key.sub=value`` overrides.

Every field has a type, a default and a one-line meaning (the comment beside it). Bad input stops the
run before any work with one :class:`ConfigError` line that names the key, the value and what is
allowed; ``dist-sparse`` prints that line and exits with status 2.

Example::

    cfg = load_config("configs/tiny_resnet20_dense.yaml", ["optim.lr=0.05", "run.epochs=2"])
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError, check_range  # noqa: F401  (re-exported for method configs' validate())

__all__ = ["Config", "ConfigError", "load_config", "config_from_dict", "config_to_dict", "parse_overrides"]


# ------------------------------------------------------------------------------------------------
# Schema
# ------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    name: str = "run"  # run name; the run directory is output_dir/name
    output_dir: str = "runs"  # parent directory of run directories
    seed: int = 0  # global seed (model init, data order, augmentation, method randomness)
    epochs: int = 1  # number of training epochs
    max_steps: int = 0  # stop after this many optimizer steps in total (0: epochs decide)
    num_processes: int = 0  # expected world size; the run refuses to start on another (0: any)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "no"  # auto: bf16 where the hardware has fast bf16, else no; fp16 needs CUDA
    deterministic: bool = False  # torch.use_deterministic_algorithms + fixed cuDNN settings
    channels_last: bool = False  # memory format for conv nets (faster on CPU and GPU)
    eval_every_epochs: int = 1  # evaluate every N epochs (and always at the end)
    eval_batch_size: int = 0  # global batch for evaluation (0: same as data.batch_size)
    threads: int = 0  # torch intra-op threads per process (0: leave torch's default)


@dataclass
class ModelConfig:
    name: str = "resnet20"  # registered model name (see `dist-sparse models`)
    num_classes: Optional[int] = None  # output classes (None: taken from the data set)
    in_chans: Optional[int] = None  # input channels (None: taken from the data set)
    img_size: Optional[int] = None  # input side in pixels (None: taken from the data set)
    width_mult: Optional[float] = None  # channel width multiplier (ResNets)
    stem: Optional[Literal["cifar", "imagenet"]] = None  # ResNet-18/34/50 stem (cifar: 3x3 conv, no max-pool)
    norm: Optional[Literal["bn", "gn", "none"]] = None  # normalization layer (gn/none for exact rank invariance)
    drop_path_rate: Optional[float] = None  # stochastic depth (DeiT)
    sync_bn: bool = False  # BatchNorm statistics over the global batch of all ranks (torch SyncBatchNorm on CUDA)
    distillation: str = "none"  # none, or hard: DeiT's distillation head learns the teacher's argmax (Touvron et al. 2021)
    teacher: str = ""  # hard distillation: a model exported by dist-sparse (model.safetensors), or a model name ...
    teacher_checkpoint: str = ""  # ... with its local weights file (.safetensors / .pt)
    ema_decay: float = 0.0  # EMA of the weights, decay per optimizer step (DeiT: 0.99996; 0: off): evaluated and exported beside the model
    ema_warmup: bool = False  # EMA decay min(ema_decay, 1 - (1 + step)^(-2/3)) (timm's warm-up), so early weights fade
    extra: dict = field(default_factory=dict)  # further keyword arguments for the model's entry function


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # data set: fashion_mnist, image_folder, hf_image, ding_de_en, parallel_text, copy, reverse
    root: str = ""  # directory of the data ('' = the default place; $DIST_SPARSE_DATA overrides it)
    batch_size: int = 128  # GLOBAL batch per optimizer micro-step, split evenly across processes
    augment: bool = True  # random crop with padding + horizontal flip (images)
    crop_padding: int = 2  # padding of the random crop, pixels
    hflip: bool = True  # random horizontal flip
    # Decoded image sets (image_folder, hf_image): worker processes and per-sample transforms
    num_workers: int = 0  # DataLoader worker processes per rank that decode and augment (0: in the training process)
    decoder: str = "torchvision"  # image files: torchvision (libjpeg-turbo/libpng; faster with workers here) or pil (reduced-size JPEG decoding)
    transform: str = "crop_flip"  # crop_flip (pad + crop + flip), rrc (torchvision ImageNet), timm (DeiT recipe)
    scale: list = field(default_factory=lambda: [0.08, 1.0])  # rrc/timm: RandomResizedCrop area fractions
    ratio: list = field(default_factory=lambda: [0.75, 4 / 3])  # rrc/timm: RandomResizedCrop aspect ratios
    interpolation: str = "bilinear"  # rrc/timm: bilinear, bicubic or nearest
    crop_pct: float = 0.875  # rrc/timm eval: centre crop of size, after resizing the short side to size / crop_pct
    color_jitter: float = 0.0  # timm: colour-jitter strength (0: off)
    auto_augment: str = ""  # timm: e.g. rand-m9-mstd0.5-inc1 (RandAugment of DeiT); '' off
    re_prob: float = 0.0  # timm: Random Erasing probability
    mixup: float = 0.0  # Mixup Beta alpha on pairs of training rows (DeiT: 0.8; 0: off); soft targets
    cutmix: float = 0.0  # CutMix Beta alpha (DeiT: 1.0; 0: off)
    mix_prob: float = 1.0  # probability that a pair is mixed (mixup/cutmix on)
    mix_switch_prob: float = 0.5  # probability of CutMix instead of Mixup when both are on
    repeated_aug: int = 1  # repeated augmentation: each sample this many times per global batch (DeiT: 3; 1: off)
    train_subset: int = 0  # use only the first N training samples (0: all) - for tests and demos
    val_subset: int = 0  # use only the first N validation samples (0: all)
    max_tokens: int = 4096  # translation: tokens (source + target) per global batch, bucketed by length
    vocab_size: int = 8000  # translation: joint sentencepiece vocabulary size
    max_len: int = 128  # translation: drop pairs longer than this many pieces
    extra: dict = field(default_factory=dict)  # data-set specific options


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw", "adam"] = "sgd"  # optimizer
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # SGD Nesterov momentum
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # Adam(W) betas
    eps: float = 1e-8  # Adam(W) epsilon
    weight_decay: float = 5e-4  # weight decay (decoupled for AdamW)
    decay_norm_and_bias: bool = False  # also decay norm weights and biases (off: the usual recipe)
    grad_clip: float = 0.0  # clip the global gradient norm to this (0: off)
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    label_smoothing: float = 0.0  # label smoothing of the cross-entropy loss


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "step", "constant", "inverse_sqrt"] = "cosine"  # learning-rate schedule
    warmup_steps: int = 0  # linear warm-up in optimizer steps (takes precedence over warmup_epochs)
    warmup_epochs: float = 0.0  # linear warm-up in epochs
    min_lr_ratio: float = 0.0  # cosine: final lr as a fraction of the peak
    milestones: list = field(default_factory=lambda: [0.5, 0.75])  # step: fractions of training where lr drops
    gamma: float = 0.1  # step: factor at each milestone


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # save every N optimizer steps (0: off)
    every_epoch: bool = True  # save at the end of every epoch
    keep_last: int = 2  # keep the newest K checkpoints
    resume: str = "never"  # never | auto (newest complete checkpoint of the run) | a checkpoint path
    dir: str = ""  # checkpoint directory ('' = <run dir>/checkpoints)
    save_final: bool = True  # write the consolidated final weights to <run dir>/model.safetensors


@dataclass
class LoggingConfig:
    progress_bar: bool = True  # tqdm bar on rank 0
    log_every_steps: int = 50  # a JSONL line of train metrics every N optimizer steps (0: epoch lines only)
    sync_every_steps: int = 10  # optimizer steps between the all-reduces of the logged loss and the preemption flag
    tensorboard: bool = False  # also write TensorBoard events (needs the tensorboard package)
    rank_logs: bool = False  # every rank writes its own debug log rank<k>.log in the run directory
    plots: bool = True  # write the method's plots (PNG) at the end


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    method: Any = None  # a MethodConfig subclass chosen by method.name (dense when absent)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.run.output_dir, self.run.name)


# ------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with checks
# ------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list or tp is list:
        return "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _plain(value: Any) -> Any:
    """Nested YAML data with every remembered-spelling float turned into a plain float."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return float(value) if isinstance(value, float) and type(value) is not float else value


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return _plain(value)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError:
                pass
        raise ConfigError(key, value, _type_name(tp))
    if origin is Literal:
        if value is False and "no" in typing.get_args(tp):  # YAML 1.1 reads a bare `no` as false
            value = "no"
        if value not in typing.get_args(tp):
            raise ConfigError(key, value, _type_name(tp))
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "true/false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "a number")
        return float(value)
    if tp is str:
        if isinstance(value, _Number) and value.text:
            return value.text
        if not isinstance(value, str):
            raise ConfigError(key, value, "a string")
        return value
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, "a list")
        return _plain(list(value))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, value, "a mapping")
        return _plain(dict(value))
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def build_dataclass(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from mapping ``data``; unknown keys and wrong types raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(prefix, data, "a mapping of " + ", ".join(f.name for f in dataclasses.fields(cls)))
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(full, value, "a known key of " + (prefix or "the config") + ": " + ", ".join(names))
        kwargs[key] = _coerce(full, value, hints[key])
    return cls(**kwargs)


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(key, value, allowed)


def validate(cfg: Config) -> None:
    """Range checks and names that depend on registries; raises ConfigError on the first problem."""
    from .models import model_names

    r, m, d, o, s, c = cfg.run, cfg.model, cfg.data, cfg.optim, cfg.schedule, cfg.checkpoint
    _check(r.epochs >= 1, "run.epochs", r.epochs, "an integer >= 1")
    _check(r.max_steps >= 0, "run.max_steps", r.max_steps, "an integer >= 0")
    _check(r.num_processes >= 0, "run.num_processes", r.num_processes, "an integer >= 0 (0: any)")
    _check(r.eval_every_epochs >= 1, "run.eval_every_epochs", r.eval_every_epochs, "an integer >= 1")
    _check(r.eval_batch_size >= 0, "run.eval_batch_size", r.eval_batch_size, "an integer >= 0")
    if r.mixed_precision == "fp16":
        import torch

        _check(torch.cuda.is_available(), "run.mixed_precision", "fp16",
               "bf16, auto or no on a machine without CUDA (fp16 autocast and loss scaling need a GPU)")
    if r.num_processes:
        _check(cfg.data.batch_size % r.num_processes == 0, "data.batch_size", cfg.data.batch_size,
               f"a multiple of run.num_processes ({r.num_processes}): it is the global batch, split evenly")
    _check(bool(r.name) and "/" not in r.name, "run.name", r.name, "a non-empty name without '/'")
    names = model_names()
    from .models.external import external_exists, is_external

    if is_external(m.name):
        _check(external_exists(m.name), "model.name", m.name,
               f"an architecture {m.name.split('/')[0]} knows (its list_models())")
        for key in ("width_mult", "stem", "norm"):
            _check(getattr(m, key) is None, f"model.{key}", getattr(m, key),
                   f"unset for {m.name} (our ResNet option; pass timm keyword arguments in model.extra)")
    else:
        _check(m.name in names, "model.name", m.name,
               "one of " + ", ".join(names) + ", or timm/<arch> or torchvision/<arch>")
    _check(m.width_mult is None or m.width_mult > 0, "model.width_mult", m.width_mult, "a number > 0")
    _check(0.0 <= m.ema_decay < 1.0, "model.ema_decay", m.ema_decay, "a number in [0, 1) (0: no weight EMA)")
    _check(m.ema_decay > 0 or not m.ema_warmup, "model.ema_warmup", m.ema_warmup,
           "false while model.ema_decay is 0 (no weight EMA)")
    _check(m.distillation in ("none", "hard"), "model.distillation", m.distillation, "none or hard")
    if m.distillation == "none":
        for key in ("teacher", "teacher_checkpoint"):
            _check(not getattr(m, key), f"model.{key}", getattr(m, key), "empty while model.distillation is none")
    else:
        _check(m.name.startswith("deit_"), "model.distillation", m.distillation,
               f"none for model.name={m.name} (hard distillation needs DeiT's distillation token and head)")
        _check(bool(m.teacher), "model.teacher", m.teacher, "an exported model file or a model name (with "
               "model.teacher_checkpoint) for model.distillation=hard")
        if m.teacher.endswith(".safetensors") and not m.teacher_checkpoint:
            _check(os.path.isfile(m.teacher), "model.teacher", m.teacher, "an existing exported model file")
        else:
            _check(bool(m.teacher_checkpoint) and os.path.isfile(m.teacher_checkpoint), "model.teacher_checkpoint",
                   m.teacher_checkpoint, f"an existing local weights file for the teacher {m.teacher} (a random "
                   "teacher teaches nothing)")
    from .data import dataset_names, dataset_task
    from .models import model_family

    dnames = dataset_names()
    _check(d.name in dnames, "data.name", d.name, "one of " + ", ".join(dnames))
    family, task = model_family(m.name), dataset_task(d.name)
    needs = "translation" if family == "transformer" else "classification"
    if task != needs:
        fits = [n for n in dnames if dataset_task(n) == needs]
        raise ConfigError("data.name", d.name, f"a {needs} data set for model.name={m.name} "
                          f"({', '.join(fits)}), or a {task} model")
    _check(d.batch_size >= 1, "data.batch_size", d.batch_size, "an integer >= 1")
    _check(d.crop_padding >= 0, "data.crop_padding", d.crop_padding, "an integer >= 0")
    _check(d.train_subset >= 0, "data.train_subset", d.train_subset, "an integer >= 0")
    _check(d.val_subset >= 0, "data.val_subset", d.val_subset, "an integer >= 0")
    _check(d.max_tokens >= 16, "data.max_tokens", d.max_tokens, "an integer >= 16")
    _check(d.vocab_size >= 16, "data.vocab_size", d.vocab_size, "an integer >= 16")
    _check(d.root == "" or os.path.exists(d.root), "data.root", d.root, "an existing directory or file")
    from .data import PIPELINE_KEYS, dataset_decoded

    if dataset_decoded(d.name):
        from .data.transforms import check_transform_keys

        _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "an integer >= 0 (0: in the training process)")
        _check(d.decoder in ("pil", "torchvision"), "data.decoder", d.decoder, "pil or torchvision")
        check_transform_keys(d, DataConfig())
        _check(d.repeated_aug >= 1, "data.repeated_aug", d.repeated_aug, "an integer >= 1 (1: off)")
        _check(d.mixup >= 0, "data.mixup", d.mixup, "a Beta alpha >= 0 (0: off)")
        _check(d.cutmix >= 0, "data.cutmix", d.cutmix, "a Beta alpha >= 0 (0: off)")
        for key in ("mix_prob", "mix_switch_prob"):
            v = getattr(d, key)
            _check(0 <= v <= 1, f"data.{key}", v, "a probability in [0, 1]")
            _check(d.mixup > 0 or d.cutmix > 0 or v == getattr(DataConfig(), key), f"data.{key}", v,
                   "its default while data.mixup and data.cutmix are 0 (mixing is off)")
    else:
        base = DataConfig()
        for key in PIPELINE_KEYS:
            _check(getattr(d, key) == getattr(base, key), f"data.{key}", getattr(d, key),
                   f"its default for data.name={d.name}, which {'is held in memory and augmented by whole batches' if task == 'classification' else 'is text'}"
                   "; the decoded-image pipeline serves " + ", ".join(n for n in dnames if dataset_decoded(n)))
    _check(o.lr > 0, "optim.lr", o.lr, "a number > 0")
    _check(0 <= o.momentum < 1, "optim.momentum", o.momentum, "a number in [0, 1)")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a number >= 0")
    _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "a number >= 0 (0: off)")
    _check(o.grad_accum_steps >= 1, "optim.grad_accum_steps", o.grad_accum_steps, "an integer >= 1")
    _check(0 <= o.label_smoothing < 1, "optim.label_smoothing", o.label_smoothing, "a number in [0, 1)")
    _check(o.eps > 0, "optim.eps", o.eps, "a number > 0")
    _check(len(o.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas),
           "optim.betas", o.betas, "two numbers in [0, 1)")
    _check(s.warmup_steps >= 0, "schedule.warmup_steps", s.warmup_steps, "an integer >= 0")
    _check(s.warmup_epochs >= 0, "schedule.warmup_epochs", s.warmup_epochs, "a number >= 0")
    _check(0 <= s.min_lr_ratio <= 1, "schedule.min_lr_ratio", s.min_lr_ratio, "a number in [0, 1]")
    _check(all(isinstance(x, (int, float)) and 0 < x < 1 for x in s.milestones), "schedule.milestones",
           s.milestones, "a list of fractions of training in (0, 1)")
    _check(0 < s.gamma <= 1, "schedule.gamma", s.gamma, "a number in (0, 1]")
    _check(cfg.logging.sync_every_steps >= 1, "logging.sync_every_steps", cfg.logging.sync_every_steps,
           "an integer >= 1")
    _check(c.every_steps >= 0, "checkpoint.every_steps", c.every_steps, "an integer >= 0 (0: off)")
    _check(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, "an integer >= 1")
    _check(c.resume in ("never", "auto") or os.path.exists(c.resume), "checkpoint.resume", c.resume,
           "never, auto or the path of an existing checkpoint")
    check = getattr(cfg.method, "validate", None)
    if callable(check):
        check()


def config_from_dict(data: dict) -> Config:
    """Build and validate a :class:`Config` from a plain mapping (as read from YAML)."""
    from .methods import method_config_class, method_names

    if not isinstance(data, dict):
        raise ConfigError("<config>", data, "a YAML mapping with sections " + ", ".join(
            f.name for f in dataclasses.fields(Config)))
    data = dict(data)
    method_data = data.pop("method", None) or {}
    if not isinstance(method_data, dict):
        raise ConfigError("method", method_data, "a mapping with at least 'name'")
    cfg = build_dataclass(Config, data, "")
    mname = method_data.get("name", "dense")
    known = method_names()
    if mname not in known:
        raise ConfigError("method.name", mname, "one of " + ", ".join(known))
    cfg.method = build_dataclass(method_config_class(mname), method_data, "method")
    validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """The resolved config as plain data (what the run directory stores as config.yaml)."""
    return dataclasses.asdict(cfg)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with two fixes for configs people write by hand.

    * Floats as a person writes them: YAML 1.1 (PyYAML) reads ``3e-5`` and ``1e3`` as strings because
      they lack a dot; here every spelling Python's ``float()`` accepts in decimal form is a float.
    * A key given twice in one mapping is an error naming the key and the line (YAML keeps the last
      one silently).
    """


_FLOAT = re.compile(r"""^[-+]?(?:(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                        |[0-9][0-9_]*[eE][-+]?[0-9]+
                        |\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X)
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in list("-+0123456789."):
    _Loader.yaml_implicit_resolvers[_first] = [
        (tag, rx) for tag, rx in _Loader.yaml_implicit_resolvers.get(_first, []) if tag != "tag:yaml.org,2002:float"]
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


class _Number(float):
    """A float read from YAML that remembers how it was written (for a string field such as a run
    name ``1e5``, which YAML 1.1 kept as text)."""

    text: str = ""


def _float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    value = _Number(yaml.SafeLoader.construct_yaml_float(loader, node))
    value.text = node.value
    return value


_Loader.add_constructor("tag:yaml.org,2002:float", _float)


def _no_duplicate_keys(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(f"{key}", f"given twice (lines {seen[key]} and {line})",
                              "each key once per mapping")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def yaml_load(text: str) -> Any:
    """Parse config YAML (floats like ``3e-5``, no duplicate keys)."""
    return yaml.load(text, Loader=_Loader)


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``["optim.lr=0.05", "run.name=x"]`` -> ``[("optim.lr", 0.05), ("run.name", "x")]`` (YAML values)."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError("<override>", item, "key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        try:
            value = yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


def _apply_override(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(".".join(parts[: i + 1]), nxt, "a mapping (to set " + key + ")")
        node = nxt
    node[parts[-1]] = value


def load_config(path: str | None, overrides: list[str] | None = None) -> Config:
    """Read YAML ``path`` (or start from defaults when None), apply overrides, build and validate."""
    data: dict = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError("--config", path, "the path of an existing YAML file (see configs/)")
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except UnicodeDecodeError as err:
            raise ConfigError("--config", path, f"a UTF-8 text file (byte {err.start} is not UTF-8)") from None
        except OSError as err:
            raise ConfigError("--config", path, f"a readable file ({err.strerror})") from None
        if "\x00" in text:
            raise ConfigError("--config", path, "a YAML text file (it holds NUL bytes: a binary file?)")
        if not text.strip() or all(not ln.strip() or ln.lstrip().startswith("#") for ln in text.splitlines()):
            raise ConfigError("--config", path, "a YAML mapping with sections " + ", ".join(
                f.name for f in dataclasses.fields(Config)) + " (the file is empty)")
        try:
            data = yaml_load(text) or {}
        except yaml.YAMLError as err:
            first = str(err).splitlines()[0]
            raise ConfigError("--config", path, f"valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise ConfigError(path or "<config>", data, "a YAML mapping with sections " + ", ".join(
            f.name for f in dataclasses.fields(Config)))
    for key, value in parse_overrides(overrides or []):
        _apply_override(data, key, value)
    return config_from_dict(data)
