"""Forward, sparse, training and inference FLOPs, from one counter (``torch.utils.flop_counter``).

Convention: **a multiply-add counts as 2 FLOPs**, as ``FlopCounterMode`` counts them. A
``Linear(i, o)`` on a batch of ``B`` vectors is ``2 * B * i * o`` FLOPs; a ``Conv2d`` is
``2 * B * C_out * (C_in / groups) * kh * kw * H_out * W_out``. Bias additions, norms, activations
and other elementwise ops count 0 (``FlopCounterMode`` only counts matmuls, convolutions and
attention). Scaled-dot-product attention is counted as its two batched matmuls on every device
(the CPU kernel, which ``FlopCounterMode`` does not know, is added here), so CPU and GPU agree.

Attribution: each FLOP is charged to the innermost module (in the call stack) that was running when
it happened. A module's *own* FLOPs are its FLOPs minus those of the modules it called, so an
attention module is charged with the ``q @ k^T`` and ``attn @ v`` matmuls and its ``qkv`` / ``proj``
linears with theirs. :class:`FlopReport` keeps those per-module numbers (``per_layer``), the FLOPs
charged to no reported module (``other``: the root module's own ops) and ``total``, with
``sum(per_layer.values()) + other == total``.

Sparse models: a layer whose weight has density ``d`` is charged ``d`` times its dense FLOPs (the
convention of the sparse-training literature, e.g. RigL, Evci et al. 2020); layers without a
density and non-weight FLOPs (attention matmuls, ``other``) stay dense. Training costs
(:func:`training_flops`): a dense step is 3 forwards (forward, backward to the activations, backward
to the weights).

Example::

    from dist_sparse.metrics.flops import layer_forward_flops, sparse_forward_flops, format_flops_table
    from dist_sparse.metrics.layer_stats import layer_stats
    report = layer_forward_flops(model, torch.zeros(1, 3, 32, 32))
    stats = layer_stats(model)
    print(sparse_forward_flops(report, stats) / report.total)   # sparse / dense forward
    print(format_flops_table(report, stats))

FLOP counting runs a forward pass of the *plain* (unsharded) model in a single process; it is not
a collective. Limitation: a module that uses a child's weight without calling the child (e.g.
``torch.nn.MultiheadAttention`` with its ``out_proj``) is charged with those FLOPs itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from dist_sparse import distributed as D
from dist_sparse.metrics.layer_stats import LayerStat, clean_name, global_density, layer_kind, layer_stats

__all__ = ["FLOP_CONVENTION", "TRAINING_MODES", "FlopReport", "flop_counter", "layer_forward_flops",
           "sparse_forward_flops", "training_flops", "RunFlops", "effective_forward_flops",
           "format_flops_table", "flops_summary"]

FLOP_CONVENTION = "a multiply-add counts as 2 FLOPs (torch.utils.flop_counter.FlopCounterMode)"

TRAINING_MODES = ("dense", "sparse", "sparse_fwd_dense_bwd")

Densities = Mapping[str, Union[float, LayerStat]]


# ------------------------------------------------------------------------------------------------
# The counter
# ------------------------------------------------------------------------------------------------


def _sdpa_matmul_flops(query_shape, key_shape, value_shape) -> int:
    """``q @ k^T`` plus ``scores @ v`` of (B, H, L, E) tensors, 2 FLOPs per multiply-add."""
    *bh, s_q, d_q = query_shape
    s_k = key_shape[-2]
    d_v = value_shape[-1]
    n = math.prod(bh)
    return 2 * n * s_q * s_k * d_q + 2 * n * s_q * s_k * d_v


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _sdpa_matmul_flops(query_shape, key_shape, value_shape)


def _extra_formulas() -> dict[Any, Any]:
    extra: dict[Any, Any] = {}
    try:
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    except (AttributeError, RuntimeError):  # pragma: no cover - very old torch
        return extra
    if op not in flop_registry:
        extra[op] = _cpu_sdpa_flop
    return extra


_EXTRA_FORMULAS = _extra_formulas()


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` with this module's formulas (CPU attention included)."""
    return FlopCounterMode(display=False, custom_mapping=dict(_EXTRA_FORMULAS))


