"""Cuttlefish: the acceptance checks of docs/cuttlefish.md (stable rank, rank selection, factorization,
Frobenius decay, the switch detector on synthetic histories, the profiling rule), on the CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dist_sparse.config import config_from_dict
from dist_sparse.metrics.flops import layer_forward_flops
from dist_sparse.metrics.layer_stats import sharded_sigma_max, stable_rank, stable_ranks
from dist_sparse.methods.cuttlefish import (PRESETS, DetectorConfig, SwitchController, converged, dense_stacks,
                                            find_stacks, select_rank, time_forward)
from dist_sparse.surgery import lowrank as LR

CIFAR = PRESETS["cifar"]


def _with_singular_values(m: int, n: int, s: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = len(s)
    return p[:, :k] @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ q[:, :k].T


# ---------------------------------------------------------------------------------------------
# Stable rank (checks 1-7)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 64])
def test_identity(n):
    assert stable_rank(torch.eye(n, dtype=torch.float64)) == pytest.approx(n, rel=1e-6)


def test_rank_one_and_diagonals():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(9, 1, generator=g, dtype=torch.float64), torch.randn(1, 5, generator=g, dtype=torch.float64)
    assert stable_rank(a @ b) == pytest.approx(1.0, rel=1e-6)
    assert stable_rank(torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))) == pytest.approx(10 / 9, rel=1e-6)
    assert stable_rank(torch.diag(torch.tensor([1.0, 1, 1, 0], dtype=torch.float64))) == pytest.approx(3, rel=1e-6)
    assert stable_rank(torch.zeros(4, 3)) == 0.0


def test_scale_transpose_bounds_and_definition():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(20, 13, generator=g, dtype=torch.float64)
    s = stable_rank(w)
    for c in (1e-3, -2.0, 1e3):
        assert stable_rank(c * w) == pytest.approx(s, rel=1e-6)
    assert stable_rank(w.T) == pytest.approx(s, rel=1e-6)
    assert 1 <= s <= 13
    assert s == pytest.approx(float(w.square().sum() / torch.linalg.matrix_norm(w, ord=2) ** 2), rel=1e-6)


def test_conv_views_agree():
    w = torch.randn(8, 3, 3, 3, dtype=torch.float64)
    assert stable_rank(w) == pytest.approx(stable_rank(w.reshape(8, -1).T), rel=1e-6)


def test_sharded_sums_and_power_iteration():
    w = _with_singular_values(40, 30, [10, 5, 1, 0.5, 0.25, 0.1])
    shards = [w[0:7], w[7:20], w[20:40]]
    assert sum(float(s.square().sum()) for s in shards) == pytest.approx(float(w.square().sum()), rel=1e-12)
    sigma, _ = sharded_sigma_max(shards, iters=100)
    assert sigma == pytest.approx(10.0, rel=1e-8)
    fro = sum(float(s.square().sum()) for s in shards)
    assert fro / sigma ** 2 == pytest.approx(stable_rank(w), rel=1e-8)
    # A "rank" holding rows 0-19 whose all_reduce adds the other rank's W_i^T (W_i v): one iteration
    # per call, warm-started from the previous v, as a distributed run would do it.
    v = torch.randn(30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v /= v.norm()
    for _ in range(100):
        sigma_d, v_next = sharded_sigma_max([w[:20]], iters=1, v0=v,
                                            all_reduce=lambda z, v=v: z + w[20:].T @ (w[20:] @ v))
        v = v_next
    assert sigma_d == pytest.approx(10.0, rel=1e-8)


def test_stable_ranks_on_a_plain_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    out = stable_ranks(model, ["0", "2", "4"])
    assert out["2"] == pytest.approx(stable_rank(model[2].weight), rel=1e-12)
    assert set(out) == {"0", "2", "4"}


# ---------------------------------------------------------------------------------------------
# Scaled rank (checks 8, 9, 28)
# ---------------------------------------------------------------------------------------------


def test_scaled_rank_examples():
    assert 512 / 200 == pytest.approx(2.56)
    assert select_rank(512, 50, 200) == 128
    assert select_rank(512, 250, 200) == 512
    assert select_rank(512, 50, 200, metric="vanilla") == 50
    assert select_rank(512, 49.2, 200, metric="vanilla") == 50


def test_rank_in_range():
    rng = np.random.default_rng(0)
    for _ in range(200):
        full = int(rng.integers(1, 600))
        r = select_rank(full, float(rng.uniform(0, 2 * full)), float(rng.uniform(1e-3, full)),
                        metric=str(rng.choice(["scaled", "vanilla"])))
        assert 1 <= r <= full


# ---------------------------------------------------------------------------------------------
# Factorization (checks 10-16, 34)
# ---------------------------------------------------------------------------------------------


def test_linear_full_rank_exact_and_eckart_young():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).double()
    x = torch.randn(10, 64, dtype=torch.float64)
    seq = LR.factorize_linear(lin, 48)
    assert (seq(x) - lin(x)).abs().max().item() <= 1e-10
    s = torch.linalg.svdvals(lin.weight.detach())
    for r in (1, 8, 30):
        seq = LR.factorize_linear(lin, r)
        b, c = LR.factor_pair(seq)
        err = lin.weight.detach() - b.detach() @ c.detach()
        assert torch.linalg.matrix_norm(err, ord=2).item() == pytest.approx(s[r].item(), rel=1e-8)
        assert err.square().sum().item() == pytest.approx(s[r:].square().sum().item(), rel=1e-8)
        # balanced split: both factors have Frobenius norm^2 = sum of the kept singular values
        assert b.square().sum().item() == pytest.approx(s[:r].sum().item(), rel=1e-8)
        assert c.square().sum().item() == pytest.approx(s[:r].sum().item(), rel=1e-8)
        assert seq[0].bias is None and seq[1].bias is not None


@pytest.mark.parametrize("kw", [dict(stride=2, padding=1), dict(stride=1, padding=2, dilation=2)])
def test_conv_full_rank_exact_and_shapes(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, **kw).double()
    x = torch.randn(2, 16, 12, 12, dtype=torch.float64)
    seq = LR.factorize_conv(conv, 32)
    assert (seq(x) - conv(x)).abs().max().item() <= 1e-10
    seq = LR.factorize_conv(conv, 5)
    assert tuple(seq[0].weight.shape) == (5, 16, 3, 3) and tuple(seq[1].weight.shape) == (32, 5, 1, 1)
    assert seq[0].bias is None and seq[1].bias is not None
    assert seq[0].stride == conv.stride and seq[0].dilation == conv.dilation and seq[1].kernel_size == (1, 1)


def test_parameter_and_flop_counts():
    assert LR.factorized_params((48, 64), 8) == 896 and LR.dense_params((48, 64)) == 3072
    assert LR.factorized_params((48, 64), 8, bias=True) == 896 + 48
    assert LR.factorized_params((128, 64, 3, 3), 32) == 22528 and LR.dense_params((128, 64, 3, 3)) == 73728
    conv = nn.Conv2d(64, 128, 3, padding=1, bias=False)
    seq = LR.factorize_conv(conv, 32)
    assert sum(p.numel() for p in seq.parameters()) == 22528
    x = torch.randn(1, 64, 16, 16)
    dense = layer_forward_flops(conv, (x,)).total
    low = layer_forward_flops(seq, (x,)).total
    assert dense == 2 * 18_874_368 or dense == 18_874_368  # FLOPs = 2 x MACs in torch's counter
    assert low / dense == pytest.approx(5_767_168 / 18_874_368)
    # whole model: per-layer formulas plus untouched parameters (plus 2r per extra BN)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(32, 10))
    before = sum(p.numel() for p in model.parameters())
    ranks = {"1": 4}
    low = LR.factorize_model(model, ranks, extra_bn=True)
    got = sum(p.numel() for p in low.parameters())
    assert got == before - (32 * 16 * 9) + 4 * (16 * 9 + 32) + 2 * 4


def test_extra_bn_builds_fresh():
    conv = nn.Conv2d(8, 16, 3)
    seq = LR.factorize_conv(conv, 4, extra_bn=True)
    bn = seq[1]
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == 4
    assert torch.equal(bn.running_mean, torch.zeros(4)) and torch.equal(bn.running_var, torch.ones(4))
    # not output-equivalent to the dense conv (a fresh BN normalizes the first factor's output): documented


def test_full_rank_switch_keeps_logits():
    """Check 34: with ranks forced to full and no extra BN the model's eval logits do not change."""
    from dist_sparse.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1, img_size=28, width_mult=0.25).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        want = model(x)
    ranks = {n: LR.full_rank(m.weight) for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and n != "conv1" and "downsample" not in n}
    low = LR.factorize_model(model, ranks).eval()
    with torch.no_grad():
        got = low(x)
    assert (got - want).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------------------------
