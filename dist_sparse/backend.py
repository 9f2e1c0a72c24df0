"""One Accelerator for every backend chosen by ``accelerate launch --config_file launch/<backend>.yaml``.

The launch config decides the backend (DDP, FSDP2, DeepSpeed ZeRO-1/2/3, or one process); this
module only repairs what accelerate 1.x does not do by itself on a machine without CUDA, and leaves
the CUDA/NCCL path exactly as accelerate builds it:

* DeepSpeed on CPU needs the gloo backend passed explicitly (otherwise accelerate sees one process
  and DeepSpeed fails its batch-size check). On CUDA nothing is passed (NCCL).
* FSDP on CPU: accelerate's state is MULTI_CPU and silently ignores the FSDP plugin (you would get
  DDP). We install the plugin and switch the distributed type to FSDP after the Accelerator exists.
  ``sync_module_states`` needs a CUDA device, so it is turned off on CPU. On CUDA nothing is patched.
* DeepSpeed without a prepared dataloader (the trainer builds rank-aware loaders itself) needs the
  micro-batch size and the gradient-accumulation steps written into the DeepSpeed config.

``reprepare`` puts a new model and optimizer (after a rebuild) through ``accelerator.prepare`` on the
same Accelerator, releasing the old engine the way each backend needs (see docs/distributed.md).

Example::

    acc = build_accelerator("no", grad_accum_steps=1, per_rank_batch=64)
    model, opt = reprepare(acc, model, opt)          # first prepare and every rebuild
    print(backend_name(acc))                         # "ddp", "fsdp2", "zero3", ...
"""
from __future__ import annotations

import gc
import logging
import os
from typing import Any

import torch

__all__ = ["build_accelerator", "backend_name", "reprepare", "backward", "launched_backend", "launched_world_size",
           "resolve_mixed_precision", "input_dtype",
           "fit_fsdp_wrap_classes", "step_was_skipped", "clip_grad_norm_", "engine_settings"]

log = logging.getLogger("dist_sparse")


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def launched_backend() -> str:
    """What the launcher asked for, from the environment ``accelerate launch`` exports.

    Returns:
        "deepspeed", "fsdp" or "ddp" (the latter also for plain torchrun and a single process).
    """
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp"


def launched_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``), known before any process group
    exists (the DeepSpeed micro-batch must be computed from it before the engine is built)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _on_cuda() -> bool:
    return torch.cuda.is_available() and not _flag("ACCELERATE_USE_CPU")


def fast_bf16() -> bool:
    """True where bf16 matrix work is fast: a CUDA GPU with bf16, or a CPU with AVX512-BF16 / AMX."""
    if _on_cuda():
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_mixed_precision(requested: str) -> str:
    """``run.mixed_precision`` as the run will use it: "no", "bf16" or "fp16".

    ``auto`` becomes bf16 where :func:`fast_bf16`, else no. fp16 needs CUDA (on a CPU accelerate would
    silently train in fp32, and DeepSpeed's fp16 path has no CPU kernels): refused with a ConfigError.
    """
    from .errors import ConfigError

    if requested == "auto":
        return "bf16" if fast_bf16() else "no"
    if requested == "fp16" and not _on_cuda():
        raise ConfigError("run.mixed_precision", "fp16",
                          "bf16, auto or no on a machine without CUDA (fp16 autocast and loss scaling need a GPU)")
    return requested


