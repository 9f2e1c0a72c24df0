"""Polarization-regularized gating: one-pass training of a consensus sub-network (Zhi et al., arXiv 2302.10798).

Every residual block of a ResNet gets an input-dependent binary gate (layer pruning: one gate per block;
channel pruning: one gate per channel before / in the middle of / after the branch) produced by a small
head with a straight-through estimator (:mod:`dist_sparse.surgery.gates`). The loss adds

    lambda_polar * R_polar + lambda_act * R_act,
    R_polar = mean_l mean_c (1 - gbar_lc) * gbar_lc,     R_act = mean_l mean_c gbar_lc,

where gbar is the mean of a gate over the samples of the *global* batch (all ranks:
:func:`dist_sparse.distributed.global_sum`, so value and gradient equal the single-process ones). The
inverted parabola is zero only when each gate is open for every sample or closed for every sample, so
the per-sample sub-networks collapse into one shared sub-network while training. lambda_act (fixed, or
driven by an optional controller towards ``target_sparsity``) pushes gates closed.

At the end of training (or at the end of epoch ``E - 1 - finetune_epochs`` when fine-tuning follows) a
calibration pass over training batches without augmentation, in eval mode with live hard gates, counts
how often each gate is open (int64, all-reduced over ranks after broadcasting rank 0's BatchNorm
buffers); ``p >= tau`` keeps a unit. The mask is checked to be identical on every rank, and a
:class:`~dist_sparse.methods.base.Rebuild` removes the closed blocks and channels physically
(:mod:`dist_sparse.surgery.channels`): the result is an ordinary smaller ResNet, described by
:meth:`Polarization.architecture` so that ``dist_sparse.load_exported`` rebuilds it without gates.

Only ResNets (BasicBlock/Bottleneck) are supported; DeiT and the Transformer are refused.
"""
from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import nn

from .. import distributed as D
from ..errors import ConfigError, check_range
from ..surgery import channels as C
from ..surgery import gates as G
from .base import Method, MethodConfig, Rebuild, RunContext, register_method

__all__ = ["PolarizationConfig", "Polarization", "polar_terms", "weighted_act", "derive_consensus", "HIST_BINS"]

log = logging.getLogger(__name__)

HIST_BINS = 10  # bins of the per-epoch histogram of mean gate values over [0, 1]


