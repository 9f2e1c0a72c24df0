"""Input-dependent binary gates for ResNet blocks (pure surgery, no training logic).

Used by the polarization method (Zhi et al., "Learning a Consensus Sub-Network with Polarization
Regularization and One Pass Training", arXiv 2302.10798). Every gate is a tiny head on the block input:
global average pooling over H x W, then one (``1fc``) or two (``2fc``: Linear -> ReLU -> Linear) dense
layers, then a straight-through estimator (STE). The STE's forward is a hard step (1 if z > 0 else 0);
its backward passes the gradient unchanged where |z| <= 1 and blocks it elsewhere.

Granularities (``gating``):

* ``layer``: one scalar gate per residual block; block output = ReLU(shortcut(x) + g * branch(x)).
* ``channel``: one gate per channel, at ``position``

  - ``before``: the channels entering the first conv (the shortcut still sees all of them);
  - ``middle``: the output of the first conv after its norm and ReLU;
  - ``after``: the output of the last norm of the branch, before the residual addition.

Gates multiply tensors after normalization, so a closed unit contributes exactly zero and can be removed
physically (:mod:`dist_sparse.surgery.channels`). Every gate head reads the block input (our choice: the
gate of a block is computed before any of its convs). Gate heads run in fp32 with autocast off.

During training every branch is computed for every sample and multiplied by its 0/1 gate (no skipping),
so the task-loss gradient reaches closed gates too and every parameter gets a gradient (DDP-safe).

:func:`insert_gates` is pure: it deep-copies nothing it does not replace, draws the gate weights from a
generator seeded by ``(seed, block index)`` and leaves the global RNG untouched.
"""
from __future__ import annotations

from typing import Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..models.resnet import BasicBlock, Bottleneck

__all__ = ["STE", "ste", "GateHead", "GatedBlock", "gated_width", "insert_gates", "gated_blocks", "residual_blocks",
           "gate_param_count", "set_static_masks"]

Gating = Literal["layer", "channel"]
Position = Literal["before", "middle", "after"]


class STE(torch.autograd.Function):
    """Straight-through step: forward 1[z > 0]; backward the incoming gradient where |z| <= 1, else 0."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(z)
        return (z > 0).to(z.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (z,) = ctx.saved_tensors
        return grad * (z.abs() <= 1).to(grad.dtype)


def ste(z: torch.Tensor) -> torch.Tensor:
    """Hard 0/1 gate of logits ``z`` with the straight-through gradient (see :class:`STE`)."""
    return STE.apply(z)


class GateHead(nn.Module):
    """GAP -> 1 or 2 dense layers -> logits (B, n_out); the gate is ``ste(logits)``.

    Args:
        cin: channels of the feature map read by the gate.
        n_out: gates produced (1 for a block gate, the channel count for channel gates).
        depth: 1 (``1fc``: Linear(cin, n_out)) or 2 (``2fc``: Linear(cin, hidden) -> ReLU -> Linear(hidden, n_out)).
        hidden: width d of the 2fc head.
        init_bias: initial bias of the last layer (> 0: every gate starts open).
        init_std: std of the normal init of the dense weights (small: logits start inside |z| <= 1).
        generator: the source of the initial weights (the global RNG is not used).
    """

    def __init__(self, cin: int, n_out: int, depth: int = 2, hidden: int = 16, init_bias: float = 0.5,
                 init_std: float = 0.01, generator: Optional[torch.Generator] = None):
        super().__init__()
        if depth not in (1, 2):
            raise ValueError(f"gate depth must be 1 or 2, got {depth}")
        self.depth = depth
        dims = [cin, n_out] if depth == 1 else [cin, hidden, n_out]
        self.fc1 = nn.utils.skip_init(nn.Linear, dims[0], dims[1])
        self.fc2 = nn.utils.skip_init(nn.Linear, dims[1], dims[2]) if depth == 2 else None
        with torch.no_grad():
            for fc in (self.fc1, self.fc2):
                if fc is None:
                    continue
                fc.weight.copy_(torch.randn(fc.weight.shape, generator=generator) * init_std)
                fc.bias.zero_()
            (self.fc2 if depth == 2 else self.fc1).bias.fill_(init_bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = x.float().mean(dim=(2, 3)) if x.dim() == 4 else x.float()
            h = F.linear(h, self.fc1.weight.float(), self.fc1.bias.float())
            if self.fc2 is not None:
                h = F.linear(F.relu(h), self.fc2.weight.float(), self.fc2.bias.float())
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Hard gates (B, n_out) in fp32 (0 or 1) with the STE gradient."""
        return ste(self.logits(x))


