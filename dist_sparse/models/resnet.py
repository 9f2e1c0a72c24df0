"""ResNets: the CIFAR family (ResNet-20/32/56) and ResNet-18/34/50 with a CIFAR or ImageNet stem.

Two families, one set of blocks:

* ``resnet20``, ``resnet32``, ``resnet56`` (He et al. 2016, section 4.2): a 3x3 stem with 16 channels,
  three stages of 16/32/64 channels with ``n`` BasicBlocks each (depth ``6n + 2``), global average
  pooling and a linear classifier. The default shortcut is **option A** of the paper (parameter-free:
  stride-2 subsampling plus zero-padded channels), which gives the paper's 0.27M parameters for
  ResNet-20 (269,722 with 10 classes). ``shortcut="B"`` uses a 1x1 conv + norm projection instead.
* ``resnet18``, ``resnet34`` (BasicBlock) and ``resnet50`` (Bottleneck, expansion 4), stages of
  64/128/256/512 channels, projection shortcuts (1x1 conv + norm, "option B") where the shape changes.
  ``stem="cifar"`` (default) is a 3x3 stride-1 conv without max-pool, for 28-32 pixel inputs;
  ``stem="imagenet"`` is the 7x7 stride-2 conv followed by a 3x3 stride-2 max-pool.

Parameter names follow the familiar torchvision layout so that sparsity methods can select tensors
with FQN globs: ``conv1.weight`` (stem), ``layer1.0.conv1.weight``, ``layer2.0.downsample.0.weight``,
``fc.weight``. Every conv and linear layer is a plain ``nn.Conv2d`` / ``nn.Linear``.

``norm`` picks the normalization layer type: ``"bn"`` (BatchNorm2d), ``"gn"`` (GroupNorm, no batch
statistics, so the result does not depend on how a batch is split across processes) or ``"none"``
(Identity). Convs have no bias in every case.
"""
from __future__ import annotations

from typing import Callable, Literal, Optional, Sequence, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import register_model

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "GroupNorm2d", "WRAP_CLASSES", "resnet20", "resnet32",
           "resnet56", "resnet18", "resnet34", "resnet50"]

NormLayer = Callable[[int], nn.Module]


