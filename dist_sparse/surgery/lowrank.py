"""Low-rank factorization of Conv2d and Linear layers (pure torch functions, plain torch modules out).

A Linear ``W`` (out x in) becomes ``Sequential(Linear(in, r, bias=False), Linear(r, out))``; a Conv2d
with ``m`` input and ``n`` output channels and a ``k x k`` kernel becomes
``Sequential(Conv2d(m, r, k, <stride, padding, dilation>, bias=False), [BatchNorm2d(r)], Conv2d(r, n, 1))``.
The original bias (if any) sits on the second factor. The factors come from the truncated SVD of the
current weight viewed as a matrix (conv: ``(n, m*k*k)``), ``A = P S Q^T``, with the singular values
split evenly ("spectral split"): first factor ``S_r^1/2 Q_r^T``, second factor ``P_r S_r^1/2``; so the
product is the best rank-r approximation of the weight (Eckart-Young) and both factors have the same
Frobenius norm. The SVD runs on the CPU in float64 (deterministic, same numbers on every rank).

Only torch modules are produced, so a factorized model can be saved and loaded without this package:
:func:`factorize_model` rebuilds the architecture from ``{layer name: rank}`` data alone.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

__all__ = ["matrix_view", "full_rank", "spectral_split", "factorize_linear", "factorize_conv", "factorize_layer",
           "factorize_model", "factor_pair", "factorized_params", "dense_params", "saves_parameters",
           "frobenius_decay_grads"]


def matrix_view(w: torch.Tensor) -> torch.Tensor:
    """The 2-D view of a layer weight: Linear (out, in) as is; conv (n, m, kh, kw) -> (n, m*kh*kw)."""
    return w.reshape(w.shape[0], -1)


def full_rank(w_or_shape) -> int:
    """min(rows, cols) of the matrix view of a weight (or of a weight shape)."""
    shape = tuple(w_or_shape.shape) if isinstance(w_or_shape, torch.Tensor) else tuple(w_or_shape)
    cols = 1
    for s in shape[1:]:
        cols *= int(s)
    return min(int(shape[0]), cols)


def spectral_split(a: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left, right)`` with ``left @ right`` the best rank-``r`` approximation of the 2-D ``a``.

    ``left = P_r S_r^1/2`` (rows x r), ``right = S_r^1/2 Q_r^T`` (r x cols), computed in float64 on the
    CPU and returned in float64.
    """
    if not 1 <= r <= min(a.shape):
        raise ValueError(f"rank {r} outside [1, {min(a.shape)}] for a {tuple(a.shape)} matrix")
    p, s, qh = torch.linalg.svd(a.detach().to("cpu", torch.float64), full_matrices=False)
    root = s[:r].sqrt()
    return p[:, :r] * root[None, :], root[:, None] * qh[:r]