def input_dtype(accelerator: Any) -> torch.dtype | None:
    """The dtype floating-point model inputs must have: the DeepSpeed engine holds the model in
    bf16/fp16 itself (no autocast), so images must be cast to it; None for every other backend."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(accelerator.mixed_precision))


def build_accelerator(mixed_precision: str, grad_accum_steps: int, per_rank_batch: int | None = None,
                      grad_clip: float | None = None):
    """Build the Accelerator for whatever backend the launch config selected.

    Args:
        mixed_precision: "no", "bf16" or "fp16" (the run config's ``run.mixed_precision``).
        grad_accum_steps: micro-batches per optimizer step (``optim.grad_accum_steps``); it wins over
            a value in the DeepSpeed config.
        per_rank_batch: micro-batch size of one process. Needed by DeepSpeed when no dataloader goes
            through ``prepare``; written to ``train_micro_batch_size_per_gpu``.
        grad_clip: under DeepSpeed, clipping happens inside the engine (``accelerator.clip_grad_norm_``
            only reports the norm): the value (0 = off) is written to the DeepSpeed config's
            ``gradient_clipping``. None keeps a value set in the config, and turns "auto" into 0 (off).

    Returns:
        an ``accelerate.Accelerator``; ``backend_name(acc)`` names the backend it runs.

    Raises:
        RuntimeError: for a launch environment that would silently run the wrong backend.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    want = launched_backend()
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    handlers = []
    # accelerate reads the accumulation steps from this variable before the argument (and the
    # DeepSpeed launcher sets it from the YAML); the run config is the one source of truth.
    os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] = str(int(grad_accum_steps))
    if want == "deepspeed":
        if _flag("ACCELERATE_USE_CPU"):
            raise RuntimeError("DeepSpeed was launched with ACCELERATE_USE_CPU=true, which makes accelerate drop "
                               "DeepSpeed silently; unset it (launch/run.sh does) - DeepSpeed picks the CPU itself")
        if not torch.cuda.is_available():
            handlers.append(InitProcessGroupKwargs(backend="gloo"))  # without it accelerate sees 1 process
    if want == "fsdp" and not _on_cuda():
        # sync_module_states broadcasts through a CUDA/XPU device; on CPU it raises at prepare time
        os.environ["FSDP_SYNC_MODULE_STATES"] = "false"
    acc = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=int(grad_accum_steps),
                      kwargs_handlers=handlers)
    if want == "fsdp" and not _on_cuda() and multi:
        _force_fsdp_on_cpu(acc, mixed_precision)
    if want == "deepspeed":
        plugin = acc.state.deepspeed_plugin
        cfg = plugin.deepspeed_config
        if per_rank_batch is not None:
            cfg["train_micro_batch_size_per_gpu"] = int(per_rank_batch)
            cfg["train_batch_size"] = int(per_rank_batch) * int(grad_accum_steps) * acc.num_processes
        cfg["gradient_accumulation_steps"] = int(grad_accum_steps)
        if grad_clip is not None:
            cfg["gradient_clipping"] = float(grad_clip)  # 0 = off, as for DDP/FSDP
        elif cfg.get("gradient_clipping", "auto") == "auto":
            cfg["gradient_clipping"] = 0.0  # accelerate would fill "auto" with 1.0: silent clipping
    if multi and acc.num_processes == 1:
        raise RuntimeError(
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} but accelerate set up 1 process "
            f"(distributed_type={acc.distributed_type}); on a machine without CUDA launch DDP/FSDP with "
            "ACCELERATE_USE_CPU=true and DeepSpeed without it - launch/run.sh does this")
    return acc


def _force_fsdp_on_cpu(acc: Any, mixed_precision: str) -> None:
    """Make a MULTI_CPU accelerator use the FSDP plugin described by the FSDP_* environment."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if acc.distributed_type == DistributedType.FSDP:
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables exported by the launcher
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    acc.state.fsdp_plugin = plugin
    acc.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    log.debug("FSDP forced on CPU (accelerate keeps MULTI_CPU otherwise): version %s", plugin.fsdp_version)


def backend_name(accelerator: Any) -> str:
    """Short name of the running backend.

    Args:
        accelerator: the Accelerator from :func:`build_accelerator`.

    Returns:
        "single", "ddp", "fsdp2", "fsdp1", "zero1", "zero2" or "zero3".
    """
    from accelerate.utils import DistributedType

    dt = accelerator.distributed_type
    if dt == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        return f"zero{int(stage)}"
    if dt == DistributedType.FSDP:
        return "fsdp2" if int(getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)) == 2 else "fsdp1"
    if accelerator.num_processes <= 1:
        return "single"
    return "ddp"


def fit_fsdp_wrap_classes(accelerator: Any, model: torch.nn.Module) -> list[str] | None:
    """Keep only the FSDP wrap classes that exist in ``model``.

    ``launch/fsdp.yaml`` lists the block classes of every model family (BasicBlock, Bottleneck, Block,
    EncoderLayer, DecoderLayer); accelerate raises for a listed class the model does not contain.

    Args:
        accelerator: the Accelerator (no-op unless it runs FSDP with transformer-based wrapping).
        model: the plain model about to be prepared.

    Returns:
        the class names kept, or None when nothing was changed.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    plugin = accelerator.state.fsdp_plugin
    names = getattr(plugin, "transformer_cls_names_to_wrap", None)
    if not names:
        return None
    present = {type(m).__name__ for m in model.modules()}
    kept = [n for n in names if n in present]
    if kept != list(names):
        log.debug("FSDP wraps %s (listed but absent: %s)", kept, [n for n in names if n not in present])
    plugin.transformer_cls_names_to_wrap = kept
    return kept