class GroupNorm2d(nn.GroupNorm):
    """GroupNorm built from the channel count alone: ``min(32, C // 4)`` groups, lowered until it divides C.

    Args:
        num_channels: channels C of the input.
    """

    def __init__(self, num_channels: int):
        groups = max(1, min(32, num_channels // 4))
        while num_channels % groups:
            groups -= 1
        super().__init__(groups, num_channels)


class NoNorm(nn.Identity):
    """Identity that accepts (and ignores) a channel count, so it can stand in for a norm layer type."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.num_channels = num_channels


_NORMS: dict[str, Type[nn.Module]] = {"bn": nn.BatchNorm2d, "gn": GroupNorm2d, "none": NoNorm}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Option-A shortcut: take every ``stride``-th pixel and zero-pad the channels to ``cout``.

    Args:
        cin: input channels.
        cout: output channels (>= cin); the extra channels are split evenly before and after.
        stride: spatial subsampling factor.
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        if cout < cin:
            raise ValueError(f"option-A shortcut cannot shrink channels ({cin} -> {cout})")
        self.cin, self.cout, self.stride = cin, cout, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        extra = self.cout - self.cin
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34 and the CIFAR ResNets).

    Args:
        cin: input channels.
        planes: output channels.
        stride: stride of the first conv (2 at the start of a downsampling stage).
        norm_layer: norm layer type, called with a channel count.
        shortcut: "A" (zero-pad, parameter-free) or "B" (1x1 conv + norm) when the shape changes.
    """

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, norm_layer: NormLayer = nn.BatchNorm2d,
                 shortcut: str = "B"):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, cout)
        self.bn2 = norm_layer(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride, norm_layer, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)

    def last_norm(self) -> nn.Module:
        return self.bn2


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as in torchvision's "ResNet v1.5"), 1x1 expand by 4.

    Args:
        cin: input channels.
        planes: width of the 3x3 conv; the block outputs ``4 * planes`` channels.
        stride: stride of the 3x3 conv.
        norm_layer: norm layer type, called with a channel count.
        shortcut: "A" or "B", as in :class:`BasicBlock`.
    """

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, norm_layer: NormLayer = nn.BatchNorm2d,
                 shortcut: str = "B"):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = norm_layer(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, cout, stride, norm_layer, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)

    def last_norm(self) -> nn.Module:
        return self.bn3


def _shortcut(cin: int, cout: int, stride: int, norm_layer: NormLayer, kind: str) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    if kind == "A":
        return PadShortcut(cin, cout, stride)
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), norm_layer(cout))


class ResNet(nn.Module):
    """A ResNet: stem, ``len(layers)`` stages of residual blocks, global average pooling, ``fc``.

    Args:
        block: residual block type (:class:`BasicBlock` or :class:`Bottleneck`).
        layers: number of blocks per stage.
        widths: ``planes`` of each stage (already multiplied by the width multiplier).
        num_classes: classifier outputs.
        in_chans: input image channels.
        stem_width: output channels of the stem conv.
        stem: "cifar" (3x3 stride 1, no pooling) or "imagenet" (7x7 stride 2 + 3x3 max-pool stride 2).
        norm_layer: norm layer type, called with a channel count.
        shortcut: "A" or "B" (see :class:`BasicBlock`).
        zero_init_residual: start each block's last norm with weight 0, so every block begins as the
            identity (no effect for ``norm="none"``, which has no weight).
    """

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: Sequence[int], widths: Sequence[int],
                 num_classes: int = 10, in_chans: int = 3, stem_width: int = 64, stem: str = "cifar",
                 norm_layer: NormLayer = nn.BatchNorm2d, shortcut: str = "B", zero_init_residual: bool = False):
        super().__init__()
        if stem == "cifar":
            self.conv1 = _conv3x3(in_chans, stem_width)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = norm_layer(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.num_stages = len(layers)
        cin = stem_width
        for i, (n, planes) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, stride if j == 0 else 1, norm_layer, shortcut))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.num_features = cin
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)) and getattr(m.last_norm(), "weight", None) is not None:
                    nn.init.zeros_(m.last_norm().weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and residual stages; returns the last feature map (B, C, H', W')."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: images (B, in_chans, H, W). Returns: logits (B, num_classes)."""
        x = self.forward_features(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


WRAP_CLASSES = (BasicBlock, Bottleneck)


def _check_common(num_classes: int, in_chans: int, width_mult: float, norm: str) -> Type[nn.Module]:
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ConfigError("model.num_classes", num_classes, "an integer >= 1")
    if not (isinstance(in_chans, int) and in_chans >= 1):
        raise ConfigError("model.in_chans", in_chans, "an integer >= 1")
    if not (isinstance(width_mult, (int, float)) and width_mult > 0):
        raise ConfigError("model.width_mult", width_mult, "a number > 0")
    if norm not in _NORMS:
        raise ConfigError("model.norm", norm, "one of " + ", ".join(_NORMS))
    return _NORMS[norm]


def _scaled(c: int, width_mult: float) -> int:
    return max(1, int(round(c * width_mult)))


def _cifar_resnet(depth: int, num_classes: int, in_chans: int, width_mult: float, norm: str,
                  shortcut: str, zero_init_residual: bool) -> ResNet:
    norm_layer = _check_common(num_classes, in_chans, width_mult, norm)
    if shortcut not in ("A", "B"):
        raise ConfigError("model.extra.shortcut", shortcut, "'A' (zero-pad) or 'B' (1x1 conv projection)")
    n = (depth - 2) // 6
    widths = [_scaled(c, width_mult) for c in (16, 32, 64)]
    return ResNet(BasicBlock, [n, n, n], widths, num_classes, in_chans, stem_width=widths[0], stem="cifar",
                  norm_layer=norm_layer, shortcut=shortcut, zero_init_residual=zero_init_residual)


def _big_resnet(block: Type[Union[BasicBlock, Bottleneck]], layers: Sequence[int], num_classes: int, in_chans: int,
                width_mult: float, stem: str, norm: str, zero_init_residual: bool) -> ResNet:
    norm_layer = _check_common(num_classes, in_chans, width_mult, norm)
    if stem not in ("cifar", "imagenet"):
        raise ConfigError("model.stem", stem,
                          "'cifar' (3x3 stride 1, no max-pool) or 'imagenet' (7x7 stride 2 + max-pool)")
    widths = [_scaled(c, width_mult) for c in (64, 128, 256, 512)]
    return ResNet(block, layers, widths, num_classes, in_chans, stem_width=widths[0], stem=stem,
                  norm_layer=norm_layer, shortcut="B", zero_init_residual=zero_init_residual)


# Entry functions. ``img_size`` is accepted so that every vision model takes the same arguments; the
# ResNets ignore it (global average pooling makes them size-agnostic). The CIFAR family has no
# ImageNet stem: ``stem`` must be "cifar" there. Unknown keyword arguments raise TypeError.


@register_model("resnet")
def resnet20(num_classes: int = 10, in_chans: int = 3, img_size: Optional[int] = 32, width_mult: float = 1.0,
             stem: Literal["cifar"] = "cifar", norm: str = "bn", zero_init_residual: bool = False,
             shortcut: Literal["A", "B"] = "A") -> ResNet:
    """ResNet-20 for 32x32 inputs (0.27M parameters with option-A shortcuts and 10 classes).

    Args:
        num_classes: classifier outputs.
        in_chans: input channels.
        img_size: ignored (global average pooling).
        width_mult: multiplies every channel count (16/32/64).
        stem: must be "cifar".
        norm: "bn", "gn" or "none".
        zero_init_residual: zero the last norm weight of every block.
        shortcut: "A" (zero-pad, the paper's CIFAR choice) or "B" (1x1 conv + norm).

    Returns:
        the model.
    """
    _cifar_stem_only(stem)
    return _cifar_resnet(20, num_classes, in_chans, width_mult, norm, shortcut, zero_init_residual)


@register_model("resnet")
def resnet32(num_classes: int = 10, in_chans: int = 3, img_size: Optional[int] = 32, width_mult: float = 1.0,
             stem: Literal["cifar"] = "cifar", norm: str = "bn", zero_init_residual: bool = False,
             shortcut: Literal["A", "B"] = "A") -> ResNet:
    """ResNet-32 (5 BasicBlocks per stage); arguments as :func:`resnet20`."""
    _cifar_stem_only(stem)
    return _cifar_resnet(32, num_classes, in_chans, width_mult, norm, shortcut, zero_init_residual)


@register_model("resnet")
def resnet56(num_classes: int = 10, in_chans: int = 3, img_size: Optional[int] = 32, width_mult: float = 1.0,
             stem: Literal["cifar"] = "cifar", norm: str = "bn", zero_init_residual: bool = False,
             shortcut: Literal["A", "B"] = "A") -> ResNet:
    """ResNet-56 (9 BasicBlocks per stage); arguments as :func:`resnet20`."""
    _cifar_stem_only(stem)
    return _cifar_resnet(56, num_classes, in_chans, width_mult, norm, shortcut, zero_init_residual)


def _cifar_stem_only(stem: str) -> None:
    if stem != "cifar":
        raise ConfigError("model.stem", stem, "'cifar' (ResNet-20/32/56 only have the CIFAR stem)")


@register_model("resnet")
def resnet18(num_classes: int = 10, in_chans: int = 3, img_size: Optional[int] = 32, width_mult: float = 1.0,
             stem: Literal["cifar", "imagenet"] = "cifar", norm: str = "bn",
             zero_init_residual: bool = False) -> ResNet:
    """ResNet-18: BasicBlocks [2, 2, 2, 2], widths 64/128/256/512 (11,173,962 params, CIFAR stem, 10 classes).

    Args:
        num_classes: classifier outputs.
        in_chans: input channels.
        img_size: ignored (global average pooling).
        width_mult: multiplies every channel count.
        stem: "cifar" (3x3 stride 1, no max-pool) or "imagenet" (7x7 stride 2 + max-pool).
        norm: "bn", "gn" or "none".
        zero_init_residual: zero the last norm weight of every block.

    Returns:
        the model.
    """
    return _big_resnet(BasicBlock, [2, 2, 2, 2], num_classes, in_chans, width_mult, stem, norm, zero_init_residual)


@register_model("resnet")
def resnet34(num_classes: int = 10, in_chans: int = 3, img_size: Optional[int] = 32, width_mult: float = 1.0,
             stem: Literal["cifar", "imagenet"] = "cifar", norm: str = "bn",
             zero_init_residual: bool = False) -> ResNet:
    """ResNet-34: BasicBlocks [3, 4, 6, 3]; arguments as :func:`resnet18`."""
    return _big_resnet(BasicBlock, [3, 4, 6, 3], num_classes, in_chans, width_mult, stem, norm, zero_init_residual)


@register_model("resnet")
def resnet50(num_classes: int = 10, in_chans: int = 3, img_size: Optional[int] = 32, width_mult: float = 1.0,
             stem: Literal["cifar", "imagenet"] = "cifar", norm: str = "bn",
             zero_init_residual: bool = False) -> ResNet:
    """ResNet-50: Bottlenecks [3, 4, 6, 3] (expansion 4); arguments as :func:`resnet18`."""
    return _big_resnet(Bottleneck, [3, 4, 6, 3], num_classes, in_chans, width_mult, stem, norm, zero_init_residual)
