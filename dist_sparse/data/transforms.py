"""Per-sample image transforms from torchvision and timm, chosen by ``data.transform``.

Three recipes, each a train transform and an eval transform that end in a uint8 tensor
(C, size, size) (run in the DataLoader workers), and a batch step on the device (:class:`Finish`:
normalization, and the timm recipe's Random Erasing):

``crop_flip``  small images (CIFAR / Fashion-MNIST style): the image is resized to ``size x size``,
               then a random crop with ``data.crop_padding`` zero padding and a horizontal flip
               (``data.hflip``). Eval: the resized image. The same augmentation as the in-memory path.
``rrc``        the torchvision ImageNet reference (ResNet-50): RandomResizedCrop(size, ``data.scale``,
               ``data.ratio``, ``data.interpolation``) and a flip. Eval: resize the short side to
               ``size / data.crop_pct``, centre crop ``size``.
``timm``       timm's ``create_transform`` (DeiT, Touvron et al. 2021, Table 9): RandomResizedCrop,
               flip, ``data.color_jitter``, ``data.auto_augment`` (e.g. ``rand-m9-mstd0.5-inc1``, the
               DeiT RandAugment) and Random Erasing with probability ``data.re_prob``. Eval as ``rrc``.

Randomness: the transforms draw from Python's ``random``, NumPy and torch's global generators;
:func:`seeded` fixes all three from (seed, epoch, sample) around one call, so a sample's augmentation
does not depend on which process or worker draws it.
"""
from __future__ import annotations

import contextlib
import math
import random
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["RECIPES", "build_transforms", "seeded", "sample_seed", "eval_resize", "check_transform_keys", "Finish",
           "PairMix", "key_seed"]

RECIPES = ("crop_flip", "rrc", "timm")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")

# data.* keys each recipe reads (beyond data.transform itself); a key set away from its default under a
# recipe that does not read it is a config error, never silently ignored.
RECIPE_KEYS = {
    "crop_flip": ("crop_padding", "hflip"),
    "rrc": ("hflip", "scale", "ratio", "interpolation", "crop_pct"),
    "timm": ("hflip", "scale", "ratio", "interpolation", "crop_pct", "color_jitter", "auto_augment", "re_prob"),
}


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends only on (run seed, epoch, sample index)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + int(index) * 0x94D049BB133111EB)
    x &= (1 << 64) - 1
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & ((1 << 64) - 1)
    return x >> 1


@contextlib.contextmanager
def seeded(seed: int):
    """Run the body with Python's, NumPy's and torch's global generators (CPU, and every CUDA device
    this process has initialized) seeded from ``seed``; their previous states are restored afterwards,
    so the training process's own random stream is untouched."""
    py, npy = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def key_seed(seed: int, key: Sequence[int]) -> int:
    """The augmentation seed of a pipeline key ``(epoch, sample)`` or ``(epoch, sample, copy)``: copy 0
    is the sample's own seed, further copies (repeated augmentation) get their own."""
    s = sample_seed(seed, key[0], key[1])
    copy = key[2] if len(key) > 2 else 0
    return s if copy == 0 else sample_seed(s, copy, 0x5851F42D4C957F2D)


def eval_resize(size: int, crop_pct: float) -> int:
    """The short side an eval image is resized to before its centre crop of ``size``."""
    return int(math.floor(size / crop_pct))


def check_transform_keys(d: Any, defaults: Any) -> None:
    """Refuse a data.* augmentation key that the chosen recipe would not read (one line, names it)."""
    if d.transform not in RECIPES:
        raise ConfigError("data.transform", d.transform, "one of " + ", ".join(RECIPES))
    used = RECIPE_KEYS[d.transform]
    for key in sorted({k for keys in RECIPE_KEYS.values() for k in keys}):
        if key not in used and getattr(d, key) != getattr(defaults, key):
            users = [r for r, keys in RECIPE_KEYS.items() if key in keys]
            raise ConfigError(f"data.{key}", getattr(d, key),
                              f"its default under data.transform={d.transform} (it is read by {', '.join(users)})")
    if d.interpolation not in INTERPOLATIONS:
        raise ConfigError("data.interpolation", d.interpolation, "one of " + ", ".join(INTERPOLATIONS))
    if not (isinstance(d.scale, (list, tuple)) and len(d.scale) == 2 and 0 < d.scale[0] <= d.scale[1] <= 1):
        raise ConfigError("data.scale", d.scale, "[min, max] crop area fractions with 0 < min <= max <= 1")
    if not (isinstance(d.ratio, (list, tuple)) and len(d.ratio) == 2 and 0 < d.ratio[0] <= d.ratio[1]):
        raise ConfigError("data.ratio", d.ratio, "[min, max] aspect ratios with 0 < min <= max")
    if not 0 < d.crop_pct <= 1:
        raise ConfigError("data.crop_pct", d.crop_pct, "a fraction in (0, 1]")
    if not 0 <= d.re_prob <= 1:
        raise ConfigError("data.re_prob", d.re_prob, "a probability in [0, 1]")
    if d.color_jitter < 0:
        raise ConfigError("data.color_jitter", d.color_jitter, "a number >= 0 (0: off)")


def _interp(name: str):
    from torchvision.transforms import InterpolationMode

    return {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
            "nearest": InterpolationMode.NEAREST}[name]


def _uint8() -> list:
    from torchvision.transforms import v2

    return [v2.ToImage(), v2.ToPureTensor()]