def _release(accelerator: Any) -> None:
    """Forget the previously prepared model/optimizer/scheduler; destroy a DeepSpeed engine."""
    engine = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if engine is not None:
        # accelerate only wires a new engine when this is None: keeping the old one makes
        # accelerator.backward() drive the OLD engine (ZeRO-2 crashes, ZeRO-3 silently stops training)
        engine.engine.destroy()
        accelerator.deepspeed_engine_wrapped = None
    # clear, not free_memory(): free_memory also drops tracked dataloaders and resets accelerator.step
    accelerator._models.clear()
    accelerator._optimizers.clear()
    accelerator._schedulers.clear()
    gc.collect()


def reprepare(accelerator: Any, new_model: torch.nn.Module, new_optimizer: torch.optim.Optimizer,
              new_scheduler: Any = None):
    """Prepare a (new) model and optimizer, releasing whatever this Accelerator prepared before.

    Used for the first prepare and after every rebuild. Model and optimizer go through one
    ``prepare`` call (FSDP2 needs both). Every rank must pass bit-identical weights: DDP and DeepSpeed
    overwrite with rank 0's, but FSDP2 keeps each rank's own shard (broadcast first, see
    ``distributed.broadcast_object``). Under ZeRO-3 deepspeed 0.19 keeps about one rank's parameter +
    optimizer partition alive per rebuild; checkpoint and relaunch after many rebuilds.

    Args:
        accelerator: the Accelerator from :func:`build_accelerator`.
        new_model: a plain ``nn.Module`` (not yet wrapped).
        new_optimizer: an optimizer over ``new_model``'s parameters.
        new_scheduler: optional LR scheduler over ``new_optimizer``.

    Returns:
        ``(model, optimizer)`` or, when a scheduler is given, ``(model, optimizer, scheduler)``, all prepared.
    """
    from accelerate.utils import DistributedType

    _release(accelerator)
    if accelerator.distributed_type == DistributedType.FSDP:
        fit_fsdp_wrap_classes(accelerator, new_model)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # FSDP2 and DeepSpeed flatten/shard only contiguous parameters; channels_last conv weights are
        # not. The Parameter objects stay the same (the optimizer keeps pointing at them); the
        # activations may stay channels_last.
        with torch.no_grad():
            for p in new_model.parameters():
                if not p.is_contiguous():
                    p.data = p.data.contiguous()
        if str(accelerator.mixed_precision) in ("bf16", "fp16"):
            # both hand BatchNorm its weight in bf16/fp16 beside fp32 running statistics, a mix torch's
            # CPU kernel refuses in the first forward: the norms compute with fp32 weight and bias
            from .models.norms import norm_affine_in_stats_dtype

            norm_affine_in_stats_dtype(new_model)
    objs = [new_model, new_optimizer] + ([new_scheduler] if new_scheduler is not None else [])
    out = accelerator.prepare(*objs)
    return tuple(out)


