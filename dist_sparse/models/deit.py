"""DeiT / ViT image classifiers in plain PyTorch (Touvron et al. 2021; Dosovitskiy et al. 2021).

Image -> ``patch_embed.proj`` (Conv2d, kernel = stride = patch) -> tokens, prepend a class token
(and a distillation token when ``distilled=True``), add learned position embeddings, run ``depth``
pre-norm blocks (``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``, ``blocks.{i}.mlp.fc1``,
``blocks.{i}.mlp.fc2``, all ``nn.Linear``), final LayerNorm, linear ``head`` on the class token.

Sizes: ``deit_tiny`` (192 wide, 12 blocks, 3 heads), ``deit_small`` (384, 12, 6), ``deit_base``
(768, 12, 12) and ``deit_micro`` (64, 2, 2) for tests. Any ``img_size`` divisible by ``patch_size``
works (28x28 with patch 4 or 7, for example).

With ``distilled=True`` there is a second head, ``head_dist``, on the distillation token.
``forward`` always returns one logits tensor: the mean of both heads (DeiT's inference rule), so the
trainer's loss works unchanged; :meth:`VisionTransformer.forward_heads` returns both for a
distillation loss.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import register_model

__all__ = ["Attention", "Mlp", "Block", "DropPath", "PatchEmbed", "VisionTransformer", "WRAP_CLASSES",
           "deit_micro", "deit_tiny", "deit_small", "deit_base"]


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability ``p`` (training only).

    Args:
        p: drop probability; kept branches are scaled by ``1 / (1 - p)``.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping patches and project each to ``dim`` with one Conv2d.

    Args:
        img_size: side of the (square) input image.
        patch_size: side of a patch; must divide ``img_size``.
        in_chans: image channels.
        dim: embedding width.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.grid = img_size // patch_size
        self.num_patches = self.grid * self.grid
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, C, H, W). Returns: tokens (B, num_patches, dim)."""
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection and an output ``proj``.

    Args:
        dim: token width (divisible by ``heads``).
        heads: attention heads.
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # (B, N, 3D) -> 3 x (B, heads, N, D/heads); reshape by the projection's own width so that a
        # factorized or channel-pruned qkv keeps working as long as it still outputs 3 * D.
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """Two linear layers with GELU in between (``fc1``: dim -> hidden, ``fc2``: hidden -> dim).

    Args:
        dim: token width.
        hidden: hidden width (4 * dim in DeiT).
        drop: dropout after the activation and after ``fc2``.
    """

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + drop_path(attn(norm1(x)))``, then ``x + drop_path(mlp(norm2(x)))``.

    Args:
        dim: token width.
        heads: attention heads.
        mlp_ratio: MLP hidden width / dim.
        drop: dropout after projections.
        attn_drop: dropout on attention weights.
        drop_path: stochastic depth probability of this block.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class VisionTransformer(nn.Module):
    """ViT / DeiT classifier.

    Args:
        num_classes: classifier outputs.
        in_chans: image channels.
        img_size: side of the square input image.
        patch_size: side of a patch (divides ``img_size``).
        dim: token width.
        depth: number of blocks.
        heads: attention heads (divide ``dim``).
        mlp_ratio: MLP hidden width / dim.
        drop_rate: dropout after embeddings and projections.
        attn_drop_rate: dropout on attention weights.
        drop_path_rate: stochastic depth, rising linearly from 0 (first block) to this (last block).
        distilled: add a distillation token and a second head ``head_dist``.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, patch_size: int = 16,
                 dim: int = 192, depth: int = 12, heads: int = 3, mlp_ratio: float = 4.0, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, distilled: bool = False):
        super().__init__()
        self.num_classes, self.dim, self.distilled = num_classes, dim, distilled
        self.num_prefix = 2 if distilled else 1
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + self.num_prefix, dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, drop_rate, attn_drop_rate, r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self.head_dist = nn.Linear(dim, num_classes) if distilled else None
        self._init_weights()

    def _init_weights(self) -> None:
        for p in (self.cls_token, self.dist_token, self.pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # The patch projection is a linear map of the flattened patch: same init as the other linears.
        nn.init.trunc_normal_(self.patch_embed.proj.weight, std=0.02)
        nn.init.zeros_(self.patch_embed.proj.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters the DeiT recipe never decays (read by the trainer's optimizer builder)."""
        return {"cls_token", "dist_token", "pos_embed"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: images (B, C, H, W). Returns: normed tokens (B, prefix + patches, dim)."""
        x = self.patch_embed(x)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat(prefix + [x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Args: x: images. Returns: (class-token logits, distillation-token logits or None)."""
        x = self.forward_features(x)
        dist = self.head_dist(x[:, 1]) if self.head_dist is not None else None
        return self.head(x[:, 0]), dist

    # Set by the trainer under hard distillation: in training mode the forward returns both heads.
    train_both_heads = False

    def forward(self, x: torch.Tensor):
        """Args: x: images (B, C, H, W). Returns: logits (B, num_classes) (mean of both heads if distilled);
        (class logits, distillation logits) in training mode when ``train_both_heads``."""
        cls, dist = self.forward_heads(x)
        if dist is not None and self.training and self.train_both_heads:
            return cls, dist
        return cls if dist is None else (cls + dist) / 2


WRAP_CLASSES = (Block,)


def _build(dim: int, depth: int, heads: int, num_classes: int, in_chans: int, img_size: int, patch_size: int,
           drop_path_rate: float, distilled: bool, drop_rate: float, attn_drop_rate: float) -> VisionTransformer:
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ConfigError("model.num_classes", num_classes, "an integer >= 1")
    if not (isinstance(in_chans, int) and in_chans >= 1):
        raise ConfigError("model.in_chans", in_chans, "an integer >= 1")
    if not (isinstance(patch_size, int) and patch_size >= 1):
        raise ConfigError("model.extra.patch_size", patch_size, "an integer >= 1")
    if not (isinstance(img_size, int) and img_size >= patch_size and img_size % patch_size == 0):
        raise ConfigError("model.img_size", img_size, f"a multiple of patch_size={patch_size}")
    for key, val in (("model.drop_path_rate", drop_path_rate), ("model.extra.drop_rate", drop_rate),
                     ("model.extra.attn_drop_rate", attn_drop_rate)):
        if not (isinstance(val, (int, float)) and 0.0 <= val < 1.0):
            raise ConfigError(key, val, "a probability in [0, 1)")
    return VisionTransformer(num_classes, in_chans, img_size, patch_size, dim, depth, heads, 4.0, drop_rate,
                             attn_drop_rate, drop_path_rate, distilled)


_DOC = """DeiT-{name}: width {dim}, {depth} blocks, {heads} heads, MLP ratio 4.

    Args:
        num_classes: classifier outputs.
        in_chans: image channels.
        img_size: side of the square input (a multiple of ``patch_size``).
        patch_size: patch side.
        drop_path_rate: stochastic depth of the last block (linear from 0).
        distilled: add the distillation token and ``head_dist``.
        drop_rate: dropout after embeddings and projections.
        attn_drop_rate: dropout on attention weights.

    Returns:
        the model.
    """


@register_model("deit")
def deit_micro(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, patch_size: int = 16,
               drop_path_rate: float = 0.1, distilled: bool = False, drop_rate: float = 0.0,
               attn_drop_rate: float = 0.0) -> VisionTransformer:
    return _build(64, 2, 2, num_classes, in_chans, img_size, patch_size, drop_path_rate, distilled, drop_rate,
                  attn_drop_rate)


@register_model("deit")
def deit_tiny(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, patch_size: int = 16,
              drop_path_rate: float = 0.1, distilled: bool = False, drop_rate: float = 0.0,
              attn_drop_rate: float = 0.0) -> VisionTransformer:
    return _build(192, 12, 3, num_classes, in_chans, img_size, patch_size, drop_path_rate, distilled, drop_rate,
                  attn_drop_rate)


@register_model("deit")
def deit_small(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, patch_size: int = 16,
               drop_path_rate: float = 0.1, distilled: bool = False, drop_rate: float = 0.0,
               attn_drop_rate: float = 0.0) -> VisionTransformer:
    return _build(384, 12, 6, num_classes, in_chans, img_size, patch_size, drop_path_rate, distilled, drop_rate,
                  attn_drop_rate)


@register_model("deit")
def deit_base(num_classes: int = 1000, in_chans: int = 3, img_size: int = 224, patch_size: int = 16,
              drop_path_rate: float = 0.1, distilled: bool = False, drop_rate: float = 0.0,
              attn_drop_rate: float = 0.0) -> VisionTransformer:
    return _build(768, 12, 12, num_classes, in_chans, img_size, patch_size, drop_path_rate, distilled, drop_rate,
                  attn_drop_rate)


for _fn, _sz in ((deit_micro, ("Micro (tests)", 64, 2, 2)), (deit_tiny, ("Tiny", 192, 12, 3)),
                 (deit_small, ("Small", 384, 12, 6)), (deit_base, ("Base", 768, 12, 12))):
    _fn.__doc__ = _DOC.format(name=_sz[0], dim=_sz[1], depth=_sz[2], heads=_sz[3])