# Frobenius decay (checks 17, 18)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shapes", [((48, 8), (8, 64)), ((32, 8, 1, 1), (8, 16, 3, 3))])
def test_frobenius_decay_gradients(shapes):
    g = torch.Generator().manual_seed(3)
    b = torch.randn(*shapes[0], generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(*shapes[1], generator=g, dtype=torch.float64, requires_grad=True)
    lam = 1e-4
    loss = 0.5 * lam * (b.reshape(b.shape[0], -1) @ c.reshape(c.shape[0], -1)).square().sum()
    loss.backward()
    gb, gc = LR.frobenius_decay_grads(b.detach(), c.detach(), lam)
    torch.testing.assert_close(gb, b.grad, rtol=1e-8, atol=0)
    torch.testing.assert_close(gc, c.grad, rtol=1e-8, atol=0)


def test_weight_decay_zero_on_factors_with_fd():
    from dist_sparse.methods import create_method
    from dist_sparse.train import build_optimizer

    cfg = config_from_dict({"model": {"name": "resnet20"}, "method": {"name": "cuttlefish"},
                            "optim": {"weight_decay": 1e-4}})
    method = create_method(cfg.method)
    method.ranks = {"layer1.0.conv1": 2, "fc": 3}
    net = nn.Sequential()
    net.add_module("layer1", nn.Sequential(nn.Sequential()))
    net.layer1[0].add_module("conv1", nn.Conv2d(4, 8, 3))
    net.add_module("fc", nn.Linear(8, 5))
    net = method.prepare(net)
    opt = build_optimizer(cfg, net, method.param_group_overrides(net))
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    names = dict(net.named_parameters())
    for n in ("layer1.0.conv1.0.weight", "layer1.0.conv1.1.weight", "fc.0.weight", "fc.1.weight"):
        assert wd[id(names[n])] == 0.0, n
    assert wd[id(names["fc.1.bias"])] == 0.0 and wd[id(names["layer1.0.conv1.1.bias"])] == 0.0
    method.cfg.frob_decay = False
    opt = build_optimizer(cfg, net, method.param_group_overrides(net))
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd[id(names["fc.0.weight"])] == 1e-4


# ---------------------------------------------------------------------------------------------
# Switch detection on synthetic histories (checks 19-27)
# ---------------------------------------------------------------------------------------------


def _np_mean_grad(h, n=15, m=11):
    """Independent re-derivation: EMA by an explicit weight vector, numpy.gradient, last-m mean."""
    h = np.asarray(h, dtype=float)
    w = 2 / (n + 1)
    i, k = np.meshgrid(np.arange(len(h)), np.arange(len(h)), indexing="ij")
    weights = np.where((k >= 1) & (k <= i), w * (1 - w) ** np.maximum(i - k, 0), 0.0)
    s = weights @ h + (1 - w) ** np.arange(len(h)) * h[0]
    return float(np.abs(np.gradient(s))[-m:].mean())


def _np_switch(histories, n=15, m=11, base=0.1, relax=((2, 2, 2.5), (1, 1, 5.0)), upto=299):
    flags = {}
    for j in range(n, upto + 1):
        rem = len(histories) - len(flags)
        mult = next((f for lo, hi, f in relax if lo <= rem <= hi), 1.0)
        for i, h in enumerate(histories):
            if i not in flags and _np_mean_grad(h[: j + 1], n, m) <= base * mult:
                flags[i] = j
        if len(flags) == len(histories):
            return j, flags
    return None, flags


def _run(histories, timing="immediate", upto=299):
    """Checks 0..upto through the controller; the check at which it switches, or None."""
    ctl = SwitchController(CIFAR, timing)
    for j in range(upto + 1):
        if ctl.update({f"l{i}": h[j] for i, h in enumerate(histories)}):
            return j, ctl
    return None, ctl


def _decay(j):
    return 20 + 100 * 0.8 ** j


T = 320
CONST = [40.0] * T
DECAY = [_decay(j) for j in range(T)]


def test_19_constant_layers():
    ctl = SwitchController(CIFAR)
    for j in range(15):
        assert not ctl.update({"a": 40.0, "b": 40.0})
        assert not ctl.flags
    assert ctl.update({"a": 40.0, "b": 40.0}) and ctl.flags == {"a": 15, "b": 15}
    assert _run([CONST, CONST])[0] == 15
    assert _run([CONST, CONST], "lagged")[0] == 16
    assert _np_switch([CONST, CONST])[0] == 15


def test_20_single_decaying_layer():
    for j, want in ((15, 4.904), (30, 1.070), (35, 0.576)):
        from dist_sparse.methods.cuttlefish import smoothed_gradient

        got = float(smoothed_gradient(DECAY[: j + 1], 15)[-11:].mean())
        assert got == pytest.approx(want, abs=1e-3)
        assert _np_mean_grad(DECAY[: j + 1]) == pytest.approx(want, abs=1e-3)
    assert _run([DECAY])[0] == 37 == _np_switch([DECAY])[0]
    assert _run([DECAY], "lagged")[0] == 38
    assert not converged(DECAY, 36, 1, CIFAR) and converged(DECAY, 37, 1, CIFAR)


def test_21_relaxation_three_layers():
    j, ctl = _run([DECAY, DECAY, DECAY])
    assert j == 49 == _np_switch([DECAY] * 3)[0]
    assert set(ctl.flags.values()) == {49}


def test_22_decaying_plus_two_constant():
    j, ctl = _run([DECAY, CONST, CONST])
    assert j == 37 == _np_switch([DECAY, CONST, CONST])[0]
    assert ctl.flags["l1"] == ctl.flags["l2"] == 15


def test_23_ramp():
    ramp = [10.0 + min(j, 40) for j in range(T)]
    assert _run([CONST, CONST, ramp])[0] == 51 == _np_switch([CONST, CONST, ramp])[0]


def test_24_never_converges():
    slope = [10.0 + j for j in range(T)]
    j, ctl = _run([slope])
    assert j is None and not ctl.flags
    assert _np_switch([slope])[0] is None


def test_25_sticky_flags():
    jump = CONST[:16] + [70.0] * (T - 16)
    j, ctl = _run([jump, DECAY])
    assert ctl.flags["l0"] == 15 and j == _run([CONST, DECAY])[0]


def test_26_oscillations():
    osc = [10.0 if j % 2 == 0 else 30.0 for j in range(T)]
    assert _run([osc])[0] == 15 == _np_switch([osc])[0]
    assert _run([osc, CONST])[0] == 16 == _np_switch([osc, CONST])[0]
    p3 = [(10.0, 30.0, 20.0)[j % 3] for j in range(T)]
    assert _run([p3])[0] == 20 == _np_switch([p3])[0]


def test_27_raw_mode():
    raw = DetectorConfig(mode="raw", threshold=0.1)
    seq = [50, 45, 44, 43.95, 43.93]
    hits = [j for j in range(len(seq)) if converged(seq, j, 1, raw)]
    assert hits[0] == 3  # the 4th entry


def test_truncation_flag_and_state_round_trip():
    ctl = SwitchController(CIFAR, truncate_int=True)
    ctl.update({"a": 40.7})
    assert ctl.history["a"] == [40.0]
    other = SwitchController(CIFAR)
    other.load_state_dict(ctl.state_dict())
    assert other.history == ctl.history


# ---------------------------------------------------------------------------------------------
# Profiling (checks 29, 30)
# ---------------------------------------------------------------------------------------------


def test_29_profiling_rule():
    timings = [(10, 9), (10, 8), (10, 6), (10, 5)]
    assert dense_stacks(timings, 1.5) == [0, 1]
    assert dense_stacks(timings, 1.5, rule="per_stack") == [0, 1]
    assert dense_stacks([(15, 10)], 1.5) == [0]  # 1.5x exactly is not a speed-up
    assert dense_stacks([(10, 5), (10, 9), (10, 5)], 1.5) == [0, 1]
    assert dense_stacks([(10, 5), (10, 9), (10, 5)], 1.5, rule="per_stack") == [1]
    # K = stem + the layers of the dense stacks
    stacks = [["a1", "a2"], ["b1", "b2"], ["c1"], ["d1"]]
    assert 1 + sum(len(stacks[i]) for i in dense_stacks(timings, 1.5)) == 5


def test_30_timing_discards_the_first_run(monkeypatch):
    now = [0.0]
    durations = iter([5.0] + [1.0] * 10)  # a slow warm-up, then 10 runs of 1 s

    def fn():
        now[0] += next(durations)

    monkeypatch.setattr("dist_sparse.methods.cuttlefish.time.perf_counter", lambda: now[0])
    assert time_forward(fn, zeta=11) == pytest.approx(1.0)


def test_find_stacks_on_resnet18():
    from dist_sparse.models import create_model

    model = create_model("resnet18", num_classes=10, in_chans=1, img_size=28, width_mult=0.25)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != "conv1"
             and "downsample" not in n]
    stacks = find_stacks(model, names, (torch.randn(2, 1, 28, 28),))
    assert stacks[0] == ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]
    assert sum(len(s) for s in stacks) == len(names)