# ------------------------------------------------------------------------------------------------
# Per-layer forward FLOPs
# ------------------------------------------------------------------------------------------------


@dataclass
class FlopReport:
    """Forward FLOPs of one pass over a batch, per module (see the module docstring for conventions).

    Attributes:
        per_layer: clean module FQN -> FLOPs charged to that module itself, in model order. Every
            Conv/Linear/Embedding of the model has an entry (0 when it computed nothing, e.g. an
            embedding lookup or an unused head); any other module with FLOPs of its own (attention
            matmuls) too. A root module that is itself a layer is named ``""``.
        total: all FLOPs of the pass.
        batch_size: samples in the batch the counts are for.
        other: FLOPs charged to no entry of ``per_layer``: ``total - sum(per_layer.values())``.
        kinds: module FQN -> ``"conv"``, ``"linear"``, ``"embedding"`` or the class name of another
            module (``"Attention"``).
    """

    per_layer: dict[str, float]
    total: float
    batch_size: int
    other: float = 0.0
    kinds: dict[str, str] = field(default_factory=dict)

    def per_sample(self) -> "FlopReport":
        """The same report divided by ``batch_size`` (``batch_size`` becomes 1)."""
        b = float(self.batch_size)
        return FlopReport(per_layer={k: v / b for k, v in self.per_layer.items()}, total=self.total / b,
                          batch_size=1, other=self.other / b, kinds=dict(self.kinds))

    def scaled(self, samples: int) -> "FlopReport":
        """The FLOPs of a batch of ``samples`` (assumes FLOPs are linear in the batch size)."""
        one = self.per_sample()
        return FlopReport(per_layer={k: v * samples for k, v in one.per_layer.items()},
                          total=one.total * samples, batch_size=int(samples), other=one.other * samples,
                          kinds=one.kinds)

    @property
    def layers_total(self) -> float:
        """``sum(per_layer.values())``."""
        return float(sum(self.per_layer.values()))

    def to_dict(self) -> dict:
        """Plain python values (e.g. for JSON or a checkpoint)."""
        return {"per_layer": dict(self.per_layer), "total": float(self.total), "batch_size": int(self.batch_size),
                "other": float(self.other), "kinds": dict(self.kinds)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FlopReport":
        """Inverse of :meth:`to_dict`."""
        return cls(per_layer={str(k): float(v) for k, v in d["per_layer"].items()}, total=float(d["total"]),
                   batch_size=int(d["batch_size"]), other=float(d.get("other", 0.0)),
                   kinds={str(k): str(v) for k, v in d.get("kinds", {}).items()})


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, Mapping):
        x = list(x.values())
    if isinstance(x, (tuple, list)):
        for v in x:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def _call(model: nn.Module, x: Any) -> Any:
    if isinstance(x, Mapping):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def layer_forward_flops(model: nn.Module, example_input: Any, *, batch_size: int | None = None) -> FlopReport:
    """Count the forward FLOPs of ``model`` on ``example_input``, per module.

    The pass runs under ``torch.no_grad()`` with every module in eval mode (dropout and drop-path
    off); each module's train/eval flag is restored afterwards. A finalized model (pruned channels,
    low-rank factors) is counted as it is: the counter sees its smaller layers. Zero weights are not
    discounted here; see :func:`sparse_forward_flops` / :func:`effective_forward_flops`.

    Args:
        model: a plain (unsharded) module, e.g. the unwrapped model or a gathered copy.
        example_input: a tensor (``model(x)``), a tuple/list (``model(*x)``) or a dict
            (``model(**x)``) on the model's device.
        batch_size: samples in ``example_input``; default: dim 0 of its first tensor.

    Returns:
        a :class:`FlopReport` for the whole batch (``report.per_sample()`` for one sample).

    Raises:
        ValueError: for a sharded model (FSDP2 / ZeRO-3 parameters) or when the batch size cannot be
            inferred.
    """
    for name, p in model.named_parameters():
        if D.layout(p) != "plain":
            raise ValueError(f"layer_forward_flops needs a plain model; parameter {name!r} is "
                             f"{D.layout(p)}-sharded (count FLOPs on an unwrapped, unsharded copy)")
    if batch_size is None:
        t = _first_tensor(example_input)
        if t is None:
            raise ValueError("layer_forward_flops: no tensor in example_input; pass batch_size")
        batch_size = int(t.shape[0]) if t.dim() > 0 else 1
    if batch_size < 1:
        raise ValueError(f"layer_forward_flops: batch_size = {batch_size}; expected >= 1")

    names: dict[nn.Module, str] = {}
    kinds: dict[str, str] = {}
    for raw, module in model.named_modules():  # deduplicated: a shared module keeps its first name
        name = clean_name(raw)
        names[module] = name
        kind = layer_kind(module)
        if kind is not None:
            kinds.setdefault(name, kind)
    own: dict[str, int] = {}
    stack: list[list] = []  # frames [name, counter total at entry, FLOPs of nested calls]
    counter = flop_counter()

    def pre_hook(module: nn.Module, args: Any) -> None:
        stack.append([names[module], counter.get_total_flops(), 0])

    def post_hook(module: nn.Module, args: Any, output: Any) -> None:
        name, start, nested = stack.pop()
        inclusive = counter.get_total_flops() - start
        own[name] = own.get(name, 0) + inclusive - nested
        if stack:
            stack[-1][2] += inclusive

    was_training = {m: m.training for m in model.modules()}
    handles = []
    try:
        for module in names:
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(post_hook, always_call=True))
        model.eval()
        with torch.no_grad(), counter:
            _call(model, example_input)
    finally:
        for h in handles:
            h.remove()
        for m, flag in was_training.items():
            m.training = flag

    total = counter.get_total_flops()
    per_layer: dict[str, float] = {}
    report_kinds: dict[str, str] = {}
    charged = 0
    for module, name in names.items():  # model order
        if name in per_layer:
            continue
        flops = own.get(name, 0)
        is_layer = name in kinds
        if (module is model and not is_layer) or (not is_layer and flops == 0):
            continue
        per_layer[name] = float(flops)
        report_kinds[name] = kinds.get(name, type(module).__name__)
        charged += flops
    return FlopReport(per_layer=per_layer, total=float(total), batch_size=int(batch_size),
                      other=float(total - charged), kinds=report_kinds)