@dataclass
class PolarizationConfig(MethodConfig):
    """Polarization-regularized gating (layer or channel pruning of ResNets)."""

    name: str = "polarization"  # method name
    gating: Literal["layer", "channel"] = "layer"  # layer: one gate per residual block; channel: one per channel
    position: Literal["before", "middle", "after"] = "after"  # channel gates: input of conv1, after conv1, end of branch
    gate_depth: int = 2  # dense layers of a gate head: 1 (1FC) or 2 (2FC)
    gate_hidden: int = 16  # width d of the first layer of a 2FC head
    gate_init_bias: float = 0.5  # initial bias of the last gate layer (> 0: every gate starts open)
    gate_init_std: float = 0.01  # std of the initial gate weights (logits start inside the STE window)
    gate_head: Literal["ste"] = "ste"  # gate head: straight-through step (the Bernoulli/Gumbel ablations are not built)
    lambda_polar: float = 1.0  # weight of R_polar (constant schedule) or its final value (ramp)
    polar_schedule: Literal["constant", "ramp"] = "constant"  # ramp: 0 before ramp_start, linear up to ramp_end
    ramp_start: float = 0.3  # ramp: fraction of training where lambda_polar starts rising from 0
    ramp_end: float = 0.6  # ramp: fraction of training where lambda_polar reaches its value
    lambda_act: float = 0.0  # weight of R_act (initial value when the controller is on)
    act_weighting: Literal["uniform", "params"] = "uniform"  # R_act: mean of layer means (paper) or parameter-weighted
    target_sparsity: float = -1.0  # controller target: fraction of prunable parameters removed (< 0: off)
    controller_eta: float = 0.5  # integral gain: integral += eta * (target - achieved), clipped to [floor, 1]
    controller_interval: int = 0  # optimizer steps between controller updates (0: once per epoch)
    controller_kp: float = 0.0  # proportional gain: lambda_act = integral + kp * (target - achieved) (0: integral only)
    controller_floor: float = 0.0  # lowest lambda_act the controller sets (< 0: R_act may reward open gates)
    tau: float = 0.5  # consensus threshold: a unit is kept when its open fraction p >= tau
    calibration_batches: int = 16  # training batches (no augmentation) of the consensus pass
    finetune_epochs: int = 0  # 0: prune at the end of training; k: prune after epoch E-1-k, then fine-tune k epochs

    def validate(self) -> None:
        check_range("method.act_weighting", self.act_weighting, self.act_weighting in ("uniform", "params"),
                    "uniform (mean of layer means, the paper) or params (each gate by the parameters it removes)")
        check_range("method.gate_depth", self.gate_depth, self.gate_depth in (1, 2), "1 (1FC) or 2 (2FC)")
        check_range("method.gate_hidden", self.gate_hidden, self.gate_hidden >= 1, "an integer >= 1")
        check_range("method.gate_init_std", self.gate_init_std, self.gate_init_std >= 0, "a number >= 0")
        check_range("method.lambda_polar", self.lambda_polar, self.lambda_polar >= 0, "a number >= 0")
        check_range("method.lambda_act", self.lambda_act, 0 <= self.lambda_act <= 1, "a number in [0, 1]")
        check_range("method.ramp_start", self.ramp_start, 0 <= self.ramp_start <= 1, "a fraction in [0, 1]")
        check_range("method.ramp_end", self.ramp_end, self.ramp_start <= self.ramp_end <= 1,
                    f"a fraction in [method.ramp_start = {self.ramp_start}, 1]")
        check_range("method.target_sparsity", self.target_sparsity,
                    self.target_sparsity < 0 or self.target_sparsity < 1, "a fraction in [0, 1), or < 0 (off)")
        check_range("method.controller_eta", self.controller_eta, self.controller_eta > 0, "a number > 0")
        check_range("method.controller_kp", self.controller_kp, self.controller_kp >= 0, "a number >= 0 (0: off)")
        check_range("method.controller_floor", self.controller_floor, -1 <= self.controller_floor <= 0,
                    "a number in [-1, 0] (0: lambda_act stays in [0, 1] as in the paper)")
        check_range("method.controller_interval", self.controller_interval, self.controller_interval >= 0,
                    "an integer >= 0 (0: once per epoch)")
        check_range("method.tau", self.tau, 0 < self.tau <= 1, "a number in (0, 1]")
        check_range("method.calibration_batches", self.calibration_batches, self.calibration_batches >= 1,
                    "an integer >= 1")
        check_range("method.finetune_epochs", self.finetune_epochs, self.finetune_epochs >= 0, "an integer >= 0")


# ------------------------------------------------------------------------------------------------
# The regularizer and the consensus decision (functions, so tests can call them directly)
# ------------------------------------------------------------------------------------------------


