"""Two parameter-free modules that move channels by index, used by physically pruned ResNet blocks.

* :class:`ChannelSelect` keeps the channels ``index`` of its input (``x[:, index]``): a block whose first
  conv lost some input channels reads only the kept ones.
* :class:`ChannelScatter` places its ``len(index)`` input channels at positions ``index`` of a zero tensor
  with ``channels`` channels: a residual branch that lost some output channels is added to the shortcut at
  the kept positions only (``out[:, index] += branch``).

The index is a buffer (int64), so the modules hold no parameters and load from a state dict.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ChannelSelect", "ChannelScatter"]


class ChannelSelect(nn.Module):
    """``x[:, index]`` for a (B, C, ...) tensor.

    Args:
        index: the kept channel indices (sorted, unique).
    """

    def __init__(self, index: torch.Tensor | list[int]):
        super().__init__()
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"keep={self.index.numel()}"


class ChannelScatter(nn.Module):
    """A (B, channels, ...) tensor of zeros holding the input's channels at positions ``index``.

    Args:
        index: target channel of each input channel (sorted, unique).
        channels: channels of the output.
    """

    def __init__(self, index: torch.Tensor | list[int], channels: int):
        super().__init__()
        self.channels = int(channels)
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], self.channels) + tuple(x.shape[2:])
        return x.new_zeros(shape).index_copy(1, self.index, x)

    def extra_repr(self) -> str:
        return f"{self.index.numel()} -> {self.channels}"