def gated_width(block: nn.Module, gating: str, position: str) -> int:
    """Number of gates on a BasicBlock/Bottleneck (plain or gated): 1 for layer gating; for channel gating
    the width of the gated tensor: the block input (``before``), the first conv's output (``middle``) or
    the last conv's output (``after``)."""
    if gating == "layer":
        return 1
    if position == "before":
        return block.conv1.in_channels
    if position == "middle":
        return block.conv1.out_channels
    return (block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels


class GatedBlock(nn.Module):
    """A BasicBlock or Bottleneck with a gate head; same child names as the block plus ``gate``.

    Args:
        block: the block whose children (convs, norms, relu, downsample) are taken over.
        gating: "layer" or "channel".
        position: for channel gates, "before", "middle" or "after".
        gate: the head; its ``n_out`` must match the gated tensor.

    After a forward, ``last_gates`` holds the (B, n) gates of that forward (cleared by their reader).
    ``static_mask`` (a (n,) 0/1 tensor or None) replaces the input-dependent gates by a constant mask:
    the "consensus" model that physical pruning must reproduce exactly.
    """

    def __init__(self, block: nn.Module, gating: Gating, position: Position, gate: GateHead):
        super().__init__()
        if type(block) not in (BasicBlock, Bottleneck):
            raise TypeError(f"cannot gate a {type(block).__name__}")
        self.bottleneck = isinstance(block, Bottleneck)
        self.gating, self.position = gating, position
        for name, child in block.named_children():
            setattr(self, name, child)
        self.gate = gate
        self.last_gates: Optional[torch.Tensor] = None
        self.static_mask: Optional[torch.Tensor] = None

    # -- the branch --------------------------------------------------------------------------------
    def gated_width(self) -> int:
        """Number of gates of this block."""
        return gated_width(self, self.gating, self.position)

    def last_conv(self) -> nn.Conv2d:
        return self.conv3 if self.bottleneck else self.conv2

    def _gates(self, x: torch.Tensor) -> torch.Tensor:
        if self.static_mask is not None:
            g = self.static_mask.to(device=x.device, dtype=torch.float32).reshape(1, -1).expand(x.shape[0], -1)
        else:
            g = self.gate(x)
        self.last_gates = g
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self._gates(x)
        identity = self.downsample(x)
        gm = g.to(x.dtype)[:, :, None, None]
        h = x * gm if (self.gating == "channel" and self.position == "before") else x
        out = self.relu(self.bn1(self.conv1(h)))
        if self.gating == "channel" and self.position == "middle":
            out = out * gm.to(out.dtype)
        if self.bottleneck:
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
        else:
            out = self.bn2(self.conv2(out))
        if self.gating == "layer" or self.position == "after":
            out = out * gm.to(out.dtype)
        return self.relu(out + identity)


def residual_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) of every BasicBlock/Bottleneck or GatedBlock, in module order."""
    for name, m in model.named_modules():
        if type(m) in (BasicBlock, Bottleneck, GatedBlock):
            yield name, m


def gated_blocks(model: nn.Module) -> list[tuple[str, GatedBlock]]:
    """(qualified name, block) of every gated block, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GatedBlock)]


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def insert_gates(model: nn.Module, gating: Gating = "layer", position: Position = "after", depth: int = 2,
                 hidden: int = 16, init_bias: float = 0.5, init_std: float = 0.01, seed: int = 0) -> nn.Module:
    """Replace every BasicBlock/Bottleneck of ``model`` by a :class:`GatedBlock` (in place; returns it).

    Gate weights of block ``i`` come from ``torch.Generator().manual_seed(seed * 1000003 + i)``, so two
    calls on equal models give equal models. Raises ValueError when the model has no residual block.
    """
    blocks = [(n, m) for n, m in residual_blocks(model) if type(m) is not GatedBlock]
    if not blocks:
        raise ValueError("the model has no ResNet BasicBlock/Bottleneck to gate")
    for i, (name, block) in enumerate(blocks):
        n_out = gated_width(block, gating, position)
        gen = torch.Generator().manual_seed(int(seed) * 1000003 + i)
        head = GateHead(block.conv1.in_channels, n_out, depth, hidden, init_bias, init_std, gen)
        w = block.conv1.weight
        head.to(device=w.device)
        _set(model, name, GatedBlock(block, gating, position, head))
    return model


def gate_param_count(cin: int, n_out: int, depth: int, hidden: int) -> int:
    """Parameters of one gate head: cin*n_out + n_out (1fc) or cin*d + d + d*n_out + n_out (2fc)."""
    if depth == 1:
        return cin * n_out + n_out
    return cin * hidden + hidden + hidden * n_out + n_out


def set_static_masks(model: nn.Module, masks: Optional[dict[str, torch.Tensor]]) -> None:
    """Replace the gates of every gated block by the constant ``masks[name]`` (None: live gates again)."""
    for name, block in gated_blocks(model):
        block.static_mask = None if masks is None else torch.as_tensor(masks[name]).float()
