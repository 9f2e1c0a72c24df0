"""The step order of every training loop, in one place.

``dist_sparse.train`` (our trainer), ``benchmarks/`` and the coming Hugging Face callback all drive a
:class:`~dist_sparse.methods.base.Method` through this module, so the order in which its hooks run is
written once::

    per micro-batch   loss = task_loss + method.regularizer(model)         (under autocast)
                      backward
    last micro-batch  method.after_backward(model, step)                   complete, averaged,
                                                                           unscaled (fp16) grads
                      clip the gradient norm
                      optimizer.step(); optimizer.zero_grad()
                      if the step was applied (not an fp16 overflow):
                          lr schedule step;  method.after_step(model, step)
                          ema.update(model, step)                          (weight EMA, if any)
                      step += 1
    epoch end         method.on_epoch_end(model, epoch, metrics) -> Rebuild | None
    training end      method.on_train_end(model) -> Rebuild | None
    rebuild           run_surgery(): full fp32 weights -> rank 0's surgery -> broadcast -> commit

The driver works with an ``accelerate.Accelerator`` (every backend) or, for a plain single-process loop,
with :class:`PlainLoop`, which offers the few accelerator calls the driver makes.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from . import distributed as D
from .backend import backward, clip_grad_norm_, step_was_skipped
from .errors import RunError
from .methods.base import Method, Rebuild

__all__ = ["Driver", "PlainLoop", "StepResult", "run_surgery"]

log = logging.getLogger("dist_sparse")


class PlainLoop:
    """The accelerator calls the driver makes, for a plain torch loop in one process.

    Args:
        grad_accum_steps: micro-batches per optimizer step (the loss is divided by it).
        autocast_dtype: None, or a dtype for ``torch.autocast`` on ``device``.
        device: where the model runs.
    """

    def __init__(self, grad_accum_steps: int = 1, autocast_dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu"):
        self.grad_accum_steps = int(grad_accum_steps)
        self.autocast_dtype = autocast_dtype
        self.device = torch.device(device)
        self.num_processes, self.process_index, self.is_main_process = 1, 0, True
        self.sync_gradients = True
        self._micro = 0

    @contextlib.contextmanager
    def accumulate(self, model: nn.Module):
        self._micro += 1
        self.sync_gradients = self._micro % self.grad_accum_steps == 0
        yield

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum_steps).backward()

    def clip_grad_norm_(self, parameters, max_norm: float):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def unwrap_model(self, model: nn.Module) -> nn.Module:
        return model


@dataclass
class StepResult:
    loss: torch.Tensor  # the task loss of this micro-batch (detached, without the regularizer)
    synced: bool  # this micro-batch completed an optimizer step
    applied: bool  # ... and the optimizer really stepped (False for an fp16-overflow skip)


class Driver:
    """Runs the method's hooks around forward, backward and the optimizer step.

    Args:
        method: the method (already ``setup``).
        accelerator: an ``accelerate.Accelerator`` or a :class:`PlainLoop`.
        loss_fn: ``loss_fn(model, batch) -> loss`` (the task loss of one micro-batch).
        grad_clip: clip the global gradient norm to this (0: off). Under DeepSpeed the engine clips.
        step: the optimizer step to start from (a resumed run).
        ema: a :class:`~dist_sparse.ema.WeightEMA` to update after every applied step (after the
            method's ``after_step``, so it averages the masked weights), or None.
    """

    def __init__(self, method: Method, accelerator: Any, loss_fn: Callable[[nn.Module, Any], torch.Tensor], *,
                 grad_clip: float = 0.0, step: int = 0, ema: Any = None):
        self.method, self.acc, self.loss_fn = method, accelerator, loss_fn
        self.grad_clip = float(grad_clip)
        self.step = int(step)
        self.skipped_steps = 0
        self.ema = ema
        self.model: nn.Module | None = None
        self.optimizer: Any = None
        self.scheduler: Any = None

    def attach(self, model: nn.Module, optimizer: Any, scheduler: Any = None) -> None:
        """Use these (prepared) objects from now on and bind the method to them (first time and after
        every rebuild)."""
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.method.bind(self.unwrapped, optimizer)

    @property
    def unwrapped(self) -> nn.Module:
        return self.acc.unwrap_model(self.model)

    # -- one micro-batch ---------------------------------------------------------------------------
    def micro_step(self, batch: Any) -> StepResult:
        """Forward and backward of one micro-batch; on the last of an accumulation, the optimizer step."""
        acc, model, method = self.acc, self.model, self.method
        with acc.accumulate(model):
            with acc.autocast():
                loss = self.loss_fn(model, batch)
                reg = method.regularizer(self.unwrapped)
                total = loss if reg is None else loss + reg
            backward(acc, total, self._on_grads)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        synced = bool(acc.sync_gradients)
        if not synced:
            return StepResult(loss.detach(), False, False)
        applied = not step_was_skipped(acc, self.optimizer)
        if applied:
            if self.scheduler is not None:
                self.scheduler.step()
            method.after_step(self.unwrapped, self.step)
            if self.ema is not None:
                self.ema.update(self.unwrapped, self.step)
        else:
            self.skipped_steps += 1
            log.debug("optimizer step %d skipped (gradient overflow): schedule and method wait", self.step)
        self.step += 1
        return StepResult(loss.detach(), True, applied)

    def _on_grads(self) -> None:
        self.method.after_backward(self.unwrapped, self.step)
        if self.grad_clip > 0:
            clip_grad_norm_(self.acc, self.model.parameters(), self.grad_clip)

    # -- boundaries --------------------------------------------------------------------------------
    def end_epoch(self, epoch: int, metrics: dict[str, Any]) -> Rebuild | None:
        return self.method.on_epoch_end(self.unwrapped, epoch, metrics)

    def end_train(self) -> Rebuild | None:
        return self.method.on_train_end(self.unwrapped)


def run_surgery(model: nn.Module, req: Rebuild, build_plain: Callable[[], nn.Module]) -> dict[str, torch.Tensor]:
    """The collective part of a rebuild; returns the new architecture's full state dict on every rank.

    Every rank gathers the full weights of ``model`` (the unwrapped, possibly sharded module; fp32
    master weights under DeepSpeed). Rank 0 loads them into ``build_plain()`` (a plain copy of the
    current architecture), applies ``req.surgery`` and broadcasts the new state dict; then every rank
    runs ``req.commit``. An exception in the surgery stops every rank with the same one-line
    :class:`~dist_sparse.errors.RunError` (never a hang).
    """
    full = D.full_state_dict(model, fp32_master=True)
    payload: tuple[str, Any] | None = None
    if D.is_main():
        try:
            old = build_plain()
            old.load_state_dict(full, strict=True)
            new = req.surgery(old)
            if not isinstance(new, nn.Module):
                raise TypeError(f"the surgery returned {type(new).__name__}, not an nn.Module")
            payload = ("ok", {k: v.detach().cpu().contiguous() for k, v in new.state_dict().items()})
        except Exception as err:  # reported on every rank below
            payload = ("error", f"{type(err).__name__}: {err}".splitlines()[0])
    del full
    payload = D.broadcast_object(payload, src=0)
    if payload[0] == "error":
        raise RunError(f"rebuild ({req.reason or 'surgery'}) failed on rank 0: {payload[1]}")
    if req.commit is not None:
        req.commit()
    return payload[1]
