"""Physical removal of closed residual blocks and channels from a (gated) ResNet (pure surgery).

The decision is data, the same for the gated training-time model and for rebuilding an export::

    arch = {"gating": "layer" | "channel", "position": "before" | "middle" | "after",
            "blocks": {"layer1.0": [kept unit indices], ...}}

(a layer gate has the one unit 0: ``[0]`` keeps the block, ``[]`` removes it). :func:`prune_resnet`
applies it to a model whose blocks are :class:`~dist_sparse.surgery.gates.GatedBlock` (the gates are
dropped) or plain BasicBlock/Bottleneck (the registered model, for ``build_exported``). Rules, each exact
for a gated model whose gates are replaced by the constant mask (eval mode):

* a closed block (layer gate 0, or every ``after`` channel closed) becomes ``Sequential(shortcut, ReLU)``:
  the zero-padding / projection shortcut and the block's final ReLU;
* ``middle``: output filters of conv1, entries of bn1 and input channels of conv2 are removed. If every
  channel is closed, one is kept and conv2's weights are zeroed: the gated model feeds zeros into conv2,
  but the following norm still adds its shift, so the block is *not* its shortcut;
* ``after``: output filters of the last conv and entries of the last norm are removed; the norm becomes
  ``Sequential(norm, ChannelScatter(kept, C))`` so the branch is added to the shortcut at the kept
  channels only;
* ``before``: input channels of conv1 are removed and conv1 becomes ``Sequential(ChannelSelect(kept),
  conv1)``; the shortcut still reads every channel. If every input channel is closed, one channel is kept
  with zero weights (never a 0-channel conv; the branch then still adds its constant part, as the gated
  model does);
* kept blocks become plain BasicBlock/Bottleneck again. The result holds only torch modules and the two
  index modules of :mod:`dist_sparse.models.channel_index`.

Channel removal needs a per-channel norm: BatchNorm or none (GroupNorm mixes channels of a group).
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.utils import skip_init

from .. import distributed as D
from ..models.channel_index import ChannelScatter, ChannelSelect
from ..models.resnet import BasicBlock, Bottleneck, NoNorm
from .gates import GatedBlock, residual_blocks

__all__ = ["prune_resnet", "unit_param_counts", "block_param_count", "count_params", "closed_block"]


def _new_conv(old: nn.Conv2d, cin: int, cout: int) -> nn.Conv2d:
    return skip_init(nn.Conv2d, cin, cout, old.kernel_size, stride=old.stride, padding=old.padding,
                     dilation=old.dilation, groups=old.groups, bias=old.bias is not None,
                     padding_mode=old.padding_mode, device=old.weight.device, dtype=old.weight.dtype)


def _slice_conv(old: nn.Conv2d, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None) -> nn.Conv2d:
    w = old.weight.detach()
    if out_idx is not None:
        w = w.index_select(0, out_idx.to(w.device))
    if in_idx is not None:
        w = w.index_select(1, in_idx.to(w.device))
    new = _new_conv(old, w.shape[1], w.shape[0])
    with torch.no_grad():
        new.weight.copy_(w)
        if old.bias is not None:
            b = old.bias.detach()
            new.bias.copy_(b if out_idx is None else b.index_select(0, out_idx.to(b.device)))
    return new


def _slice_norm(norm: nn.Module, idx: torch.Tensor) -> nn.Module:
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        new = type(norm)(len(idx), eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                         track_running_stats=norm.track_running_stats)
        dev = (norm.weight if norm.affine else norm.running_mean).device
        new.to(dev)
        with torch.no_grad():
            if norm.affine:
                new.weight.copy_(norm.weight.detach()[idx.to(dev)])
                new.bias.copy_(norm.bias.detach()[idx.to(dev)])
            if norm.track_running_stats:
                new.running_mean.copy_(norm.running_mean[idx.to(dev)])
                new.running_var.copy_(norm.running_var[idx.to(dev)])
                new.num_batches_tracked.copy_(norm.num_batches_tracked)
        return new
    if isinstance(norm, NoNorm):
        return NoNorm(len(idx))
    if isinstance(norm, nn.Identity):
        return nn.Identity()
    raise ValueError(f"channel pruning needs BatchNorm or no norm, found {type(norm).__name__}")


def closed_block(block: nn.Module) -> nn.Module:
    """The block replaced by its shortcut followed by the block's final ReLU."""
    return nn.Sequential(block.downsample, nn.ReLU())  # not in place: the input may be the previous output


def _plain(block: nn.Module) -> nn.Module:
    """A GatedBlock turned back into the plain BasicBlock/Bottleneck (same children minus the gate)."""
    if type(block) in (BasicBlock, Bottleneck):
        return block
    cls = Bottleneck if block.bottleneck else BasicBlock
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, child in block.named_children():
        if name != "gate":
            setattr(new, name, child)
    return new