def polar_terms(gbars: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(R_polar, R_act) of per-layer mean gates ``gbars`` (each (n_l,)): means of per-layer means.

    R_polar = (1/|L|) sum_l (1/|C_l|) sum_c (1 - gbar) gbar; R_act = (1/|L|) sum_l (1/|C_l|) sum_c gbar.
    A layer gate is the case |C_l| = 1.
    """
    polar = torch.stack([((1 - g) * g).mean() for g in gbars]).mean()
    act = torch.stack([g.mean() for g in gbars]).mean()
    return polar, act


def weighted_act(gbars: list[torch.Tensor], units: list[list[int]]) -> torch.Tensor:
    """Parameter-weighted R_act: sum_lc p_lc gbar_lc / sum_lc p_lc, ``p_lc`` the parameters unit c of layer l removes.

    In [0, 1] like the uniform R_act; its gradient on a gate is the share of the prunable parameters that
    gate controls, so a parameter target is reached by closing the expensive units rather than the cheap ones.
    """
    w = [torch.tensor(u, dtype=torch.float32, device=g.device) for g, u in zip(gbars, units)]
    total = float(sum(sum(u) for u in units))
    return torch.stack([(wl * g).sum() for wl, g in zip(w, gbars)]).sum() / max(total, 1.0)


def global_gate_means(gates: list[torch.Tensor]) -> list[torch.Tensor]:
    """Mean of every gate over the samples of all ranks (differentiable; one collective).

    ``gates``: per layer the (B_local, n_l) gates of this rank. Sums and the sample count are packed into
    one :func:`~dist_sparse.distributed.global_sum`; its gradient, averaged over ranks by the backend,
    is the single-process gradient on the global batch (also for unequal local batch sizes).
    """
    n_local = gates[0].shape[0]
    dev = gates[0].device
    packed = torch.cat([g.float().sum(0) for g in gates]
                       + [torch.full((1,), float(n_local), device=dev, dtype=torch.float32)])
    tot = D.global_sum(packed)
    n = tot[-1].detach()
    out, off = [], 0
    for g in gates:
        k = g.shape[1]
        out.append(tot[off:off + k] / n)
        off += k
    return out


@torch.no_grad()
def derive_consensus(model: nn.Module, batches, forward, tau: float = 0.5) -> dict[str, Any]:
    """The consensus mask of a gated model from a calibration pass (a collective: every rank calls it).

    Rank 0's buffers are broadcast first; the model runs in eval mode with live hard gates; per gate the
    open count and the sample count are accumulated in int64 and all-reduced; ``p >= tau`` keeps (float64).
    The mask is checked to be bit-identical on every rank (raises otherwise).

    Returns:
        ``{"keep": {block: [kept indices]}, "p": {block: [open fractions]}, "unification", "sample_agreement",
        "max_ambiguity", "samples", "checksum"}``.
    """
    blocks = G.gated_blocks(model)
    if not blocks:
        raise ValueError("derive_consensus: the model has no gated block")
    D.broadcast_buffers(model)
    was_training = model.training
    model.eval()
    counts: Optional[torch.Tensor] = None
    n_local = 0
    vectors = []
    try:
        for batch in batches:
            forward(model, batch)
            g = torch.cat([(b.last_gates > 0.5).reshape(b.last_gates.shape[0], -1) for _, b in blocks], dim=1)
            for _, b in blocks:
                b.last_gates = None
            c = g.sum(0, dtype=torch.int64)
            counts = c if counts is None else counts + c
            n_local += g.shape[0]
            vectors.append(g.to(torch.uint8).cpu())
    finally:
        model.train(was_training)
    if counts is None:
        raise ValueError("derive_consensus: the calibration gave no batch")
    dev = counts.device
    red = D.all_reduce_coalesced({"open": counts, "n": torch.tensor([n_local], dtype=torch.int64, device=dev)})
    n_total = int(red["n"].item())
    p = red["open"].double().cpu() / max(1, n_total)
    keep = p >= tau
    mask = keep.to(torch.uint8)
    D.assert_same_across_ranks(mask, "polarization consensus mask")
    agree_local = sum(int((v == mask).all(dim=1).sum()) for v in vectors)
    agree = D.all_reduce_coalesced({"a": torch.tensor([agree_local], dtype=torch.int64, device=dev)})["a"]
    checksum = int((torch.arange(mask.numel(), dtype=torch.int64) * mask.long()).sum())
    out_keep, out_p, off = {}, {}, 0
    for name, b in blocks:
        k = b.gated_width()
        out_keep[name] = [i for i in range(k) if bool(keep[off + i])]
        out_p[name] = [float(x) for x in p[off:off + k]]
        off += k
    return {"keep": out_keep, "p": out_p, "samples": n_total, "checksum": checksum,
            "unification": float(((p == 0) | (p == 1)).double().mean()),
            "sample_agreement": float(agree.item()) / max(1, n_total),
            "max_ambiguity": float(torch.minimum(p, 1 - p).max())}


# ------------------------------------------------------------------------------------------------
# The method
# ------------------------------------------------------------------------------------------------


@register_method
class Polarization(Method):
    """Gates + polarization regularizer during training; consensus mask and physical pruning at the end."""

    name, Config = "polarization", PolarizationConfig

    def __init__(self, cfg: PolarizationConfig, *, seed: int = 0):
        super().__init__(cfg, seed=seed)
        self.step = 0  # optimizer steps taken
        self.lambda_act = float(cfg.lambda_act)  # current lambda_act (moved by the controller)
        self._la_int = float(cfg.lambda_act)  # the controller's integral part
        if cfg.target_sparsity >= 0 and cfg.controller_kp > 0:  # all gates start open: achieved rate 0
            self.lambda_act = min(1.0, max(0.0, self._la_int + cfg.controller_kp * cfg.target_sparsity))
        self.pruned: Optional[dict[str, Any]] = None  # the pruning decision once the model is pruned
        self.consensus: dict[str, Any] = {}  # unification, agreement, ... of the decision
        self.history: list[dict[str, Any]] = []  # per epoch: open fraction per layer, R values, histogram
        self._reset_epoch()
        self._ctl = [None, 0]  # controller accumulator: (sum of per-gate gbar, count)
        self._units: Optional[list[list[int]]] = None  # parameters per unit (from bind)
        self._total_params = 0
        self._layer_names: list[str] = []
        self._last: dict[str, float] = {}
        self._flops: dict[str, float] = {}  # FLOPs of the pruned model (rank 0, from the surgery)

    def _reset_epoch(self) -> None:
        self._ep_gbar: Optional[torch.Tensor] = None  # sum over steps of every gate's gbar (float64)
        self._ep_polar = 0.0
        self._ep_act = 0.0
        self._ep_n = 0

    # -- surgery -----------------------------------------------------------------------------------
    def _check_model(self, model: nn.Module) -> None:
        if not any(True for _ in G.residual_blocks(model)):
            raise ConfigError("model.name", type(model).__name__,
                              "a ResNet (resnet20/32/56/18/34/50): polarization gates only ResNet blocks "
                              "(DeiT / Transformer gates are not implemented)")
        if self.cfg.gating == "channel":
            for _, m in model.named_modules():
                if isinstance(m, nn.GroupNorm):
                    raise ConfigError("model.norm", "gn", "bn or none for method.gating=channel "
                                      "(GroupNorm mixes the channels of a group)")

    def prepare(self, model: nn.Module) -> nn.Module:
        self._check_model(model)
        if self.pruned is not None:
            return C.prune_resnet(model, self.pruned)
        c = self.cfg
        return G.insert_gates(model, c.gating, c.position, c.gate_depth, c.gate_hidden, c.gate_init_bias,
                              c.gate_init_std, seed=self.seed)

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        self._epochs = max(1, ctx.total_steps // max(1, ctx.steps_per_epoch))

    def bind(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().bind(model, optimizer)
        blocks = G.gated_blocks(model)
        self._layer_names = [n for n, _ in blocks]
        self._units = [C.unit_param_counts(b) for _, b in blocks] if blocks else None
        self._total_params = C.count_params(model)

    # -- schedules ---------------------------------------------------------------------------------
    def lambda_polar(self, step: Optional[int] = None) -> float:
        """lambda_polar at optimizer step ``step`` (default: the current one)."""
        c = self.cfg
        if c.polar_schedule == "constant":
            return float(c.lambda_polar)
        t = (self.step if step is None else step) / max(1, self._ctx().total_steps)
        if t < c.ramp_start:
            return 0.0
        if c.ramp_end <= c.ramp_start or t >= c.ramp_end:
            return float(c.lambda_polar)
        return float(c.lambda_polar) * (t - c.ramp_start) / (c.ramp_end - c.ramp_start)

    # -- the loss term -----------------------------------------------------------------------------
    def regularizer(self, model: nn.Module) -> Optional[torch.Tensor]:
        blocks = G.gated_blocks(model)
        if not blocks or any(b.last_gates is None for _, b in blocks):
            return None
        gates = [b.last_gates for _, b in blocks]
        for _, b in blocks:
            b.last_gates = None
        gbars = global_gate_means(gates)
        polar, act = polar_terms(gbars)
        if self.cfg.act_weighting == "params" and self._units:
            act = weighted_act(gbars, self._units)
        flat = torch.cat([g.detach().double().cpu() for g in gbars])
        self._ep_gbar = flat.clone() if self._ep_gbar is None else self._ep_gbar + flat
        self._ep_polar += float(polar.detach())
        self._ep_act += float(act.detach())
        self._ep_n += 1
        self._ctl = [flat.clone() if self._ctl[0] is None else self._ctl[0] + flat, self._ctl[1] + 1]
        self._last = {"R_polar": float(polar.detach()), "R_act": float(act.detach())}
        lp = self.lambda_polar()
        return lp * polar + self.lambda_act * act

    def after_step(self, model: nn.Module, step: int) -> None:
        self.step = step + 1
        if self.pruned is None and self.cfg.controller_interval and self.step % self.cfg.controller_interval == 0:
            self._control()

    # -- controller --------------------------------------------------------------------------------
    def prune_rate(self, gbar: torch.Tensor) -> float:
        """Eq. 11 of the paper from per-gate open fractions: removed prunable parameters / all (no gates)."""
        if not self._units or not self._total_params:
            return 0.0
        units = torch.tensor([u for layer in self._units for u in layer], dtype=torch.float64)
        return float((units * (1 - gbar)).sum()) / self._total_params

    def _control(self) -> None:
        if self.cfg.target_sparsity < 0 or self._ctl[0] is None:
            self._ctl = [None, 0]
            return
        c = self.cfg
        err = c.target_sparsity - self.prune_rate(self._ctl[0] / self._ctl[1])
        self._la_int = min(1.0, max(c.controller_floor, self._la_int + c.controller_eta * err))
        self.lambda_act = min(1.0, max(c.controller_floor, self._la_int + c.controller_kp * err))
        self._ctl = [None, 0]

    # -- epoch ends and the decision ---------------------------------------------------------------
    def _epoch_summary(self, epoch: int) -> Optional[dict[str, Any]]:
        """The statistics of the epoch so far (None before its first step)."""
        if self._ep_gbar is None:
            return None
        gbar = self._ep_gbar / self._ep_n
        per_layer, off = {}, 0
        for name, units in zip(self._layer_names, self._units or []):
            per_layer[name] = float(gbar[off:off + len(units)].mean())
            off += len(units)
        hist = torch.histc(gbar.float(), bins=HIST_BINS, min=0.0, max=1.0)
        return {"epoch": int(epoch), "open": per_layer, "R_polar": self._ep_polar / self._ep_n,
                "R_act": self._ep_act / self._ep_n, "hist": [int(h) for h in hist],
                "prune_rate": self.prune_rate(gbar), "lambda_act": self.lambda_act,
                "lambda_polar": self.lambda_polar()}

    def _close_epoch(self, epoch: int) -> None:
        h = self._epoch_summary(epoch)
        if h is not None:
            self.history.append(h)
        self._reset_epoch()

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: dict[str, Any] | None = None) -> Rebuild | None:
        if self.pruned is not None:
            return None
        self._close_epoch(epoch)
        if not self.cfg.controller_interval:
            self._control()
        if self.cfg.finetune_epochs and epoch == self._epochs - 1 - self.cfg.finetune_epochs:
            return self._decide(model, f"polarization: prune at epoch {epoch}, then fine-tune")
        return None

    def on_train_end(self, model: nn.Module) -> Rebuild | None:
        if self.pruned is not None:
            return None
        self._close_epoch(self._epochs - 1)
        return self._decide(model, "polarization: prune at the end of training")

    def _decide(self, model: nn.Module, reason: str) -> Rebuild:
        ctx = self._ctx()
        if ctx.calibration is None or ctx.forward is None:
            raise RuntimeError("polarization needs RunContext.calibration and .forward for the consensus pass")
        res = derive_consensus(model, ctx.calibration(self.cfg.calibration_batches), ctx.forward, self.cfg.tau)
        arch = {"gating": self.cfg.gating, "position": self.cfg.position, "blocks": res["keep"]}
        kept = sum(len(v) for v in res["keep"].values())
        total = sum(len(v) for v in res["p"].values())
        info = {k: res[k] for k in ("unification", "sample_agreement", "max_ambiguity", "samples", "checksum")}
        info.update(units_kept=kept, units_total=total, step=self.step)
        if info["unification"] < 1:
            log.warning("polarization: consensus not fully unified (unification %.4f, sample agreement %.4f)",
                        info["unification"], info["sample_agreement"])
        example = ctx.example_input

        def surgery(plain: nn.Module) -> nn.Module:
            before = C.count_params(plain)
            dense = None
            try:
                from ..metrics.flops import layer_forward_flops

                full = {n: list(range(b.gated_width())) for n, b in G.gated_blocks(plain)}
                dense = layer_forward_flops(C.prune_resnet(copy.deepcopy(plain), {**arch, "blocks": full}).eval(),
                                            example).per_sample().total
            except Exception as err:  # FLOPs are a report only
                log.warning("polarization: FLOPs not counted: %s", err)
            new = C.prune_resnet(plain, arch)
            self._flops = {"params_before": float(before), "params_after": float(C.count_params(new))}
            if dense:
                from ..metrics.flops import layer_forward_flops

                after = layer_forward_flops(new.eval(), example).per_sample().total
                new.train()
                self._flops.update(flops_dense=float(dense), flops_pruned=float(after),
                                   flops_fraction=float(after) / float(dense))
            return new

        def commit() -> None:
            self.pruned = arch
            self.consensus = info

        return Rebuild(surgery=surgery, commit=commit, reason=reason)

    # -- export ------------------------------------------------------------------------------------
    def finalize(self, model: nn.Module) -> nn.Module:
        # After the decision the plain model is already the pruned one; before it the export is the
        # dynamic gated model (architecture() says so and build_exported inserts the gates again).
        return model

    def architecture(self) -> dict[str, Any]:
        if self.pruned is not None:
            return {"pruned": self.pruned}
        c = self.cfg
        return {"gated": {"gating": c.gating, "position": c.position, "depth": c.gate_depth,
                          "hidden": c.gate_hidden, "seed": self.seed}}

    @classmethod
    def build_exported(cls, model: nn.Module, arch: dict[str, Any]) -> nn.Module:
        if not arch:
            return model
        if "pruned" in arch:
            return C.prune_resnet(model, arch["pruned"])
        if "gated" in arch:
            g = arch["gated"]
            return G.insert_gates(model, g["gating"], g["position"], g["depth"], g["hidden"], seed=g.get("seed", 0))
        raise ValueError(f"polarization: unknown exported architecture {sorted(arch)}")

    # -- logging -----------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"polar/lambda_act": self.lambda_act, "polar/pruned": int(self.pruned is not None)}
        if self.ctx is not None:
            out["polar/lambda_polar"] = self.lambda_polar()
        out.update({f"polar/{k}": v for k, v in self._last.items()})
        # The trainer logs an epoch before on_epoch_end closes it: report the running epoch when it has steps.
        h = self._epoch_summary(len(self.history)) or (self.history[-1] if self.history else None)
        if h is not None:
            out["polar/prune_rate_params"] = h["prune_rate"]
            out["polar/open_fraction"] = sum(h["open"].values()) / max(1, len(h["open"]))
            out.update({f"polar/open/{k}": v for k, v in h["open"].items()})
        if self.consensus:
            out.update({f"polar/consensus_{k}": v for k, v in self.consensus.items()})
        out.update({f"polar/{k}": v for k, v in self._flops.items()})
        if "params_before" in self._flops:
            out["polar/prune_rate_params_physical"] = 1 - self._flops["params_after"] / self._flops["params_before"]
        return out

    def plot(self, run_dir: str) -> list[str]:
        if not self.history:
            return []
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return []
        paths = []
        epochs = [h["epoch"] for h in self.history]
        # one histogram per epoch (at most 6, the last always shown)
        pick = sorted({round(i * (len(self.history) - 1) / 5) for i in range(6)}) if len(self.history) > 6 \
            else list(range(len(self.history)))
        fig, axes = plt.subplots(1, len(pick), figsize=(2.4 * len(pick) + 0.6, 2.8), sharey=True, squeeze=False)
        edges = [i / HIST_BINS for i in range(HIST_BINS + 1)]
        for ax, i in zip(axes[0], pick):
            h = self.history[i]["hist"]
            ax.bar(edges[:-1], [max(c, 0) for c in h], width=1 / HIST_BINS, align="edge", color="tab:blue",
                   edgecolor="white")
            if sum(h) > 50:  # many gates: log counts, so that the few undecided ones stay visible
                ax.set_yscale("symlog", linthresh=1)
            ax.set_xlim(0, 1)
            ax.set_title(f"epoch {self.history[i]['epoch']}", fontsize=9)
            ax.set_xlabel("mean gate value")
        axes[0][0].set_ylabel("gates")
        fig.suptitle(f"gates by mean value over samples and steps ({sum(self.history[-1]['hist'])} gates)",
                     fontsize=10)
        fig.tight_layout()
        p = os.path.join(run_dir, "polarization_gate_hist.png")
        fig.savefig(p, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(p)
        fig, ax = plt.subplots(figsize=(7, 4))
        for name in self.history[-1]["open"]:
            ax.plot(epochs, [h["open"].get(name, math.nan) for h in self.history], label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("open fraction")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title("gate open fraction per layer")
        if len(self.history[-1]["open"]) <= 12:
            ax.legend(fontsize=6)
        p = os.path.join(run_dir, "polarization_open_fraction.png")
        fig.savefig(p, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(p)
        return paths

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "step": self.step, "lambda_act": self.lambda_act,
                "lambda_act_integral": self._la_int, "pruned": self.pruned,
                "consensus": dict(self.consensus), "history": list(self.history),
                "ep_gbar": self._ep_gbar, "ep_polar": self._ep_polar, "ep_act": self._ep_act, "ep_n": self._ep_n,
                "ctl_sum": self._ctl[0], "ctl_n": self._ctl[1]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.step = int(state["step"])
        self.lambda_act = float(state["lambda_act"])
        self._la_int = float(state.get("lambda_act_integral", self.lambda_act))
        self.pruned = state["pruned"]
        self.consensus = dict(state["consensus"])
        self.history = list(state["history"])
        self._ep_gbar = state["ep_gbar"]
        self._ep_polar, self._ep_act, self._ep_n = float(state["ep_polar"]), float(state["ep_act"]), int(state["ep_n"])
        self._ctl = [state["ctl_sum"], int(state["ctl_n"])]
