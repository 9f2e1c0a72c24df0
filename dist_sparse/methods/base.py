"""The Method protocol: what every sparse / low-rank training method implements.

A method is *model surgery* plus a *controller* that the trainer calls at fixed points of the loop.
The trainer never asks which method it runs; a method never asks which backend it runs under (it
goes through :mod:`dist_sparse.distributed` for every statistic that spans ranks or shards).

Hook order inside one optimizer step (see ``dist_sparse/train.py``)::

    model = method.prepare(model)                      # once, before accelerator.prepare
    method.bind(model, optimizer)                      # after accelerator.prepare (and after a rebuild)
    loss = task_loss + method.regularizer(model)       # every micro-batch
    accelerator.backward(loss)
    method.after_backward(model, step)                 # once per optimizer step, grads are synced
    optimizer.step(); scheduler.step()
    method.after_step(model, step)                     # re-apply masks, update thresholds
    method.on_epoch_end(model, epoch) -> Rebuild|None  # architecture change requests

``step`` is the index of the optimizer step being taken (0-based); ``total_steps`` is the number of
optimizer steps of the whole run, so schedules count optimizer steps, not micro-batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

__all__ = ["Method", "MethodConfig", "Rebuild", "register_method", "create_method", "method_names",
           "method_config_class"]


@dataclass
class MethodConfig:
    """Settings shared by every method; each method subclasses this with its own fields."""

    name: str = "dense"  # which method: one of the registered names (dense, rigl, ...)


@dataclass
class Rebuild:
    """Returned by :meth:`Method.on_epoch_end` when the architecture changed.

    The trainer gathers the full weights into a plain copy of the current architecture (built with
    ``prepare`` from the method's current state), calls ``surgery(plain_model)`` on rank 0 (a pure
    function returning the new plain ``nn.Module``), then calls ``commit()`` on every rank (the
    method switches its state so that ``prepare`` now builds the new architecture), builds the new
    architecture, loads rank 0's new weights into it (strict), and re-creates and re-prepares the
    optimizer and scheduler under the same backend. ``reason`` is logged and kept in checkpoints.
    """

    surgery: Callable[[nn.Module], nn.Module]
    commit: Callable[[], None] | None = None
    reason: str = ""


class Method:
    """Base class: the dense baseline behaviour for every hook.

    Args:
        cfg: the method's config dataclass (validated by ``dist_sparse.config``).
        total_steps: optimizer steps of the whole run.
        steps_per_epoch: optimizer steps of one epoch.
        seed: run seed; random choices use ``torch.Generator`` seeded from (seed, step).
    """

    name: ClassVar[str] = "base"
    Config: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, cfg: MethodConfig, *, total_steps: int, steps_per_epoch: int, seed: int = 0):
        self.cfg = cfg
        self.total_steps = int(total_steps)
        self.steps_per_epoch = int(steps_per_epoch)
        self.seed = int(seed)
        self.optimizer: torch.optim.Optimizer | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        """Surgery before the backend wraps the model (masks, gates, reparametrizations)."""
        return model

    def param_group_overrides(self, model: nn.Module) -> dict[str, dict[str, Any]]:
        """Optimizer options per parameter name (e.g. ``{"x.threshold": {"weight_decay": 0.0}}``).

        Called on the prepared (surgered) plain model before the optimizer is built.
        """
        return {}

    def bind(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called after ``accelerator.prepare`` (and again after every rebuild).

        ``model`` is the unwrapped module (its parameters may be sharded DTensors or ZeRO
        partitions); ``optimizer`` is the prepared optimizer whose state a method may reset.
        """
        self.optimizer = optimizer

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to the loss of every micro-batch, or None."""
        return None

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Gradients of this optimizer step are complete (accumulated, averaged across ranks)."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """The optimizer has stepped; re-apply masks, update schedules."""

    def on_epoch_end(self, model: nn.Module, epoch: int) -> Rebuild | None:
        """End of an epoch; may ask the trainer to rebuild the architecture."""
        return None

    def report(self) -> dict[str, Any]:
        """Numbers for the metrics log (flat dict of floats/ints/strings)."""
        return {}

    def plot(self, run_dir: str) -> list[str]:
        """Write figures (per-layer sparsity, rank over time, ...) into ``run_dir``; return paths."""
        return []

    # -- checkpointing ------------------------------------------------------------------------
    # Contract: on resume the trainer calls ``load_state_dict`` on a fresh method BEFORE ``prepare``,
    # so ``prepare`` must build the architecture that the state describes (masks, gates, low-rank
    # layers after a switch). The same contract serves ``Rebuild``: after ``on_epoch_end`` returns a
    # Rebuild, ``prepare(create_model(...))`` must build the post-surgery architecture.
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: tensors on the CPU, plain Python values."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


_REGISTRY: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name`` in configs."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin() -> None:
    # Importing the modules registers their classes; done lazily to keep imports cheap.
    import importlib

    for mod in ("dense", "rigl", "autosparse", "polarization", "cuttlefish"):
        try:
            importlib.import_module(f"dist_sparse.methods.{mod}")
        except ModuleNotFoundError as err:  # a method that is not written yet
            if err.name != f"dist_sparse.methods.{mod}":
                raise


def method_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def method_config_class(name: str) -> type[MethodConfig]:
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(name)
    return _REGISTRY[name].Config


def create_method(cfg: MethodConfig, **kw: Any) -> Method:
    _load_builtin()
    if cfg.name not in _REGISTRY:
        raise KeyError(f"unknown method {cfg.name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[cfg.name](cfg, **kw)