def backward(accelerator: Any, loss: torch.Tensor, on_grads: Any = None) -> None:
    """``accelerator.backward(loss)`` that lets ``on_grads()`` see the complete gradients.

    Under DeepSpeed, ``accelerator.backward`` also runs the engine's optimizer step and zeroes the
    gradients, so a hook called after it sees nothing. Here the DeepSpeed engine runs backward, then
    ``on_grads()``, then its step. Other backends: ``accelerator.backward`` then ``on_grads()``.
    ``on_grads`` runs only on the micro-step that completes the accumulation (``sync_gradients``);
    read gradients there through ``distributed.full_grad`` (ZeRO keeps them in the optimizer).
    Under fp16 with torch's gradient scaler the gradients are unscaled before ``on_grads()`` (clip
    them afterwards with :func:`clip_grad_norm_`, which does not unscale a second time); DeepSpeed
    keeps its fp16 gradients scaled until its step, and ``distributed.full_grad``/``add_grad_``
    convert at the boundary.

    Args:
        accelerator: the Accelerator.
        loss: the micro-batch loss (not yet divided by the accumulation steps).
        on_grads: optional callable with no arguments.
    """
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is None:
        accelerator.backward(loss)
        if on_grads is not None and accelerator.sync_gradients:
            if _loss_scaled(accelerator):  # fp16: hooks see the true gradients, not loss-scaled ones
                accelerator.unscale_gradients()
            on_grads()
        return
    engine = wrapped.engine
    sync = accelerator.sync_gradients
    engine.set_gradient_accumulation_boundary(is_boundary=sync)
    engine.backward(loss)  # DeepSpeed scales by its accumulation steps itself
    if sync:
        if on_grads is not None:
            on_grads()
        engine.step()


def engine_settings(accelerator: Any) -> dict[str, Any] | None:
    """What the DeepSpeed engine really runs with (read back from the engine, not from our config),
    or None under any other backend. Written to the run's ``start`` metrics row."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is None:
        return None
    e = wrapped.engine
    return {"zero_stage": int(e.zero_optimization_stage()),
            "train_micro_batch_size_per_gpu": int(e.train_micro_batch_size_per_gpu()),
            "gradient_accumulation_steps": int(e.gradient_accumulation_steps()),
            "train_batch_size": int(e.train_batch_size()), "gradient_clipping": float(e.gradient_clipping()),
            "dtype": str(e.get_data_types()[0]).replace("torch.", "")}


def _loss_scaled(accelerator: Any) -> bool:
    """True when torch's fp16 gradient scaler multiplies this run's loss (accelerate's native AMP)."""
    return (bool(getattr(accelerator, "native_amp", False)) and str(getattr(accelerator, "mixed_precision", "no")) == "fp16"
            and getattr(accelerator, "scaler", None) is not None)


def clip_grad_norm_(accelerator: Any, parameters: Any, max_norm: float) -> Any:
    """``accelerator.clip_grad_norm_`` after :func:`backward` has already unscaled fp16 gradients.

    accelerate's clip unscales the gradients itself, and torch's gradient scaler refuses a second
    unscale in one step; here that inner unscale is skipped for this one call.

    Args:
        accelerator: the Accelerator (or a plain loop object).
        parameters: the parameters whose gradient norm to clip.
        max_norm: the largest global L2 norm.

    Returns:
        the total norm before clipping (what accelerate returns).
    """
    if not _loss_scaled(accelerator):
        return accelerator.clip_grad_norm_(parameters, max_norm)
    accelerator.unscale_gradients = lambda optimizer=None: None  # an instance attribute shadows the method
    try:
        return accelerator.clip_grad_norm_(parameters, max_norm)
    finally:
        del accelerator.unscale_gradients


def step_was_skipped(accelerator: Any, optimizer: Any) -> bool:
    """True when the optimizer step just taken was skipped (fp16 gradient overflow).

    accelerate's optimizer wrappers report it for torch's GradScaler and for DeepSpeed's loss scaler;
    a plain torch optimizer never skips.

    Args:
        accelerator: the Accelerator (or a plain loop object).
        optimizer: the (prepared) optimizer that was stepped.
    """
    try:
        return bool(getattr(optimizer, "step_was_skipped", False))
    except Exception:  # a DeepSpeed optimizer without an overflow flag (bf16/fp32): never skips
        return False
