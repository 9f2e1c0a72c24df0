"""AutoSparse / STR (Kundu et al. 2023, arXiv 2304.06941): exact unit checks of the reparameterization,
the schedules, AutoTune, backward sparsity and the FLOP accounting, and behavioural toy checks, single process.

Exact checks run in float64 with W ~ N(0, 0.05^2) and s in {-5, -3, -1}: forward zeros and values, the
layer output against the plain op, weight and threshold gradients (hand-computed, finite differences and
``torch.autograd.gradcheck``), the boundary rules, weight decay on ``s``, the alpha schedules and
AutoTune's values, the backward-sparsity sets and the FLOP fractions on a model whose FLOPs are known by
hand. The toy checks train a sparse-teacher regression on 3 seeds at once (one thresholded layer per
seed, so the seeds are independent runs in one loop).
"""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_sparse.config import ConfigError, config_from_dict
from dist_sparse.driver import Driver, PlainLoop
from dist_sparse.methods import create_method
from dist_sparse.methods.autosparse import (AlphaSchedule, AutoTune, FlopRecorder, alpha_decay,
                                            read_reference_losses, step_flops)
from dist_sparse.methods.base import OptimizerInfo, RunContext
from dist_sparse.metrics.flops import layer_forward_flops, training_flops
from dist_sparse.surgery import threshold as T

S_VALUES = [-5.0, -3.0, -1.0]


def _w(seed: int = 0, shape=(40, 30)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * 0.05


def _s(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float64, requires_grad=True)


def _grads(w: torch.Tensor, s: torch.Tensor, alpha: float, G: torch.Tensor, **kw):
    w = w.clone().requires_grad_(True)
    out = T.soft_threshold(w, s, alpha, **kw)
    (out * G).sum().backward()
    return out.detach(), w.grad, s.grad


def _where(cond: torch.Tensor, a, b) -> torch.Tensor:
    """torch.where in float64 (python scalars would make a float32 result)."""
    f = lambda v: v if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64)
    return torch.where(cond, f(a), f(b))


def _method(name="autosparse", total_steps=100, steps_per_epoch=1, wd=0.0, **fields):
    cfg = config_from_dict({"method": {"name": name, **fields}}).method
    method = create_method(cfg, seed=0)
    method.setup(RunContext(total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                            optimizer=OptimizerInfo("sgd", 0.1, wd, 0.9)))
    return method


# ------------------------------------------------------------------------------------------------
# The reparameterization
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s", S_VALUES)
def test_forward_exact_zeros_and_shrunk_values(s):
    w = _w(1)
    t = torch.sigmoid(torch.tensor(s, dtype=torch.float64))
    out = T.soft_threshold(w, _s(s), 0.5).detach()
    pruned = w.abs() <= t
    assert torch.equal(out == 0, pruned)
    assert torch.equal(out[~pruned], torch.sign(w[~pruned]) * (w[~pruned].abs() - t))
    assert bool((out.abs() <= w.abs()).all())
    assert torch.equal(torch.sign(out[~pruned]), torch.sign(w[~pruned]))
    if s == -5.0:
        assert 0 < int(pruned.sum()) < w.numel()  # both sides are exercised


def test_layer_output_equals_the_plain_op_on_the_thresholded_weight():
    torch.manual_seed(0)
    conv = T.apply_thresholds(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)),
                              ["0.weight", "1.weight"], s_init=-3.0)
    x = torch.randn(2, 3, 6, 6)
    w_hat = T.soft_threshold(conv[0].weight, conv[0].s).detach()
    assert torch.equal(conv[0](x), F.conv2d(x, w_hat, conv[0].bias, padding=1))
    h = torch.randn(5, 8)
    w_hat = T.soft_threshold(conv[1].weight, conv[1].s).detach()
    assert torch.equal(conv[1](h), F.linear(h, w_hat, conv[1].bias))
    assert 0 < int((w_hat == 0).sum()) < w_hat.numel()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("s", S_VALUES)