# ---------------------------------------------------------------------------------------------
# Transformers: the layers the configs name are found, factorized and still run
# ---------------------------------------------------------------------------------------------


def _config_method(path: str):
    from dist_sparse.config import load_config
    from dist_sparse.methods import create_method

    return create_method(load_config(path).method)


def test_deit_config_factorizes_qkv_and_mlp():
    from dist_sparse.models import create_model

    torch.manual_seed(0)
    model = create_model("deit_micro", num_classes=10, in_chans=1, img_size=28, patch_size=7)
    method = _config_method("configs/deit_small_cuttlefish.yaml")
    names = method.select_layers(model)
    assert names and all(n.endswith(("attn.qkv", "mlp.fc1", "mlp.fc2")) for n in names)
    assert not any(n.endswith("attn.proj") or n.startswith(("head", "patch_embed")) for n in names)
    method.ranks = {n: 4 for n in names}
    x = torch.randn(2, 1, 28, 28)
    assert method.prepare(model)(x).shape == (2, 10)
    exported = type(method).build_exported(create_model("deit_micro", num_classes=10, in_chans=1, img_size=28,
                                                        patch_size=7), method.architecture())
    assert set(exported.state_dict()) == set(model.state_dict())


def test_transformer_config_factorizes_attention_and_ffn():
    from dist_sparse.models import create_model

    model = create_model("transformer_wmt_base", vocab_size=64, d_model=32, ffn_dim=64, heads=4)
    method = _config_method("configs/transformer_wmt_base_cuttlefish.yaml")
    names = method.select_layers(model)
    kinds = {n.rsplit(".", 1)[-1] for n in names}
    assert kinds == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    assert any(".cross_attn." in n for n in names) and any("encoder." in n for n in names)
    method.ranks = {n: 4 for n in names}
    low = method.prepare(model)
    assert not any(isinstance(m, nn.Linear) and m.in_features == 32 and m.out_features == 32
                   for n, m in low.named_modules() if "attn" in n)