# ------------------------------------------------------------------------------------------------
# Sparse and training FLOPs
# ------------------------------------------------------------------------------------------------


def _resolve_densities(report: FlopReport, densities: Densities | None, strict: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    if not densities:
        return out
    unknown = []
    for key, value in densities.items():
        d = value.density if isinstance(value, LayerStat) else float(value)
        name = clean_name(key)
        if name not in report.per_layer:
            if name == "weight":
                name = ""
            elif name.endswith(".weight"):
                name = name[: -len(".weight")]
        if name not in report.per_layer:
            unknown.append(key)
            continue
        if not (0.0 <= d <= 1.0) or math.isnan(d):
            raise ValueError(f"density of {key!r} is {d}; expected a value in [0, 1]")
        out[name] = d
    if unknown and strict:
        raise KeyError(f"densities for layers the report does not have: {unknown[:8]}"
                       f"{' ...' if len(unknown) > 8 else ''} (pass strict=False to ignore them)")
    return out


def sparse_forward_flops(report: FlopReport, densities: Densities | None, *, strict: bool = True) -> float:
    """Forward FLOPs when each layer's FLOPs scale with the density of its weight.

    ``F_S = sum_l f_l * d_l + other``, where layers missing from ``densities`` count dense
    (``d_l = 1``).

    Args:
        report: from :func:`layer_forward_flops` (batch or per-sample; the result has its scale).
        densities: layer -> weight density in [0, 1], or the dict of :func:`layer_stats`
            (``LayerStat`` values). Keys are module FQNs (``"layer1.0.conv1"``) or weight names
            (``"layer1.0.conv1.weight"``); wrapper tokens are ignored.
        strict: raise ``KeyError`` for a key that names no layer of the report.

    Returns:
        the sparse forward FLOPs.
    """
    dens = _resolve_densities(report, densities, strict)
    return float(sum(f * dens.get(n, 1.0) for n, f in report.per_layer.items()) + report.other)


def training_flops(report: FlopReport, densities: Densities | None = None, mode: str = "dense", *,
                   strict: bool = True) -> float:
    """FLOPs of one training step on the report's batch (forward + backward).

    With ``F_D = report.total`` (dense forward) and ``F_S = sparse_forward_flops(report, densities)``:

    * ``"dense"``: ``3 * F_D`` (forward, backward to activations, backward to weights; ``densities``
      is ignored);
    * ``"sparse"``: ``3 * F_S`` (all three passes use the sparse weights, e.g. SET, static masks, RigL
      between updates);
    * ``"sparse_fwd_dense_bwd"``: ``2 * F_S + F_D`` (sparse forward and backward to activations, the
      gradient of every weight dense: RigL on an update step, AutoSparse with ``alpha != 0``).

    Args:
        report: from :func:`layer_forward_flops`.
        densities: as for :func:`sparse_forward_flops` (None = dense).
        mode: one of :data:`TRAINING_MODES`.
        strict: as for :func:`sparse_forward_flops`.

    Returns:
        the step's FLOPs for ``report.batch_size`` samples.
    """
    if mode not in TRAINING_MODES:
        raise ValueError(f"training_flops: mode = {mode!r}; expected one of {list(TRAINING_MODES)}")
    f_d = float(report.total)
    if mode == "dense":
        return 3.0 * f_d
    f_s = sparse_forward_flops(report, densities, strict=strict)
    if mode == "sparse":
        return 3.0 * f_s
    return 2.0 * f_s + f_d


class RunFlops:
    """Training FLOPs accumulated over the steps of a run, and their fraction of dense training.

    Args:
        report: forward FLOPs of the architecture (from :func:`layer_forward_flops`).
        samples_per_step: samples per optimizer step (global batch); default: ``report.batch_size``.

    Example::

        run = RunFlops(report, samples_per_step=global_batch)
        for step in ...:
            run.add_step(method_densities, "sparse_fwd_dense_bwd" if update_step else "sparse")
        log({"flops/train_total": run.total, "flops/train_fraction": run.fraction()})
    """

    def __init__(self, report: FlopReport, samples_per_step: int | None = None):
        self.report = report if samples_per_step is None else report.scaled(samples_per_step)
        self.total = 0.0
        self.dense_total = 0.0
        self.steps = 0

    def add_step(self, densities: Densities | None = None, mode: str = "sparse", steps: int = 1) -> float:
        """Add ``steps`` training steps at ``densities`` in ``mode`` (see :func:`training_flops`).

        Returns:
            the FLOPs added.
        """
        if steps < 0:
            raise ValueError(f"RunFlops.add_step: steps = {steps}; expected >= 0")
        flops = training_flops(self.report, densities, mode) * steps
        self.total += flops
        self.dense_total += training_flops(self.report, None, "dense") * steps
        self.steps += int(steps)
        return flops

    def fraction(self) -> float:
        """Accumulated FLOPs / those of dense training for the same steps (NaN before any step)."""
        return self.total / self.dense_total if self.dense_total else float("nan")

    def state_dict(self) -> dict:
        """``{"total": float, "dense_total": float, "steps": int}``."""
        return {"total": float(self.total), "dense_total": float(self.dense_total), "steps": int(self.steps)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` (the report is not part of the state)."""
        missing = {"total", "dense_total", "steps"} - set(state)
        if missing:
            raise KeyError(f"RunFlops.load_state_dict: missing keys {sorted(missing)}")
        self.total = float(state["total"])
        self.dense_total = float(state["dense_total"])
        self.steps = int(state["steps"])


# ------------------------------------------------------------------------------------------------
# Inference FLOPs, tables, summaries
# ------------------------------------------------------------------------------------------------


def effective_forward_flops(model: nn.Module, example_input: Any, *, report: FlopReport | None = None,
                            stats: Mapping[str, LayerStat] | None = None) -> float:
    """Forward FLOPs of ``model`` on ``example_input`` with each layer discounted by its weight density.

    ``sum_l f_l * density_l + non-layer FLOPs``; for a finalized (physically smaller) model ``f_l``
    are already those of the smaller layers.

    Args:
        model: a plain module.
        example_input: as for :func:`layer_forward_flops`.
        report: a precomputed :func:`layer_forward_flops` of this model and input.
        stats: a precomputed :func:`layer_stats` of this model.

    Returns:
        the FLOPs for the whole ``example_input`` batch.
    """
    report = layer_forward_flops(model, example_input) if report is None else report
    stats = layer_stats(model) if stats is None else stats
    return sparse_forward_flops(report, stats, strict=False)


def _mflops(x: float) -> str:
    m = x / 1e6
    if m == 0 or abs(m) >= 0.01:
        return f"{m:,.3f}"
    return f"{m:.3e}"


def format_flops_table(report: FlopReport, stats: Mapping[str, LayerStat] | None = None) -> str:
    """A fixed-width per-layer table of forward FLOPs per sample (MFLOPs = 1e6 FLOPs).

    Columns: layer, kind, weight shape, weight params, density, dense and sparse forward MFLOPs per
    sample. Rows follow ``report.per_layer``, then ``(other)`` and ``total``. Without ``stats`` the
    shape, params and density columns show ``-`` and the sparse column equals the dense one.

    Args:
        report: from :func:`layer_forward_flops`.
        stats: from :func:`layer_stats` of the same model (densities for the sparse column).

    Returns:
        the table as one string (no trailing newline).
    """
    one = report.per_sample()
    stats = {} if stats is None else dict(stats)
    dens = _resolve_densities(one, stats, strict=False)
    header = ["layer", "kind", "shape", "params", "density", "MFLOPs/sample", "sparse MFLOPs"]
    rows = []
    for name, f in one.per_layer.items():
        s = stats.get(name)
        rows.append([name or "(root)", one.kinds.get(name, "-"),
                     "x".join(map(str, s.shape)) if s else "-", f"{s.numel:,}" if s else "-",
                     f"{s.density:.4f}" if s else "-", _mflops(f), _mflops(f * dens.get(name, 1.0))])
    rows.append(["(other)", "-", "-", "-", "-", _mflops(one.other), _mflops(one.other)])
    shown = {n: s for n, s in stats.items() if n in one.per_layer}
    params = sum(s.numel for s in shown.values() if s.tied_to is None or s.tied_to not in shown)
    total_row = ["total", "", "", f"{params:,}" if shown else "-",
                 f"{global_density(shown):.4f}" if shown else "-", _mflops(one.total),
                 _mflops(sparse_forward_flops(one, dens))]
    widths = [max(len(r[i]) for r in [header, *rows, total_row]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        left = [r[i].ljust(widths[i]) for i in range(3)]
        right = [r[i].rjust(widths[i]) for i in range(3, len(r))]
        return "  ".join(left + right).rstrip()

    rule = "-" * len(line([("x" * w) for w in widths]))
    return "\n".join([line(header), rule, *[line(r) for r in rows], rule, line(total_row)])


def flops_summary(model: nn.Module, example_input: Any,
                  dense_reference: nn.Module | FlopReport | float | None = None) -> dict[str, float]:
    """Flat per-sample forward FLOP metrics of ``model`` for a run's log / final table.

    Keys:

    * ``flops/forward_dense``: forward FLOPs per sample of the architecture as it is (a finalized,
      smaller model counts its smaller layers), zeros not discounted;
    * ``flops/forward_effective``: the same, each layer discounted by its weight density;
    * ``flops/forward_fraction``: ``forward_effective`` / the dense reference's forward per sample,
      or / ``forward_dense`` without a reference.

    Args:
        model: a plain module (gathered / unwrapped).
        example_input: as for :func:`layer_forward_flops`.
        dense_reference: the dense baseline: a module (counted on ``example_input``), its
            :class:`FlopReport`, or its forward FLOPs per sample as a number.

    Returns:
        ``{key: float}``.
    """
    report = layer_forward_flops(model, example_input)
    one = report.per_sample()
    effective = sparse_forward_flops(one, layer_stats(model), strict=False)
    if dense_reference is None:
        ref = one.total
    elif isinstance(dense_reference, FlopReport):
        ref = dense_reference.per_sample().total
    elif isinstance(dense_reference, nn.Module):
        ref = layer_forward_flops(dense_reference, example_input).per_sample().total
    else:
        ref = float(dense_reference)
    return {"flops/forward_dense": float(one.total), "flops/forward_effective": float(effective),
            "flops/forward_fraction": float(effective / ref) if ref else float("nan")}