def test_weight_gradient_is_gated_by_one_and_alpha(alpha, s):
    w = _w(2)
    G = torch.randn(w.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _, gw, _ = _grads(w, _s(s), alpha, G)
    active = w.abs() > torch.sigmoid(torch.tensor(s, dtype=torch.float64))
    assert torch.equal(gw[active], G[active])
    assert torch.equal(gw[~active], alpha * G[~active])
    if alpha == 1.0:
        assert torch.equal(gw, G)  # STE
    if alpha == 0.0:
        assert int(torch.count_nonzero(gw[~active])) == 0


def test_boundary_weight_at_threshold_and_zero_weight_get_alpha():
    s = _s(-3.0)
    t = float(torch.sigmoid(s.detach()))
    w = torch.tensor([t, -t, 0.0, 2 * t, -2 * t], dtype=torch.float64)
    G = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    out, gw, _ = _grads(w, s, 0.3, G)
    assert out[:3].tolist() == [0.0, 0.0, 0.0]
    assert gw.tolist() == [0.3, 0.6, 0.3 * 3.0, 4.0, 5.0]


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("s", S_VALUES)
def test_threshold_gradient_matches_the_chain_rule(alpha, s):
    w = _w(4)
    G = torch.randn(w.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sv = torch.tensor(s, dtype=torch.float64)
    sig = torch.sigmoid(sv)
    gate = _where(w.abs() > sig, 1.0, alpha)
    want = -sig * (1 - sig) * (G * torch.sign(w) * gate).sum()
    _, _, gs = _grads(w, _s(s), alpha, G)
    torch.testing.assert_close(gs, want.reshape(1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("s", S_VALUES)
def test_threshold_gradient_matches_finite_differences_for_str(s):
    w = _w(6)
    t = float(torch.sigmoid(torch.tensor(s, dtype=torch.float64)))
    near = (w.abs() - t).abs() < 1e-6
    w = torch.where(near, w * 1.5, w)  # no |W| within 1e-6 of T
    G = torch.randn(w.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    _, _, gs = _grads(w, _s(s), 0.0, G)
    h = 1e-6

    def loss(sv: float) -> float:
        return float((T.soft_threshold(w, torch.tensor([sv], dtype=torch.float64), 0.0) * G).sum())

    fd = (loss(s + h) - loss(s - h)) / (2 * h)
    assert abs(float(gs) - fd) <= 1e-6 * abs(fd)


def test_descent_raises_the_threshold_when_the_loss_wants_smaller_magnitudes():
    w = _w(8)
    G = torch.sign(w) * 0.1  # dL/dW^ along sign(W): the loss prefers smaller |W^|
    _, _, gs = _grads(w, _s(-3.0), 0.3, G)
    assert float(gs) < 0  # one SGD step increases s, i.e. T


def test_gradcheck_float64():
    w = _w(9, (6, 5))
    s = torch.tensor([-3.0], dtype=torch.float64, requires_grad=True)
    t = float(torch.sigmoid(s.detach()))
    w = torch.where((w.abs() - t).abs() < 1e-3, w + 0.01 * torch.sign(w), w).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: T.soft_threshold(a, b, 0.0), (w, s), eps=1e-7, atol=1e-8)
    # union backward sparsity with alpha = 0 keeps every active weight: still the true derivative
    assert torch.autograd.gradcheck(lambda a, b: T.soft_threshold(a, b, 0.0, backward_density=0.3), (w, s),
                                    eps=1e-7, atol=1e-8)


def test_bf16_weights_are_thresholded_in_float32():
    w = _w(10).float()
    s = torch.tensor([-3.0])
    ref = T.soft_threshold(w, s).detach()
    got = T.soft_threshold(w.bfloat16(), s.bfloat16()).detach()
    assert got.dtype == torch.bfloat16
    assert torch.equal(got == 0, T.active_mask(w.bfloat16(), s.bfloat16()).logical_not())
    assert (got.float() - ref).abs().max() < 1e-2


# ------------------------------------------------------------------------------------------------
# Surgery, selection, finalize, weight decay on s
# ------------------------------------------------------------------------------------------------


def test_prepare_selection_per_family_and_switches():
    from dist_sparse.models import create_model

    m = _method(first_layer_dense=True, last_layer_dense=True, exclude=["layer3.*"])
    net = m.prepare(create_model("resnet20", num_classes=10, in_chans=1, width_mult=0.25))
    names = list(T.thresholded_modules(net))
    assert "conv1.weight" not in names and "fc.weight" not in names and names
    assert not any(n.startswith("layer3.") for n in names)
    # Transformer: every projection and FFN linear; the embedding and its tied output projection stay dense
    tr = _method().prepare(create_model("transformer_tiny", vocab_size=50))
    names = list(T.thresholded_modules(tr))
    assert len(names) == 2 * 6 + 2 * 10 and all(n.endswith(("_proj.weight", "fc1.weight", "fc2.weight")) for n in names)
    assert isinstance(tr.embed_tokens, nn.Embedding)
    # DeiT: patch embedding, qkv, proj, fc1, fc2 and the head
    vit = _method().prepare(create_model("deit_micro", num_classes=10, img_size=32, patch_size=8))
    names = list(T.thresholded_modules(vit))
    assert names[0] == "patch_embed.proj.weight" and names[-1] == "head.weight"
    with pytest.raises(ConfigError, match="method.include"):
        _method(include=["nothing.*"]).prepare(nn.Sequential(nn.Linear(3, 3)))


def test_prepare_is_idempotent_and_finalize_gives_plain_layers_with_exact_zeros():
    from dist_sparse.metrics.layer_stats import count_parameters

    torch.manual_seed(0)
    m = _method(s_init=-2.0)
    net = m.prepare(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)))
    again = m.prepare(net)
    assert sum(isinstance(x, T.ThresholdedLayer) for x in again.modules()) == 2
    x = torch.randn(2, 1, 6, 6)
    want = net.eval()(x)
    nnz = sum(int(T.active_mask(mod.weight, mod.s).sum()) for mod in T.thresholded_modules(net).values())
    plain = m.finalize(net)
    assert [type(mm) for mm in plain.modules()][1:] == [nn.Conv2d, nn.Flatten, nn.Linear]
    assert torch.equal(plain(x), want)
    total, nonzero = count_parameters(plain)
    assert total == 4 * 9 + 4 + 64 * 3 + 3 and nonzero == nnz + 4 + 3  # biases are not thresholded
    fresh = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    fresh.load_state_dict(plain.state_dict(), strict=True)


def test_threshold_gets_the_runs_weight_decay_through_the_override_rule():
    from dist_sparse.config import config_from_dict as cfd
    from dist_sparse.models import create_model
    from dist_sparse.train import build_optimizer

    cfg = cfd({"model": {"name": "resnet20"}, "optim": {"weight_decay": 5e-4}, "method": {"name": "autosparse"}})
    m = create_method(cfg.method)
    m.setup(RunContext(total_steps=10, steps_per_epoch=5, optimizer=OptimizerInfo("sgd", 0.1, 5e-4, 0.9)))
    net = m.prepare(create_model("resnet20", num_classes=10, in_chans=1, width_mult=0.25))
    opt = build_optimizer(cfg, net, m.param_group_overrides(net))
    names = {id(p): n for n, p in net.named_parameters()}
    decay = {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    s_names = [n for n in decay if n.endswith(".s")]
    assert len(s_names) == 20 and all(decay[n] == 5e-4 for n in s_names)
    assert decay["bn1.weight"] == 0.0 and decay["conv1.weight"] == 5e-4
    m2 = _method(threshold_weight_decay=1e-3)
    assert set(v["weight_decay"] for v in m2.param_group_overrides(net).values()) == {1e-3}


# ------------------------------------------------------------------------------------------------
# alpha schedules and AutoTune
# ------------------------------------------------------------------------------------------------

TABLE = {  # epoch: (cosine, sigmoid, sigmoid-cosine) with T_d = 100
    0: (1.000000, 0.997527, 1.000000), 1: (0.999753, 0.997213, 0.999753), 5: (0.993844, 0.995504, 0.995504),
    10: (0.975528, 0.991837, 0.991837), 20: (0.904508, 0.973403, 0.973403), 25: (0.853553, 0.952574, 0.952574),
    45: (0.578217, 0.645656, 0.645656), 50: (0.5, 0.5, 0.5), 70: (0.206107, 0.083173, 0.206107),
    75: (0.146447, 0.047426, 0.146447), 89: (0.029560, 0.009194, 0.029560), 90: (0.024472, 0.008163, 0.024472),
    95: (0.006156, 0.004496, 0.006156), 99: (0.000247, 0.002787, 0.002787), 100: (0.0, 0.002473, 0.002473)}


@pytest.mark.parametrize("epoch", sorted(TABLE))
def test_schedule_reference_values(epoch):
    for kind, want in zip(("cosine", "sigmoid", "sigmoid_cosine"), TABLE[epoch]):
        assert abs(alpha_decay(kind, epoch, 100) - want) <= 1e-6, (kind, epoch)


def test_exponential_schedule_and_cutoff():
    sched = AlphaSchedule(alpha0=0.4, kind="exponential", horizon=44, cutoff=10)
    for e, want in [(0, 0.4), (1, 0.147152), (2, 0.054134), (3, 0.019915), (4, 0.007326), (5, 0.002695),
                    (9, 4.9364e-5)]:
        assert abs(sched(e) - want) <= 1e-6
    assert all(sched(e) == 0.0 for e in range(10, 44))


@pytest.mark.parametrize("kind", ["sigmoid_cosine", "cosine", "sigmoid", "exponential", "linear", "constant"])
def test_method_alpha_is_a_non_increasing_function_of_the_epoch(kind):
    m = _method(total_steps=100, steps_per_epoch=1, schedule=kind, alpha0=0.9, alpha_cutoff=0.9)
    seen = [m.alpha]
    net = m.prepare(nn.Linear(3, 2))
    for e in range(99):
        m.on_epoch_end(net, e, {"train_loss": 1.0})
        seen.append(m.alpha)
        assert m.alpha == m.schedule(e + 1)
        assert all(mod.alpha == m.alpha for mod in T.thresholded_modules(net).values())
    assert seen[0] == pytest.approx(0.9 * alpha_decay(kind, 0, 100))
    assert all(a == 0.0 for a in seen[90:]) and seen[89] > 0
    assert all(b <= a for a, b in zip(seen, seen[1:]))
    cut = _method(total_steps=100, steps_per_epoch=1, schedule="cosine", alpha0=1.0, alpha_cutoff=50,
                  decay_horizon="cutoff")
    assert cut.schedule.horizon == 50 and cut.schedule(25) == pytest.approx(0.5) and cut.schedule(50) == 0.0


def test_alpha_is_constant_within_an_epoch():
    m = _method(total_steps=12, steps_per_epoch=4, alpha0=0.8, schedule="cosine", alpha_cutoff=2)
    net = m.prepare(nn.Linear(4, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    seen: list[tuple[int, float]] = []
    drv = Driver(m, PlainLoop(), lambda mod, b: mod(b).pow(2).mean())
    drv.attach(net, opt)
    net.register_forward_pre_hook(lambda mod, args: seen.append((drv.step, mod.alpha)))
    for step in range(12):
        drv.micro_step(torch.randn(3, 4))
        if (step + 1) % 4 == 0 and step < 11:
            drv.end_epoch(step // 4, {"train_loss": 1.0})
    by_epoch = {}
    for step, a in seen:
        by_epoch.setdefault(step // 4, set()).add(a)
    assert [len(v) for v in by_epoch.values()] == [1, 1, 1]
    assert by_epoch[0] == {0.8} and by_epoch[2] == {0.0} and 0 < next(iter(by_epoch[1])) < 0.8


def _tuned(loss_above: bool, eps2: float, shift: bool = False):
    ref = [2.0 - 0.1 * i for i in range(9)]
    m = _method(total_steps=100, steps_per_epoch=1, autotune=True, alpha0=0.5, autotune_eps2=eps2,
                reference_losses=ref, alpha_cutoff=90, autotune_shift=shift)
    net = m.prepare(nn.Linear(3, 2))
    alphas = [m.alpha]
    for e in range(99):
        loss = ref[e] * (1.02 if loss_above else 1.0) if e < 9 else 1.0
        m.on_epoch_end(net, e, {"train_loss": loss})
        alphas.append(m.alpha)
    return m, alphas


@pytest.mark.parametrize("above,eps2,want", [(True, 0.005, 0.775664), (False, 0.005, 0.477945),
                                             (False, 0.01, 0.456759)])
def test_autotune_values(above, eps2, want):
    m, alphas = _tuned(above, eps2)
    assert abs(m.alpha_tuned - want) <= 1e-6
    assert alphas[9] == m.alpha_tuned  # the first post-tuning epoch uses alpha_tuned exactly
    assert alphas[10] == pytest.approx(m.alpha_tuned * alpha_decay("sigmoid_cosine", 1, 91))
    assert all(a == 0.0 for a in alphas[90:]) and alphas[89] > 0
    assert all(0.0 <= a <= 1.0 for a in alphas)
    assert [t["branch"] for t in m.tuning] == ["increase" if above else "decrease"] * 9
    _, shifted = _tuned(above, eps2, shift=True)
    assert shifted[9] == shifted[10] == m.alpha_tuned and shifted[11] == pytest.approx(alphas[10])


def test_autotune_reads_the_dense_runs_metrics_and_checks_its_length(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"event": "start"}] + [{"event": "epoch", "epoch": e, "train_loss": 3.0 - e * 0.1} for e in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_reference_losses(str(path)) == pytest.approx([3.0 - e * 0.1 for e in range(10)])
    m = _method(autotune=True, alpha0=0.5, reference_metrics=str(path))
    assert len(m.reference) == 9
    with pytest.raises(ConfigError, match="reference_losses"):
        _method(autotune=True, reference_losses=[1.0, 1.0])
    with pytest.raises(ConfigError, match="reference_metrics"):
        config_from_dict({"method": {"name": "autosparse", "autotune": True}})


def test_str_and_bad_values_fail_with_one_line():
    with pytest.raises(ConfigError, match=r"method.alpha0 = 0.5 .*STR"):
        config_from_dict({"method": {"name": "str", "alpha0": 0.5}}).method.validate()
    for key, value in [("alpha0", 1.5), ("backward_density", 0.0), ("alpha_cutoff", 2.5), ("s_init", float("nan"))]:
        with pytest.raises(ConfigError, match=f"method.{key}"):
            config_from_dict({"method": {"name": "autosparse", key: value}}).method.validate()
    assert _method("str").alpha == 0.0


# ------------------------------------------------------------------------------------------------
# Backward sparsity
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("b", [0.2, 0.9])  # below and above the forward density
def test_backward_sparsity_sets_and_gates(alpha, b):
    w = _w(11)
    s = -3.0
    G = torch.randn(w.shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64) + 3.0  # non-zero
    _, gw, _ = _grads(w, _s(s), alpha, G, backward_density=b)
    active = T.active_mask(w, torch.tensor([s]))
    k = T.backward_count(w.numel(), b)
    bmask = T.backward_mask(w, active, k, "union")
    assert int(bmask.sum()) == max(k, int(active.sum())) and bool((bmask | ~active).all())  # A in B
    gate = _where(active, 1.0, _where(bmask, alpha, 0.0))
    assert torch.equal(gw, G * gate)
    if alpha == 0.0:
        assert torch.equal(gw != 0, active)
    top = T.backward_mask(w, active, k, "plain_topk")
    assert int(top.sum()) == k
    _, gw2, _ = _grads(w, _s(s), alpha, G, backward_density=b, backward_mode="plain_topk")
    assert torch.equal(gw2, G * _where(top, _where(active, 1.0, alpha), 0.0))


def test_backward_topk_breaks_ties_by_flat_index():
    w = torch.tensor([0.5, 0.2, 0.2, 0.2, 0.1], dtype=torch.float64)
    none = torch.zeros(5, dtype=torch.bool)
    assert T.backward_mask(w, none, 3, "plain_topk").tolist() == [True, True, True, False, False]


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------


class _TwoLinear(nn.Module):
    """Linear(10, 20) then Linear(20, 5), no bias: 2*10*20 = 400 and 2*20*5 = 200 forward FLOPs per sample."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(10, 20, bias=False), nn.Linear(20, 5, bias=False)

    def forward(self, x):
        return self.b(self.a(x))


def _set_density(layer: nn.Module, rho: float) -> None:
    """|W| = 1 on the first round(rho n) entries and 1e-6 elsewhere (T = sigmoid(-5) in between)."""
    n = layer.weight.numel()
    flat = torch.full((n,), 1e-6)
    flat[: round(rho * n)] = 1.0
    with torch.no_grad():
        layer.weight.copy_(flat.view_as(layer.weight))


def _one_step_fractions(rho=(0.5, 0.5), alpha=0.5, **fields) -> tuple[float, float, dict]:
    m = _method(total_steps=1, steps_per_epoch=1, alpha0=alpha, schedule="constant", alpha_cutoff=None, **fields)
    net = m.prepare(_TwoLinear())
    _set_density(net.a, rho[0])
    _set_density(net.b, rho[1])
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # weights do not move: post-step = pre-step densities
    drv = Driver(m, PlainLoop(), lambda mod, x: mod(x).sum())
    drv.attach(net, opt)
    drv.micro_step(torch.randn(4, 10))
    drv.end_train()
    return m.train_flops_fraction(), m.test_flops_fraction(), m.report()


@pytest.mark.parametrize("rho", [0.25, 0.6])
def test_flops_fractions_with_uniform_density(rho):
    train, test, _ = _one_step_fractions((rho, rho), alpha=0.0)
    assert train == pytest.approx(rho) and test == pytest.approx(rho)
    train, _, _ = _one_step_fractions((rho, rho), alpha=0.5)
    assert train == pytest.approx((2 * rho + 1) / 3)
    for b in (0.4, 0.8):
        train, _, rep = _one_step_fractions((rho, rho), alpha=0.5, backward_density=b, backward_topk_mode="plain_topk")
        assert train == pytest.approx((2 * rho + b) / 3)
        train, _, rep = _one_step_fractions((rho, rho), alpha=0.5, backward_density=b)
        assert train == pytest.approx((2 * rho + max(b, rho)) / 3)
        assert rep["backward_density/a.weight"] == pytest.approx(max(b, rho))
        train, _, _ = _one_step_fractions((rho, rho), alpha=0.0, backward_density=b)
        assert train == pytest.approx((2 * rho + max(b, rho)) / 3)


def test_flops_all_dense_is_one_and_test_fraction_weights_layers_by_their_flops():
    train, test, rep = _one_step_fractions((1.0, 1.0), alpha=0.5, s_init=-30.0)
    assert train == 1.0 and test == 1.0 and rep["sparsity/global"] == 0.0
    _, test, rep = _one_step_fractions((0.25, 0.5), alpha=0.0)
    assert test == pytest.approx((0.25 * 400 + 0.5 * 200) / 600)
    assert rep["density/a.weight"] == 0.25 and rep["nnz/b.weight"] == 50


def test_step_flops_uses_the_shared_training_modes():
    from dist_sparse.metrics.flops import FlopReport

    rep = FlopReport(per_layer={"a": 400.0, "b": 200.0}, total=600.0, batch_size=1)
    rho = {"a": 0.3, "b": 0.7}
    assert step_flops(rep, rho, None, 0.0) == training_flops(rep, rho, "sparse")
    assert step_flops(rep, rho, None, 0.2) == training_flops(rep, rho, "sparse_fwd_dense_bwd")
    assert step_flops(rep, rho, {"a": 1.0, "b": 1.0}, 0.2) == training_flops(rep, rho, "sparse_fwd_dense_bwd")


def test_flop_recorder_agrees_with_the_flop_counter():
    from dist_sparse.models import create_model

    torch.manual_seed(0)
    net = create_model("resnet20", num_classes=10, in_chans=1, width_mult=0.25)
    x = torch.randn(3, 1, 28, 28)
    want = layer_forward_flops(net, x).per_sample()
    th = _method().prepare(net)
    rec = FlopRecorder(th)
    th(x)
    got = rec.report()
    rec.remove()
    assert got.per_layer == {n: f for n, f in want.per_layer.items() if want.kinds[n] in ("conv", "linear")}
    assert got.total == want.total  # ResNet-20: every FLOP is a conv or the classifier


# ------------------------------------------------------------------------------------------------
# Method: statistics, alarm, report, plot
# ------------------------------------------------------------------------------------------------


def test_report_counts_revived_and_pruned_and_raises_the_collapse_alarm(caplog, tmp_path):
    torch.manual_seed(0)
    m = _method(total_steps=6, steps_per_epoch=2, s_init=-3.0, alpha0=0.5, alpha_cutoff=None)
    net = m.prepare(_TwoLinear())
    with torch.no_grad():
        net.b.weight.mul_(0.01)  # every |W| below T: layer b starts collapsed
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    drv = Driver(m, PlainLoop(), lambda mod, x: (mod(x) - 1.0).pow(2).mean())
    drv.attach(net, opt)
    with caplog.at_level(logging.WARNING, logger="dist_sparse"):
        prev = None
        for step in range(6):
            drv.micro_step(torch.randn(8, 10, generator=torch.Generator().manual_seed(step)))
            if (step + 1) % 2 == 0:
                rep = m.report()
                if prev is not None:
                    for n in m.names:
                        assert rep[f"nnz/{n}"] - prev[f"nnz/{n}"] == rep[f"revived/{n}"] - rep[f"pruned/{n}"]
                prev = rep
                if step < 5:
                    drv.end_epoch(step // 2, {"train_loss": 1.0})
        drv.end_train()
    assert any("ALARM" in r.message and "b.weight" in r.message for r in caplog.records)
    rep = m.report()
    for key in ("autosparse/alpha", "sparsity/global", "flops/train_fraction", "flops/test_fraction",
                "s/a.weight", "threshold/a.weight", "density/a.weight", "nnz/a.weight", "revived/a.weight",
                "pruned/a.weight"):
        assert key in rep, key
    assert rep["threshold/a.weight"] == pytest.approx(1 / (1 + math.exp(-rep["s/a.weight"])))
    assert len(m.history) == 3
    paths = m.plot(str(tmp_path))
    assert sorted(p.rsplit("/", 1)[-1] for p in paths) == ["autosparse_alpha.png", "autosparse_sparsity.png",
                                                          "autosparse_thresholds.png"]


# ------------------------------------------------------------------------------------------------
# Behavioural toys: the sparse teacher (3 seeds in one loop, one layer per seed)
# ------------------------------------------------------------------------------------------------

SEEDS = (0, 1, 2)
D_IN, N, BATCH, EPOCHS = 100, 2000, 64, 30


class _Students(nn.Module):
    """One bias-free Linear(100, 1) per seed; the seeds never share a parameter."""

    def __init__(self, init_std: float, gens):
        super().__init__()
        self.students = nn.ModuleList(nn.Linear(D_IN, 1, bias=False).double() for _ in SEEDS)
        with torch.no_grad():
            for lin, g in zip(self.students, gens):
                lin.weight.copy_(torch.randn(1, D_IN, generator=g, dtype=torch.float64) * init_std)

    def forward(self, xs):
        return [lin(x).squeeze(-1) for lin, x in zip(self.students, xs)]


def _teacher_toy(name="autosparse", alpha0=0.5, schedule="sigmoid_cosine", cutoff=27, s0=-3.0, init_std=0.01,
                 lr=0.01, wd=1e-3, momentum=0.9):
    """The specification's reference toy; returns per seed (density per epoch, final active set, T, support)."""
    gens = [torch.Generator().manual_seed(1000 + s) for s in SEEDS]
    data = []
    for g in gens:
        x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
        w = torch.zeros(D_IN, dtype=torch.float64)
        idx = torch.randperm(D_IN, generator=g)[:20]
        sign = torch.where(torch.rand(20, generator=g) < 0.5, -1.0, 1.0).double()
        w[idx] = (torch.rand(20, generator=g, dtype=torch.float64) + 0.5) * sign
        data.append((x, x @ w + 0.01 * torch.randn(N, generator=g, dtype=torch.float64), w != 0))
    fields = {"name": name, "s_init": s0, "alpha_cutoff": cutoff}
    if name == "autosparse":
        fields.update(alpha0=alpha0, schedule=schedule)
    method = create_method(config_from_dict({"method": fields}).method)
    spe = math.ceil(N / BATCH)
    method.setup(RunContext(total_steps=EPOCHS * spe, steps_per_epoch=spe, optimizer=OptimizerInfo("sgd", lr, wd, momentum)))
    model = method.prepare(_Students(init_std, gens))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)  # lambda on w and s

    def loss_fn(mod, batch):
        xs, ys = batch
        return sum(0.5 * (p - y).pow(2).mean() for p, y in zip(mod(xs), ys))

    drv = Driver(method, PlainLoop(), loss_fn)
    drv.attach(model, opt)
    logging.getLogger("dist_sparse").disabled = True  # the collapse alarm is expected here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only add overhead
    try:
        for epoch in range(EPOCHS):
            perms = [torch.randperm(N, generator=g) for g in gens]
            for i in range(spe):
                idx = [p[i * BATCH:(i + 1) * BATCH] for p in perms]
                drv.micro_step(([d[0][j] for d, j in zip(data, idx)], [d[1][j] for d, j in zip(data, idx)]))
            if epoch + 1 < EPOCHS:
                drv.end_epoch(epoch, {"train_loss": 0.0})
        drv.end_train()
    finally:
        logging.getLogger("dist_sparse").disabled = False
        torch.set_num_threads(threads)
    out = []
    for k, lin in enumerate(model.students):
        active = T.active_mask(lin.weight, lin.s).reshape(-1)
        out.append({"density": [h["density"][k] for h in method.history], "active": active,
                    "T": float(lin.threshold), "support": data[k][2]})
    return out


def test_toy_dead_start_without_gradient_annealing():
    for run in _teacher_toy(name="str", cutoff=None):
        assert run["density"] == [0.0] * EPOCHS  # no loss gradient reaches w or s
        assert run["T"] > 1 / (1 + math.exp(3.0))  # only weight decay acts on s: T rises


def test_toy_revival_with_gradient_annealing():
    t0 = 1 / (1 + math.exp(3.0))
    for run in _teacher_toy(alpha0=0.5):
        tp = int((run["active"] & run["support"]).sum())
        assert tp == 20 and tp / int(run["active"].sum()) >= 0.9  # recall 1, precision >= 0.9
        assert run["T"] < t0


@pytest.mark.parametrize("variant", ["reference", "plain_sgd"])
def test_toy_sparsity_does_not_increase_with_alpha(variant):
    kw = {} if variant == "reference" else dict(momentum=0.0, lr=0.05, wd=1e-4, s0=-5.0, init_std=0.001)
    means = []
    for a in (0.25, 0.5, 1.0):
        runs = _teacher_toy(alpha0=a, schedule="constant", cutoff=None, **kw)
        means.append(sum(r["density"][-1] for r in runs) / len(runs))
    assert means[0] <= means[1] + 0.01 and means[1] <= means[2] + 0.01, means