@pytest.mark.slow  # ~1 min on a shared 2-core box (real timings of 20 forward passes)
def test_profiling_in_the_method_keeps_a_prefix_dense():
    """The method's profiling path (one process): every stack timed, the dense layers a prefix of stacks,
    the decision in the state and the watched layers the rest."""
    from dist_sparse.methods import create_method
    from dist_sparse.methods.base import RunContext
    from dist_sparse.models import create_model

    cfg = config_from_dict({"model": {"name": "resnet20"}, "method": {"name": "cuttlefish", "profile": True,
                                                                      "profile_zeta": 2}}).method
    method = create_method(cfg)
    method.setup(RunContext(total_steps=10, steps_per_epoch=5, example_input=(torch.randn(2, 1, 28, 28),)))
    model = create_model("resnet20", num_classes=10, in_chans=1, img_size=28, width_mult=0.25)
    method.bind(model, None)
    # stacks: stage 1 (6 equal convs); per later stage its strided first conv, then 5 equal convs
    assert len(method.profile_times) == 5
    assert set(method.dense_stack_layers).isdisjoint(method.candidates)
    assert sorted(method.dense_stack_layers + method.candidates) == sorted(method.select_layers(model))
    fresh = create_method(cfg)
    fresh.load_state_dict(method.state_dict())
    assert fresh.dense_stack_layers == method.dense_stack_layers


def test_plots_after_a_switch(tmp_path):
    # the stable-rank plot (one colour per layer beyond the 10 of the default cycle) and the rank bars
    pytest.importorskip("matplotlib")
    from dist_sparse.methods.cuttlefish import Cuttlefish, CuttlefishConfig

    m = Cuttlefish(CuttlefishConfig())
    names = [f"l{i}" for i in range(12)]
    m.candidates = names
    m.full_ranks = {n: 32 for n in names}
    for j in range(4):
        m.controller.update({n: 20.0 - j + i for i, n in enumerate(names)})
    m.ranks, m.switch_epoch = {n: 8 for n in names}, 3
    paths = m.plot(str(tmp_path))
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["cuttlefish_stable_ranks.png", "cuttlefish_ranks.png"]
    assert all((tmp_path / p.rsplit("/", 1)[-1]).stat().st_size > 1000 for p in paths)
