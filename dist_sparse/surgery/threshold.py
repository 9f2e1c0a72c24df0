"""Learnable soft thresholds per layer (STR / AutoSparse): pure model surgery and the autograd rule.

A thresholded layer keeps its dense weight ``W`` and one trainable scalar ``s`` (a parameter of shape
``(1,)`` in the same module, so FSDP2 and DeepSpeed ZeRO-3 gather both together). Its forward builds

    W^ = sign(W) * relu(|W| - sigmoid(s))

on the full weight and runs the layer's own conv / matmul with ``W^``: entries with ``|W| <= T``
(``T = sigmoid(s)``) are exact zeros, the others are shrunk towards zero by ``T``.

Backward (Gradient Annealing, Kundu et al., "AutoSparse", arXiv 2304.06941, eq. 1 and Appendix A):
with ``G = dL/dW^`` and the gate ``g = 1`` on the active set ``A = {|W| > T}`` and ``g = alpha`` elsewhere,

    dL/dW = G * g
    dL/ds = -sigmoid'(s) * sum(G * sign(W) * g)

``alpha = 0`` is STR (Kusupati et al. 2020): pruned weights get no loss gradient. ``|W| == T`` counts as
pruned (factor ``alpha``), and so does ``W == 0`` (its gradient is ``alpha * G``, which the plain
autograd of the formula would make 0). Optional backward sparsity: the weight gradient is kept only on
``B``, the ``k`` largest ``|W|`` (united with ``A`` in mode ``"union"``); the gate is 0 outside ``B``.

Everything is computed in at least float32 (bf16 weights are thresholded in float32, then ``W^`` is cast
back), deterministically, with no communication: it runs inside the module's forward, where sharded
backends have already gathered the full weight.

Example::

    from dist_sparse.surgery import threshold as T
    model = T.apply_thresholds(model, ["layer1.0.conv1.weight", "fc.weight"], s_init=-5.0)
    T.set_alpha(model, 0.75)                    # the GA scale of this epoch
    plain = T.remove_thresholds(copy.deepcopy(model))   # plain Conv/Linear holding W^ (exact zeros)
"""
from __future__ import annotations

import math
from typing import Iterable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..metrics.layer_stats import clean_name
from . import masking as M

__all__ = ["BACKWARD_MODES", "ThresholdFunction", "soft_threshold", "threshold_of", "active_mask",
           "backward_mask", "backward_count", "ThresholdedLayer", "ThresholdLinear", "ThresholdConv1d",
           "ThresholdConv2d", "ThresholdConv3d", "candidate_layers", "apply_thresholds", "remove_thresholds",
           "thresholded_modules", "set_alpha", "set_backward"]

BACKWARD_MODES = ("union", "plain_topk")
BackwardMode = Literal["union", "plain_topk"]


# ------------------------------------------------------------------------------------------------
# The tensor functions
# ------------------------------------------------------------------------------------------------


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 tensors, float64 for float64 (the precision of the thresholding)."""
    return torch.promote_types(t.dtype, torch.float32)


def threshold_of(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``T = sigmoid(s)`` in the precision used for thresholding ``like`` (a 1-element tensor)."""
    return torch.sigmoid(s.detach().reshape(1).to(device=like.device, dtype=_acc_dtype(like)))


