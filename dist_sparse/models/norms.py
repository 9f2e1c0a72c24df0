"""BatchNorm whose batch statistics span every rank (``model.sync_bn: true``).

Under DDP each rank normalizes with the mean and variance of its own slice of the global batch, so a
BatchNorm model trained on 1 and on N processes differs from the first step. With synchronized
statistics every rank normalizes with the statistics of the GLOBAL batch, and one step on N processes
equals one step on 1 process for the same global batch (up to float rounding).

On CUDA with NCCL, torch's ``nn.SyncBatchNorm`` does this. torch's version is CUDA-only, so on every
other device (CPU/gloo) :class:`GlobalBatchNorm` does it with two differentiable all-reduces
(:func:`dist_sparse.distributed.global_sum`): the global mean first, then the global mean of squared
deviations (two passes, as exact as a single-process BatchNorm). Both keep the parameter and buffer
names of ``nn.BatchNorm*d``, so checkpoints and exports load into the plain model.

Under FSDP2 and DeepSpeed with bf16/fp16 the backend hands every parameter to the forward in the low
precision, BatchNorm's affine weight and bias included, while the running statistics stay fp32 buffers.
torch's CPU kernel refuses that mix (``expected scalar type BFloat16 but found Float``); it accepts a
low-precision input with fp32 weight and statistics. :func:`norm_affine_in_stats_dtype` makes every
plain BatchNorm cast its weight and bias to the dtype of its running statistics first, the way FSDP1
keeps norm layers out of mixed precision. The cast is differentiable (the gradient reaches the
low-precision parameter), the output keeps the input's dtype, and the class names stay ``BatchNorm*d``.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import distributed as D

__all__ = ["GlobalBatchNorm", "convert_sync_batchnorm", "norm_affine_in_stats_dtype"]


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (any number of spatial dims) with statistics over the batch of all ranks."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and D.world_size() > 1):
            return super().forward(x)  # one process or eval: exactly torch's BatchNorm
        self._check_input_dim(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.tensor([float(xf.numel() // xf.shape[1])], device=x.device)
        n = D.global_sum(count.detach())
        mean = D.global_sum(xf.sum(dims)) / n
        centred = xf - mean.view(shape)
        var = D.global_sum(centred.square().sum(dims)) / n  # biased, as BatchNorm normalizes
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1).clamp(min=1))
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach().to(self.running_var.dtype), alpha=m)
        return out.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, use_torch: bool | None = None) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` of ``model`` by a synchronized one (weights and buffers
    kept). ``use_torch`` (default: CUDA and NCCL available) picks torch's ``nn.SyncBatchNorm``."""
    if use_torch is None:
        use_torch = torch.cuda.is_available() and torch.distributed.is_nccl_available()
    if use_torch:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert(model)


def _convert(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        ref = next(iter(module.state_dict().values()), None)
        if ref is not None:
            new = new.to(device=ref.device)
        new.load_state_dict(module.state_dict())
        if module.affine:
            new = new.to(dtype=module.weight.dtype)
        new.train(module.training)
        return new
    for name, child in list(module.named_children()):
        setattr(module, name, _convert(child))
    return module


class _AffineInStatsDtype:
    """Mixin over ``nn.BatchNorm*d``: weight and bias are cast to the running statistics' dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = self.running_mean
        if self.weight is None or stats is None or self.weight.dtype == stats.dtype:
            return super().forward(x)
        self._check_input_dim(x)
        tracking = self.training and self.track_running_stats
        factor = 0.0 if self.momentum is None else self.momentum
        if tracking and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative average, as torch's BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        pass_stats = not self.training or self.track_running_stats
        return torch.nn.functional.batch_norm(
            x, self.running_mean if pass_stats else None, self.running_var if pass_stats else None,
            self.weight.to(stats.dtype), None if self.bias is None else self.bias.to(stats.dtype),
            use_batch, factor, self.eps)


class BatchNorm1d(_AffineInStatsDtype, nn.BatchNorm1d):
    pass


class BatchNorm2d(_AffineInStatsDtype, nn.BatchNorm2d):
    pass


class BatchNorm3d(_AffineInStatsDtype, nn.BatchNorm3d):
    pass


_AFFINE_IN_STATS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def norm_affine_in_stats_dtype(model: nn.Module) -> int:
    """Make every plain ``nn.BatchNorm1d/2d/3d`` of ``model`` compute with its weight and bias in the dtype
    of its running statistics (in place: the same module objects, parameters and buffers, so an optimizer
    built over them stays valid). Returns how many modules were changed."""
    changed = 0
    for module in model.modules():
        new_cls = _AFFINE_IN_STATS.get(type(module))
        if new_cls is not None:
            module.__class__ = new_cls
            changed += 1
    return changed