def _is_bottleneck(block: nn.Module) -> bool:
    return isinstance(block, Bottleneck) or bool(getattr(block, "bottleneck", False))


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _prune_block(block: nn.Module, gating: str, position: str, keep: list[int]) -> nn.Module:
    if gating == "layer":
        return _plain(block) if keep else closed_block(block)
    plain = _plain(block)
    bott = _is_bottleneck(plain)
    last_conv, last_norm = ("conv3", "bn3") if bott else ("conv2", "bn2")
    if position == "middle":
        idx = torch.tensor(sorted(keep) if keep else [0], dtype=torch.long)
        plain.conv1 = _slice_conv(plain.conv1, out_idx=idx)
        plain.bn1 = _slice_norm(plain.bn1, idx)
        plain.conv2 = _slice_conv(plain.conv2, in_idx=idx)
        if not keep:  # every channel closed: conv2 sees zeros; its norm's shift still reaches the sum
            with torch.no_grad():
                plain.conv2.weight.zero_()
        return plain
    if position == "after":
        if not keep:
            return closed_block(plain)
        idx = torch.tensor(sorted(keep), dtype=torch.long)
        conv = getattr(plain, last_conv)
        cout = conv.out_channels
        setattr(plain, last_conv, _slice_conv(conv, out_idx=idx))
        norm = _slice_norm(getattr(plain, last_norm), idx)
        scatter = ChannelScatter(idx, cout).to(conv.weight.device)
        setattr(plain, last_norm, nn.Sequential(norm, scatter))
        return plain
    if position == "before":
        idx = torch.tensor(sorted(keep) if keep else [0], dtype=torch.long)
        conv = _slice_conv(plain.conv1, in_idx=idx)
        if not keep:  # every input channel closed: one channel with zero weights (the gated model sees zeros)
            with torch.no_grad():
                conv.weight.zero_()
        plain.conv1 = nn.Sequential(ChannelSelect(idx).to(conv.weight.device), conv)
        return plain
    raise ValueError(f"unknown gate position {position!r}")


def prune_resnet(model: nn.Module, arch: dict[str, Any]) -> nn.Module:
    """Apply the decision ``arch`` (see the module docstring) to ``model`` in place; returns it.

    Every residual block of the model must be named in ``arch["blocks"]``; gate modules are dropped.
    """
    gating, position = arch["gating"], arch.get("position", "after")
    blocks = dict(arch["blocks"])
    present = [n for n, _ in residual_blocks(model)]
    missing = [n for n in present if n not in blocks]
    extra = [n for n in blocks if n not in present]
    if missing or extra:
        raise ValueError(f"pruning decision does not match the model (missing {missing[:3]}, unknown {extra[:3]})")
    for name in present:
        block = model.get_submodule(name)
        _set(model, name, _prune_block(block, gating, position, [int(i) for i in blocks[name]]))
    return model


# ------------------------------------------------------------------------------------------------
# Parameter counts (the pruning rate of Eq. 11 uses the same rules as the surgery)
# ------------------------------------------------------------------------------------------------


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _norm_params(norm: nn.Module) -> int:
    return sum(D.full_numel(p) for p in norm.parameters(recurse=False)) // max(1, _norm_width(norm))


def _norm_width(norm: nn.Module) -> int:
    w = getattr(norm, "num_features", None) or getattr(norm, "num_channels", None)
    return int(w) if w else 1


def block_param_count(block: nn.Module) -> int:
    """Parameters of a block's residual branch (everything but the shortcut and the gate)."""
    skip = ("downsample.", "gate.")
    return sum(D.full_numel(p) for n, p in block.named_parameters() if not n.startswith(skip))


def unit_param_counts(block: GatedBlock) -> list[int]:
    """Parameters that removing each gated unit of ``block`` deletes (one entry per gate).

    Layer gate: the whole branch. ``middle``: conv1's filter, bn1's affine pair, conv2's input slice.
    ``after``: the last conv's filter and the last norm's affine pair. ``before``: conv1's input slice.
    (A block whose units are all closed loses its whole branch; :func:`count_params` of the pruned model
    is the exact figure.)
    """
    n = block.gated_width()
    if block.gating == "layer":
        return [block_param_count(block)]
    c1 = D.full_shape(block.conv1.weight)
    if block.position == "before":
        return [int(c1[0]) * _numel(c1[2:])] * n
    if block.position == "middle":
        c2 = D.full_shape(block.conv2.weight)
        return [_numel(c1[1:]) + _norm_params(block.bn1) + int(c2[0]) * _numel(c2[2:])] * n
    conv = block.last_conv()
    norm = block.bn3 if block.bottleneck else block.bn2
    return [_numel(D.full_shape(conv.weight)[1:]) + _norm_params(norm)] * n


def count_params(model: nn.Module) -> int:
    """Parameters of ``model`` excluding gate heads (the denominator of the pruning rate)."""
    return sum(D.full_numel(p) for n, p in model.named_parameters() if ".gate." not in f".{n}")