def active_mask(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The active set ``A = {|W| > sigmoid(s)}`` as a bool tensor shaped like ``w`` (no gradient).

    The comparison is the forward's own (``|W| - T > 0`` in float32 or float64), so a count of this mask
    equals the number of non-zeros of ``W^``.
    """
    wf = w.detach().to(_acc_dtype(w))
    return (wf.abs() - threshold_of(s, w)) > 0


def backward_count(numel: int, density: float) -> int:
    """``k = ceil(b * n)``: how many weights the backward TopK keeps (at least 1, at most ``n``)."""
    return max(1, min(numel, int(math.ceil(density * numel - 1e-9))))


def backward_mask(w: torch.Tensor, active: torch.Tensor, k: int, mode: BackwardMode = "union") -> torch.Tensor:
    """The weight-gradient support ``B``: the ``k`` largest ``|W|`` (ties: lowest flat index), with ``A``.

    Args:
        w: the full weight.
        active: its active mask ``A``.
        k: entries of the TopK (see :func:`backward_count`).
        mode: ``"union"`` gives ``B = A | TopK(|W|, k)`` (so ``|B| = max(k, |A|)``); ``"plain_topk"`` gives
            ``B = TopK(|W|, k)`` (active weights outside it get no gradient).

    Returns:
        a bool tensor shaped like ``w``.
    """
    top = M.topk_mask(w.detach().to(_acc_dtype(w)).abs(), k)
    return top | active if mode == "union" else top


class ThresholdFunction(torch.autograd.Function):
    """``W^ = sign(W) * relu(|W| - sigmoid(s))`` with the Gradient-Annealing backward.

    ``apply(w, s, alpha, k, mode)`` returns ``(w_hat, counts)``: ``w_hat`` shaped and typed like ``w``, and
    ``counts`` = int64 ``[|A|, |B|]`` (``|B| = n`` without backward sparsity, ``k`` is None), a
    non-differentiable statistic of this forward.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, s: torch.Tensor, alpha: float, k: Optional[int],  # type: ignore[override]
                mode: str):
        acc = _acc_dtype(w)
        wf = w.detach() if w.dtype == acc else w.detach().to(acc)
        t = threshold_of(s, w)
        shrunk = wf.abs() - t
        active = shrunk > 0
        sign = torch.sign(wf)
        w_hat = torch.where(active, sign * shrunk, 0.0)
        if w_hat.dtype != w.dtype:
            w_hat = w_hat.to(w.dtype)
        # One int8 per weight for the backward: sign(W) times 2 on A, times 1 elsewhere (W = 0 gives 0).
        code = sign.to(torch.int8) * (active.to(torch.int8) + 1)
        n_a = active.sum()
        if k is None:
            bmask = None
            counts = torch.stack([n_a, torch.full_like(n_a, w.numel())])
        else:
            bmask = backward_mask(w, active, int(k), mode)
            counts = torch.stack([n_a, bmask.sum()])
        ctx.mark_non_differentiable(counts)
        ctx.alpha = float(alpha)
        ctx.w_dtype, ctx.s_dtype, ctx.w_stride = w.dtype, s.dtype, w.stride()
        saved = (code, t * (1 - t)) if bmask is None else (code, t * (1 - t), bmask)
        ctx.save_for_backward(*saved)
        return w_hat, counts

    @staticmethod
    def backward(ctx, g: torch.Tensor, _g_counts):  # type: ignore[override]
        code, dsig, *rest = ctx.saved_tensors
        acc = dsig.dtype
        gf = g.to(acc)
        on_a = code.abs() == 2
        gate = torch.where(on_a, torch.ones((), dtype=acc, device=g.device),
                           torch.full((), ctx.alpha, dtype=acc, device=g.device))
        if rest:
            gate = gate * rest[0].to(acc)
        gated = gf * gate
        grad_w = gated.to(ctx.w_dtype)
        if grad_w.stride() != ctx.w_stride:  # the parameter's own layout (DDP buckets, channels_last)
            grad_w = torch.empty_strided(grad_w.shape, ctx.w_stride, dtype=grad_w.dtype,
                                         device=grad_w.device).copy_(grad_w)
        grad_s = (-dsig * (gated * torch.sign(code.to(acc))).sum()).reshape(1).to(ctx.s_dtype)
        return grad_w, grad_s, None, None, None


def soft_threshold(w: torch.Tensor, s: torch.Tensor, alpha: float = 0.0, backward_density: float | None = None,
                   backward_mode: BackwardMode = "union") -> torch.Tensor:
    """``W^`` of weight ``w`` and threshold parameter ``s`` (differentiable in both, see the module docs).

    Args:
        w: the full weight (any shape).
        s: a 1-element tensor; ``T = sigmoid(s)``.
        alpha: the GA scale in [0, 1] of the gradient of pruned weights (0 = STR).
        backward_density: fraction ``b`` of the weight gradient kept (TopK of ``|W|``); None = all.
        backward_mode: ``"union"`` or ``"plain_topk"`` (see :func:`backward_mask`).

    Returns:
        ``W^``, shaped and typed like ``w``.
    """
    k = None if backward_density is None else backward_count(w.numel(), backward_density)
    return ThresholdFunction.apply(w, s, float(alpha), k, backward_mode)[0]