def _zeros_like_module(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def factorize_linear(layer: nn.Linear, r: int, init: bool = True) -> nn.Sequential:
    """``Linear(in, r, bias=False)`` then ``Linear(r, out)`` (bias copied); spectral split if ``init``."""
    w = layer.weight
    kw = dict(device=w.device, dtype=w.dtype)
    first = torch.nn.utils.skip_init(nn.Linear, layer.in_features, r, bias=False, **kw)
    second = torch.nn.utils.skip_init(nn.Linear, r, layer.out_features, bias=layer.bias is not None, **kw)
    seq = _zeros_like_module(nn.Sequential(first, second))
    if init:
        left, right = spectral_split(w, r)
        with torch.no_grad():
            first.weight.copy_(right.to(**kw))
            second.weight.copy_(left.to(**kw))
            if layer.bias is not None:
                second.bias.copy_(layer.bias.detach())
    return seq


def factorize_conv(layer: nn.Conv2d, r: int, extra_bn: bool = False, init: bool = True) -> nn.Sequential:
    """``Conv2d(m, r, k, stride/padding/dilation kept, bias=False)``, optional ``BatchNorm2d(r)``,
    ``Conv2d(r, n, 1)`` (bias copied). With ``extra_bn`` the BN starts fresh, so the result is not
    output-equivalent to ``layer`` (the BN's running statistics and affine are those of a new BN)."""
    if layer.groups != 1:
        raise ValueError("grouped / depthwise convolutions are kept dense")
    w = layer.weight
    kw = dict(device=w.device, dtype=w.dtype)
    n, m, kh, kwid = w.shape
    first = torch.nn.utils.skip_init(nn.Conv2d, m, r, (kh, kwid), stride=layer.stride, padding=layer.padding,
                                     dilation=layer.dilation, bias=False, padding_mode=layer.padding_mode, **kw)
    second = torch.nn.utils.skip_init(nn.Conv2d, r, n, 1, bias=layer.bias is not None, **kw)
    mods: list[nn.Module] = [first]
    if extra_bn:
        mods.append(nn.BatchNorm2d(r, **kw))
    mods.append(second)
    _zeros_like_module(first), _zeros_like_module(second)
    seq = nn.Sequential(*mods)
    if init:
        left, right = spectral_split(matrix_view(w), r)
        with torch.no_grad():
            first.weight.copy_(right.reshape(r, m, kh, kwid).to(**kw))
            second.weight.copy_(left.reshape(n, r, 1, 1).to(**kw))
            if layer.bias is not None:
                second.bias.copy_(layer.bias.detach())
    return seq


def factorize_layer(layer: nn.Module, r: int, extra_bn: bool = False, init: bool = True) -> nn.Sequential:
    if isinstance(layer, nn.Conv2d):
        return factorize_conv(layer, r, extra_bn=extra_bn, init=init)
    if isinstance(layer, nn.Linear):
        return factorize_linear(layer, r, init=init)
    raise TypeError(f"cannot factorize a {type(layer).__name__}")


def factorize_model(model: nn.Module, ranks: Mapping[str, int], extra_bn: bool = False,
                    init: bool = True) -> nn.Module:
    """Replace every layer named in ``ranks`` (module FQN -> rank) by its two-factor form, in place.

    With ``init`` the factors are the spectral split of the layer's current weight, otherwise zeros
    (an architecture to load weights into). Returns ``model``.
    """
    for name in sorted(ranks):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, attr)
        setattr(parent, attr, factorize_layer(layer, int(ranks[name]), extra_bn=extra_bn and
                                              isinstance(layer, nn.Conv2d), init=init))
    return model


def factor_pair(seq: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, C)`` parameters of a factorized layer: its product ``B.reshape(n, r) @ C.reshape(r, -1)``
    is the dense weight's matrix view (first factor C, second factor B)."""
    return seq[-1].weight, seq[0].weight


def dense_params(shape: tuple[int, ...], bias: bool = False) -> int:
    """Weights of a dense layer of ``shape`` (+ rows for a bias)."""
    numel = 1
    for s in shape:
        numel *= int(s)
    return numel + (int(shape[0]) if bias else 0)


def factorized_params(shape: tuple[int, ...], r: int, bias: bool = False, extra_bn: bool = False) -> int:
    """r * (cols + rows) (+ rows for a bias, + 2r for an extra BN's affine pair)."""
    rows = int(shape[0])
    cols = 1
    for s in shape[1:]:
        cols *= int(s)
    return r * (cols + rows) + (rows if bias else 0) + (2 * r if extra_bn else 0)


def saves_parameters(shape: tuple[int, ...], r: int) -> bool:
    """Whether the factorized form of a weight of ``shape`` at rank ``r`` has fewer weights."""
    return factorized_params(shape, r) < dense_params(shape)


def frobenius_decay_grads(b: torch.Tensor, c: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``lam/2 * ||B C||_F^2`` with respect to ``B`` and ``C`` (in their own shapes).

    ``B`` is the second factor (viewed (n, r)), ``C`` the first (viewed (r, cols)); with ``W = B C``:
    ``dB = lam * W C^T`` and ``dC = lam * B^T W``. The product is formed once.
    """
    b2 = b.reshape(b.shape[0], -1)
    c2 = c.reshape(c.shape[0], -1)
    w = b2 @ c2
    return (lam * (w @ c2.T)).reshape(b.shape), (lam * (b2.T @ w)).reshape(c.shape)
