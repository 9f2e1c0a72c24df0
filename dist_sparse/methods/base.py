"""The Method protocol: what every sparse / low-rank training method implements.

A method is *model surgery* plus a *controller* that a training loop calls at fixed points. It is built
from its config alone and never depends on our trainer: the same object is driven by
``dist_sparse.train`` (through :mod:`dist_sparse.driver`), by the benchmarks, and later by a
``transformers`` Trainer callback. A method never asks which backend it runs under; every statistic
that spans ranks or shards goes through :mod:`dist_sparse.distributed`.

Lifecycle (``docs/methods.md`` has the whole story and a complete example)::

    method = create_method(cfg.method, seed=run_seed)   # config only: no run length, no model
    model  = method.prepare(model)                      # surgery; pure: idempotent, method unchanged
    method.setup(ctx)                                   # the run: steps, world, optimizer, data
    [method.load_state_dict(state)]                     # resume (before or after prepare)
    method.bind(model, optimizer)                       # after the backend wrapped them (and after a rebuild)
    per optimizer step (see dist_sparse.driver):
        loss = task_loss + method.regularizer(model)    # every micro-batch
        backward
        method.after_backward(model, step)              # complete, averaged gradients
        clip, optimizer.step(), lr schedule
        method.after_step(model, step)                  # skipped with the step on fp16 overflow
    method.on_epoch_end(model, epoch, metrics) -> Rebuild | None
    method.on_train_end(model) -> Rebuild | None        # before the final evaluation and export
    plain  = method.finalize(plain_model)               # the inference model (no dist_sparse modules)

``step`` is the 0-based index of the optimizer step being taken; schedules count optimizer steps.
``prepare`` may run before ``setup`` (``sparsify(model, recipe)`` runs before any trainer exists), so
it uses only the config, the seed and the method's state.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

__all__ = ["Method", "MethodConfig", "Rebuild", "RunContext", "OptimizerInfo", "register_method",
           "create_method", "method_names", "method_config_class", "method_class", "load_plugins"]


@dataclass
class MethodConfig:
    """Settings shared by every method; each method subclasses this with its own fields."""

    name: str = "dense"  # which method: one of the registered names (dense, rigl, ...)


@dataclass
class OptimizerInfo:
    """The run's optimizer hyper-parameters, as a method needs them (e.g. a threshold's weight decay)."""

    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1  # peak learning rate
    weight_decay: float = 0.0  # the run's weight decay (lambda)
    momentum: float = 0.0  # SGD momentum


@dataclass
class RunContext:
    """What a method learns about the run in :meth:`Method.setup`.

    ``calibration(n)`` yields up to ``n`` batches of the training data without augmentation, in a fixed
    order, each rank its own rows of the same global batches (so an all-reduced statistic over them does
    not depend on the number of processes); ``forward(model, batch)`` runs the model on one such batch
    (the trainer knows how a batch maps to model inputs). ``example_input`` is one model input on the CPU
    (FLOPs counting, speed profiling).
    """

    total_steps: int  # optimizer steps of the whole run
    steps_per_epoch: int  # optimizer steps of one epoch
    world_size: int = 1
    rank: int = 0
    seed: int = 0
    optimizer: OptimizerInfo = field(default_factory=OptimizerInfo)
    example_input: Any = None
    calibration: Callable[[int], Iterator[Any]] | None = None
    forward: Callable[[nn.Module, Any], torch.Tensor] | None = None
    device: torch.device | None = None
    run_dir: str | None = None


@dataclass
class Rebuild:
    """Returned by :meth:`Method.on_epoch_end` / :meth:`Method.on_train_end` when the architecture changes.

    The loop gathers the full weights (fp32 master weights under DeepSpeed) into a plain copy of the
    current architecture (built with ``prepare`` from the method's current state), calls
    ``surgery(plain_model)`` on rank 0 (a pure function returning the new plain ``nn.Module``) and
    broadcasts the result; an exception there stops every rank with the same one-line error. Then
    ``commit()`` runs on every rank (the method's state now describes the new architecture, so
    ``prepare`` builds it), the new model is loaded with rank 0's weights (strict), and optimizer and
    schedule are rebuilt under the same backend. ``reason`` is logged and kept in checkpoints.
    """

    surgery: Callable[[nn.Module], nn.Module]
    commit: Callable[[], None] | None = None
    reason: str = ""


class Method:
    """Base class: the dense behaviour for every hook.

    Args:
        cfg: the method's config dataclass (validated by ``dist_sparse.config``).
        seed: the run seed; random choices use ``torch.Generator`` seeded from (seed, what, step).

    Attributes:
        lr_scale: a multiplier of the learning-rate schedule that the method may change (e.g. after a
            switch to low-rank layers); part of the state, restored on resume.
        ctx: the :class:`RunContext` after :meth:`setup` (None before).
    """

    name: ClassVar[str] = "base"
    Config: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, cfg: MethodConfig, *, seed: int = 0):
        self.cfg = cfg
        self.seed = int(seed)
        self.ctx: RunContext | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.lr_scale = 1.0

    # -- lifecycle ----------------------------------------------------------------------------
    def setup(self, ctx: RunContext) -> None:
        """The run is known: length, world, optimizer settings, data access. Build schedules here."""
        self.ctx = ctx

    @property
    def total_steps(self) -> int:
        return self._ctx().total_steps

    @property
    def steps_per_epoch(self) -> int:
        return self._ctx().steps_per_epoch

    def _ctx(self) -> RunContext:
        if self.ctx is None:
            raise RuntimeError(f"method {self.name!r}: setup(ctx) must be called before training starts")
        return self.ctx

    def prepare(self, model: nn.Module) -> nn.Module:
        """Surgery before the backend wraps the model (masks, gates, reparametrizations).

        Must be a pure function of the method's state: calling it twice on equal models gives equal
        models, and it never changes the method (state is adopted in :meth:`bind`).
        """
        return model

    def param_group_overrides(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        """Optimizer options per parameter name (e.g. ``{"x.threshold": {"weight_decay": 3e-5}}``).

        Called on the prepared plain model before the optimizer is built. Every option an override
        does not name is inherited from the group the parameter would have joined.
        """
        return {}

    def bind(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called after the backend prepared model and optimizer (and again after every rebuild).

        ``model`` is the unwrapped module (its parameters may be sharded DTensors or ZeRO partitions);
        ``optimizer`` is the prepared optimizer whose per-element state a method may reset through
        :mod:`dist_sparse.distributed`.
        """
        self.optimizer = optimizer

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the loss of every micro-batch, or None."""
        return None

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Gradients of this optimizer step are complete (accumulated, averaged across ranks)."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """The optimizer has stepped; re-apply masks, update schedules."""

    def constrain(self, model: nn.Module) -> None:
        """Impose the method's constraints on weights written from outside the optimizer (the weight
        EMA swapped in for evaluation): masked methods zero their pruned entries. No state changes."""

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, Any] | None = None) -> Rebuild | None:
        """End of an epoch (not the last); ``metrics`` holds the epoch's global train loss and eval
        metrics. May ask for a rebuild of the architecture."""
        return None

    def on_train_end(self, model: nn.Module) -> Rebuild | None:
        """Training is over; runs before the final evaluation and export (e.g. prune physically)."""
        return None

    def finalize(self, model: nn.Module) -> nn.Module:
        """Turn a plain copy of the training-time model into the inference model.

        Masks folded into zeros, thresholds applied, gates removed, factors kept: the result holds no
        dist_sparse modules and loads into the architecture that :meth:`architecture` describes.
        Works on a copy: the argument may be modified.
        """
        return model

    def architecture(self) -> dict[str, Any]:
        """JSON data that, with the registered model, rebuilds the finalized architecture ({} if the
        registered architecture is unchanged). Stored with every export (see :meth:`build_exported`)."""
        return {}

    @classmethod
    def build_exported(cls, model: nn.Module, arch: dict[str, Any]) -> nn.Module:
        """Rebuild the finalized architecture from the registered ``model`` and :meth:`architecture`'s
        data, with plain torch modules only (used by ``dist_sparse.load_exported``)."""
        if arch:
            raise ValueError(f"method {cls.name!r} exported an architecture {arch!r} it cannot rebuild")
        return model

    def report(self) -> dict[str, Any]:
        """Numbers for the metrics log (flat dict of floats/ints/strings)."""
        return {}

    def plot(self, run_dir: str) -> list[str]:
        """Write figures (per-layer sparsity, rank over time, ...) into ``run_dir``; return paths."""
        return []

    # -- checkpointing ------------------------------------------------------------------------
    # Contract: on resume the loop calls ``load_state_dict`` on a fresh method BEFORE ``prepare``, so
    # ``prepare`` must build the architecture that the state describes (masks, gates, low-rank layers
    # after a switch). The same contract serves ``Rebuild``: after ``commit()``,
    # ``prepare(create_model(...))`` must build the post-surgery architecture. Subclasses extend the
    # dicts of ``super()``; tensors on the CPU and plain Python values only (loaded with weights_only).
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly."""
        return {"method": self.name, "lr_scale": float(self.lr_scale)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method", self.name) != self.name:
            raise ValueError(f"checkpoint holds method state of {state.get('method')!r}, this run is {self.name!r}")
        self.lr_scale = float(state.get("lr_scale", 1.0))

    def clone(self) -> "Method":
        """An independent copy (same config and state), e.g. to check that ``prepare`` is pure."""
        return copy.deepcopy(self)


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name`` in configs."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


_BUILTIN = ("dense", "rigl", "autosparse", "polarization", "cuttlefish")


def load_plugins() -> None:
    """Import the modules named in ``$DIST_SPARSE_PLUGINS`` (comma-separated), which register methods
    of their own: a way to use a method that lives outside the package, under any launcher."""
    import importlib
    import os

    for mod in filter(None, (m.strip() for m in os.environ.get("DIST_SPARSE_PLUGINS", "").split(","))):
        importlib.import_module(mod)


def _load_builtin() -> None:
    # Importing the modules registers their classes; done lazily to keep imports cheap.
    import importlib

    for mod in _BUILTIN:
        try:
            importlib.import_module(f"dist_sparse.methods.{mod}")
        except ModuleNotFoundError as err:  # a method that is not written yet
            if err.name != f"dist_sparse.methods.{mod}":
                raise
    load_plugins()


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def method_class(name: str) -> type[Method]:
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def method_config_class(name: str) -> type[MethodConfig]:
    return method_class(name).Config


def create_method(cfg: MethodConfig, *, seed: int = 0) -> Method:
    """The method ``cfg.name`` built from its config (and the run seed)."""
    return method_class(cfg.name)(cfg, seed=seed)