# ------------------------------------------------------------------------------------------------
# Thresholded layers
# ------------------------------------------------------------------------------------------------


class ThresholdedLayer:
    """Mixin of the thresholded Conv/Linear layers: the weight ``W``, the threshold parameter ``s``.

    Attributes (plain Python values, not state: the method sets them on every rank):
        alpha: GA scale of this epoch.
        backward_density: fraction of the weight gradient kept (None: all).
        backward_mode: ``"union"`` | ``"plain_topk"``.
        last_counts: int64 ``[|A|, |B|]`` of the last training forward (None once read).
    """

    s: nn.Parameter
    alpha: float
    backward_density: Optional[float]
    backward_mode: str
    last_counts: Optional[torch.Tensor]

    def _init_threshold(self, weight: nn.Parameter, s_init: float) -> None:
        self.s = nn.Parameter(torch.full((1,), float(s_init), dtype=weight.dtype, device=weight.device))
        self.alpha = 0.0
        self.backward_density = None
        self.backward_mode = "union"
        self.last_counts = None

    @property
    def threshold(self) -> torch.Tensor:
        """``T = sigmoid(s)`` (no gradient)."""
        return threshold_of(self.s, self.weight)  # type: ignore[attr-defined]

    def thresholded_weight(self) -> torch.Tensor:
        """``W^`` (differentiable); a training forward also records :attr:`last_counts`."""
        w = self.weight  # type: ignore[attr-defined]
        k = None if self.backward_density is None else backward_count(w.numel(), self.backward_density)
        w_hat, counts = ThresholdFunction.apply(w, self.s, float(self.alpha), k, self.backward_mode)
        if self.training and torch.is_grad_enabled():  # type: ignore[attr-defined]
            self.last_counts = counts
        return w_hat

    def extra_repr(self) -> str:  # shown after the layer's own description
        return super().extra_repr() + ", soft threshold s (1,)"  # type: ignore[misc]