class Finish:
    """The batch step after the workers, on the device: uint8 -> float in [0, 1] -> normalized; on
    training batches, timm's Random Erasing per sample under the sample's own seed.

    Workers hand over uint8 images (4x less inter-process traffic than float32, and on a GPU the
    normalization runs there); erasing must come after normalization, so it runs here too.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], re_prob: float = 0.0):
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        self.erase = None
        if re_prob > 0:
            from timm.data.random_erasing import RandomErasing

            self.erase = RandomErasing(re_prob, mode="pixel", max_count=1, device="cpu")

    def __call__(self, x: torch.Tensor, keys: Sequence[tuple[int, int]] | None = None, seed: int = 0) -> torch.Tensor:
        x = x.float().div_(255.0)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        if self.erase is not None and keys is not None:
            self.erase.device = x.device
            for row, key in enumerate(keys):
                with seeded(key_seed(seed, key) ^ 0x2545F4914F6CDD1D):
                    self.erase(x[row])
        return x


def build_transforms(d: Any, size: int, mean: Sequence[float], std: Sequence[float]):
    """(train transform, eval transform, finish) of recipe ``d.transform`` for ``size``-pixel squares.

    The two per-sample transforms (run in the workers) accept a PIL image or a uint8 tensor (C, H, W)
    and return a uint8 tensor (C, size, size); ``finish`` (a :class:`Finish`) normalizes a batch on
    the device and applies Random Erasing (``timm`` recipe) to training batches.

    Args:
        d: the run's ``DataConfig`` (``transform`` and the keys of its recipe).
        size: output side in pixels.
        mean, std: per-channel normalization of pixel values in [0, 1].
    """
    from torchvision.transforms import v2

    if d.transform == "crop_flip":
        resize = v2.Resize((size, size), interpolation=_interp("bilinear"), antialias=True)
        aug = [resize]
        if d.crop_padding > 0:
            aug.append(v2.RandomCrop(size, padding=d.crop_padding))
        if d.hflip:
            aug.append(v2.RandomHorizontalFlip())
        return v2.Compose(aug + _uint8()), v2.Compose([resize] + _uint8()), Finish(mean, std)
    interp = _interp(d.interpolation)
    evaluate = v2.Compose([v2.Resize(eval_resize(size, d.crop_pct), interpolation=interp, antialias=True),
                           v2.CenterCrop(size)] + _uint8())
    if d.transform == "rrc":
        aug = [v2.RandomResizedCrop(size, scale=tuple(d.scale), ratio=tuple(d.ratio), interpolation=interp,
                                    antialias=True)]
        if d.hflip:
            aug.append(v2.RandomHorizontalFlip())
        return v2.Compose(aug + _uint8()), evaluate, Finish(mean, std)
    from timm.data import create_transform

    # use_prefetcher: timm's own split - the workers stop at uint8, normalization and erasing follow later
    train = create_transform(size, is_training=True, scale=tuple(d.scale), ratio=tuple(d.ratio),
                             hflip=0.5 if d.hflip else 0.0, color_jitter=d.color_jitter or None,
                             auto_augment=d.auto_augment or None, interpolation=d.interpolation,
                             re_prob=0.0, mean=tuple(mean), std=tuple(std), use_prefetcher=True)
    return _TimmTrain(train), evaluate, Finish(mean, std, d.re_prob)


class _TimmTrain:
    """timm's training transforms take PIL images and end in a uint8 NumPy array: adapt both ends."""

    def __init__(self, inner: Callable):
        self.inner = inner

    def __call__(self, img):
        if isinstance(img, torch.Tensor):
            from torchvision.transforms.v2.functional import to_pil_image

            img = to_pil_image(img)
        out = self.inner(img)
        return torch.from_numpy(np.ascontiguousarray(out)) if isinstance(out, np.ndarray) else out

    def __repr__(self) -> str:
        return f"TimmTrain({self.inner!r})"


class PairMix:
    """Mixup / CutMix (Zhang et al. 2018; Yun et al. 2019) as DeiT trains with them, rank-invariant.

    Rows ``(2k, 2k+1)`` of every GLOBAL batch form a pair (both always on one rank: each rank holds
    an even number of consecutive rows). Each pair is mixed by timm's ``Mixup`` in ``pair`` mode under
    a seed of its first sample: mixup or cutmix (``switch_prob``), lam ~ Beta(alpha, alpha) (cutmix:
    corrected to the pasted box's area), applied with probability ``prob``; targets become soft,
    ``lam * onehot(y_self) + (1 - lam) * onehot(y_partner)`` with ``label_smoothing`` folded in. So the
    mixed tensors depend on (seed, epoch, samples) only, never on the number of ranks. The permuted
    epoch order makes the partners random.

    Args:
        mixup_alpha, cutmix_alpha: Beta parameters (0 turns that one off).
        prob: probability that a pair is mixed at all.
        switch_prob: probability of cutmix when both are on.
        label_smoothing: folded into the soft targets (the loss must not smooth again).
        num_classes: width of the soft targets.
    """

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, prob: float, switch_prob: float,
                 label_smoothing: float, num_classes: int):
        from timm.data import Mixup

        self.mix = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob,
                         mode="pair", label_smoothing=label_smoothing, num_classes=num_classes)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, keys: Sequence[tuple[int, int]], seed: int):
        if len(keys) % 2:
            raise ValueError(f"PairMix needs an even number of rows per rank, got {len(keys)}")
        xs, ys = [], []
        for k in range(0, len(keys), 2):
            with seeded(key_seed(seed, keys[k]) ^ 0x61C8864680B583EB):
                xx, yy = self.mix(x[k:k + 2].clone(), y[k:k + 2])
            xs.append(xx)
            ys.append(yy)
        return torch.cat(xs), torch.cat(ys).to(x.device)