class ThresholdLinear(ThresholdedLayer, nn.Linear):
    """``nn.Linear`` computing with ``W^`` (see :class:`ThresholdedLayer`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.thresholded_weight(), self.bias)


class _ThresholdConv(ThresholdedLayer):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.thresholded_weight(), self.bias)  # type: ignore[attr-defined]


class ThresholdConv1d(_ThresholdConv, nn.Conv1d):
    """``nn.Conv1d`` computing with ``W^``."""


class ThresholdConv2d(_ThresholdConv, nn.Conv2d):
    """``nn.Conv2d`` computing with ``W^``."""


class ThresholdConv3d(_ThresholdConv, nn.Conv3d):
    """``nn.Conv3d`` computing with ``W^``."""


_THRESHOLDED = {nn.Linear: ThresholdLinear, nn.Conv1d: ThresholdConv1d, nn.Conv2d: ThresholdConv2d,
                nn.Conv3d: ThresholdConv3d}
_PLAIN = {v: k for k, v in _THRESHOLDED.items()}


def _empty_like_layer(cls: type, m: nn.Module) -> nn.Module:
    """A module of class ``cls`` with ``m``'s hyper-parameters, built on the meta device (no RNG use)."""
    if issubclass(cls, nn.Linear):
        new = cls(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
    else:
        new = cls(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                  dilation=m.dilation, groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode,
                  device="meta")
    new.train(m.training)
    return new


def candidate_layers(model: nn.Module, include: Iterable[str] = ("*",), exclude: Iterable[str] = ()) -> list[str]:
    """Weight FQNs of the Conv1d/2d/3d and Linear layers a threshold can be put on, in model order.

    Candidates are the weights :func:`~dist_sparse.surgery.masking.sparsifiable_parameters` selects with
    the globs (so embeddings and a projection tied to them stay dense), restricted to modules of exactly
    those classes (a subclass may have its own forward) that are not part of an ``nn.MultiheadAttention``
    (which reads its projection weights without calling them). Already thresholded layers count too.
    """
    owners: dict[int, tuple[str, nn.Module]] = {}
    skip: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            skip.update(id(m) for m in module.modules())
        if (type(module) in _THRESHOLDED or type(module) in _PLAIN) and id(module.weight) not in owners:
            owners[id(module.weight)] = (name, module)
    out = []
    for pname, p in M.sparsifiable_parameters(model, list(include), list(exclude)):
        hit = owners.get(id(p))
        if hit is not None and id(hit[1]) not in skip and pname == (f"{hit[0]}.weight" if hit[0] else "weight"):
            out.append(pname)
    return out


def _replace(model: nn.Module, old_to_new: dict[int, nn.Module]) -> nn.Module:
    """Put the new modules wherever the old ones are referenced (a shared module in every parent)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in old_to_new:
                parent._modules[child_name] = old_to_new[id(child)]
    return old_to_new.get(id(model), model)


def apply_thresholds(model: nn.Module, weight_names: Iterable[str], s_init: float) -> nn.Module:
    """Replace the layers owning ``weight_names`` by thresholded versions (in place; returns the model).

    The new layer takes over the weight and bias parameters themselves and adds ``s = s_init``; a layer
    that is already thresholded is left as it is (so the surgery is idempotent).

    Args:
        model: a plain model.
        weight_names: FQNs such as ``"layer1.0.conv1.weight"`` (see :func:`candidate_layers`).
        s_init: initial threshold parameter (``T0 = sigmoid(s_init)``).

    Returns:
        the model (a new object only if the model itself is a selected layer).
    """
    modules = dict(model.named_modules())
    swap: dict[int, nn.Module] = {}
    for wname in weight_names:
        mname = wname[: -len(".weight")] if wname.endswith(".weight") else ""
        m = modules.get(mname)
        if m is None or isinstance(m, ThresholdedLayer) or id(m) in swap:
            continue
        cls = _THRESHOLDED.get(type(m))
        if cls is None:
            raise TypeError(f"apply_thresholds: {wname!r} belongs to a {type(m).__name__}, expected one of "
                            f"{', '.join(c.__name__ for c in _THRESHOLDED)}")
        new = _empty_like_layer(cls, m)
        new.weight = m.weight
        new.bias = m.bias
        new._init_threshold(m.weight, s_init)
        swap[id(m)] = new
    return _replace(model, swap)


def remove_thresholds(model: nn.Module) -> nn.Module:
    """The inverse surgery for inference: every thresholded layer becomes a plain Conv/Linear holding
    ``W^`` (exact zeros where pruned, the same values the thresholded forward computes); ``s`` is dropped.

    Args:
        model: a plain model with thresholded layers (modified in place).

    Returns:
        the model (a new object only if the model itself is a thresholded layer).
    """
    swap: dict[int, nn.Module] = {}
    with torch.no_grad():
        for _name, m in model.named_modules():
            if not isinstance(m, ThresholdedLayer) or id(m) in swap:
                continue
            new = _empty_like_layer(_PLAIN[type(m)], m)
            w_hat, _ = ThresholdFunction.apply(m.weight.detach(), m.s.detach(), 0.0, None, "union")
            new.weight = nn.Parameter(w_hat.detach().clone(), requires_grad=m.weight.requires_grad)
            new.bias = m.bias
            swap[id(m)] = new
    return _replace(model, swap)


def thresholded_modules(model: nn.Module) -> dict[str, ThresholdedLayer]:
    """Weight FQN (wrapper tokens removed) -> thresholded layer, in model order (works on wrapped models)."""
    out: dict[str, ThresholdedLayer] = {}
    seen: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, ThresholdedLayer) and id(m) not in seen:
            seen.add(id(m))
            clean = clean_name(name)
            out[f"{clean}.weight" if clean else "weight"] = m
    return out


def set_alpha(model: nn.Module, alpha: float) -> int:
    """Set the GA scale of every thresholded layer; returns how many layers there are."""
    mods = thresholded_modules(model)
    for m in mods.values():
        m.alpha = float(alpha)
    return len(mods)


def set_backward(model: nn.Module, density: float | None, mode: BackwardMode = "union") -> None:
    """Set the backward sparsity (TopK density ``b``, None = off) of every thresholded layer."""
    if mode not in BACKWARD_MODES:
        raise ValueError(f"backward mode {mode!r}; expected one of {BACKWARD_MODES}")
    for m in thresholded_modules(model).values():
        m.backward_density = None if density is None else float(density)
        m.backward_mode = mode
