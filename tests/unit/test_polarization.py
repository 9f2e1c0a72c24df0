"""Polarization-regularized gating: regularizer, STE, gates, consensus and physical pruning (one process).

The distributed checks (2 ranks: regularizer gradient, consensus mask, backends) are in
tests/distributed/test_polarization_dist.py.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_sparse.checkpoint import load_exported, save_exported
from dist_sparse.config import config_from_dict
from dist_sparse.errors import ConfigError
from dist_sparse.methods import create_method
from dist_sparse.methods.base import RunContext
from dist_sparse.methods.polarization import (Polarization, PolarizationConfig, derive_consensus, global_gate_means,
                                              polar_terms, weighted_act)
from dist_sparse.metrics.flops import layer_forward_flops
from dist_sparse.models import create_model
from dist_sparse.surgery.channels import count_params, prune_resnet, unit_param_counts
from dist_sparse.surgery.gates import (GatedBlock, GateHead, gate_param_count, gated_blocks, insert_gates,
                                       set_static_masks, ste)

T = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731


# ------------------------------------------------------------------------------------------------
# 5.1 - 5.4: regularizer values, gradient, STE
# ------------------------------------------------------------------------------------------------


def test_polar_layer_form_values():
    polar, act = polar_terms([T(0.5), T(0.2), T(1.0)])
    assert abs(polar.item() - 0.136667) < 1e-6 and abs(act.item() - 0.566667) < 1e-6
    assert polar_terms([T(0.0), T(1.0), T(0.0), T(1.0)])[0].item() == 0
    assert abs(polar_terms([T(0.5)] * 5)[0].item() - 0.25) < 1e-7
    # from raw gates: 4 samples x 1 gate
    for raw, want in (([1, 1, 0, 0], 0.25), ([1, 1, 1, 1], 0.0)):
        gbar = global_gate_means([torch.tensor(raw, dtype=torch.float32).reshape(4, 1)])
        assert abs(polar_terms(gbar)[0].item() - want) < 1e-7


def test_polar_channel_form_is_mean_of_layer_means():
    polar, _ = polar_terms([T(0.5, 0.5), T(0.1, 0.9, 0.0, 1.0)])
    assert abs(polar.item() - 0.1475) < 1e-6  # a flattened mean would be 0.113333


def test_polar_gradient():
    g = [T(0.5).requires_grad_(), T(0.2).requires_grad_(), T(1.0).requires_grad_()]
    polar_terms(g)[0].backward()
    got = [x.grad.item() for x in g]
    assert got == pytest.approx([0.0, 0.2, -1 / 3], abs=1e-6)


def test_weighted_act_values_and_gradient():
    # layer 0: one unit removing 10 parameters; layer 1: two units removing 30 each -> total 70
    g = [T(0.5).requires_grad_(), T(1.0, 0.0).requires_grad_()]
    act = weighted_act(g, [[10], [30, 30]])
    assert abs(act.item() - (10 * 0.5 + 30 * 1.0 + 30 * 0.0) / 70) < 1e-7  # 0.5; the uniform form gives 0.5 too
    act.backward()
    assert g[0].grad.tolist() == pytest.approx([10 / 70]) and g[1].grad.tolist() == pytest.approx([30 / 70] * 2)
    # differs from the uniform mean of layer means when the costs differ
    g2 = [T(0.0), T(1.0, 1.0)]
    assert abs(weighted_act(g2, [[10], [30, 30]]).item() - 60 / 70) < 1e-7
    assert abs(polar_terms(g2)[1].item() - 0.5) < 1e-7
    with pytest.raises(ConfigError, match="act_weighting"):
        PolarizationConfig(act_weighting="flops").validate()


def test_ste_forward_backward():
    z = T(-2, -1, -0.5, 0, 0.5, 1, 2).requires_grad_()
    y = ste(z)
    assert y.tolist() == [0, 0, 0, 0, 1, 1, 1]
    y.sum().backward()
    assert z.grad.tolist() == [0, 1, 1, 1, 1, 1, 0]


def test_gate_head_parameter_count():
    for depth, hidden in ((1, 16), (2, 16), (2, 4)):
        for n_out in (1, 32):
            head = GateHead(64, n_out, depth, hidden)
            assert sum(p.numel() for p in head.parameters()) == gate_param_count(64, n_out, depth, hidden)
    assert gate_param_count(64, 1, 2, 16) == 64 * 16 + 16 + 16 * 1 + 1
    assert gate_param_count(64, 32, 1, 16) == 64 * 32 + 32


def test_gates_start_open_and_insert_is_pure():
    a = insert_gates(create_model("resnet20", width_mult=0.25), "channel", "after", seed=3)
    b = insert_gates(create_model("resnet20", width_mult=0.25), "channel", "after", seed=3)
    ga = {k: v for k, v in a.state_dict().items() if ".gate." in k}
    assert ga and all(torch.equal(v, b.state_dict()[k]) for k, v in ga.items())
    a.eval()
    with torch.no_grad():
        a(torch.randn(2, 3, 16, 16))
    assert all(bool((blk.last_gates == 1).all()) for _, blk in gated_blocks(a))


# ------------------------------------------------------------------------------------------------
# 5.9, 5.11, 5.13: physical pruning is exact, smaller, and loads without gates
# ------------------------------------------------------------------------------------------------


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)


def _random_masks(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    masks, keep = {}, {}
    for i, (name, blk) in enumerate(gated_blocks(model)):
        k = blk.gated_width()
        m = (torch.rand(k, generator=gen) > 0.5).float()
        if i == 1:
            m.zero_()  # one fully closed block
        if i == 3:  # the first block of stage 2 downsamples: keep about half of it open
            m = (torch.arange(k) % 2 == 0).float()
        masks[name], keep[name] = m, [j for j in range(k) if m[j] > 0]
    return masks, keep


def _expected_removed(model, keep, gating, position) -> int:
    """Parameters the surgery removes, from shapes alone (independent of the surgery code)."""
    removed = 0
    for name, blk in gated_blocks(model):
        kept = len(keep[name])
        c1, c2 = blk.conv1.weight.shape, blk.conv2.weight.shape
        branch = c1.numel() + c2.numel() + 4 * 1 + 2 * c1[0] + 2 * c2[0] - 4
        if gating == "layer":
            removed += 0 if kept else branch
        elif position == "middle":
            closed = c1[0] - max(kept, 1)
            removed += closed * (c1[1] * 9 + 2 + c2[0] * 9)
        elif position == "after":
            closed = c2[0] - kept
            removed += branch if kept == 0 else closed * (c2[1] * 9 + 2)
        else:  # before: the input slice of conv1 (one zeroed channel stays when all are closed)
            removed += (c1[1] - max(kept, 1)) * c1[0] * 9
    return removed


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("gating,position", [("layer", "after"), ("channel", "before"), ("channel", "middle"),
                                             ("channel", "after")])
def test_physical_pruning_is_exact(gating, position, shortcut, tmp_path):
    torch.manual_seed(0)
    kw = dict(num_classes=10, in_chans=3, width_mult=0.25, shortcut=shortcut)
    registered = create_model("resnet20", **kw)
    gated = insert_gates(copy.deepcopy(registered), gating, position)
    _randomize_bn(gated)
    masks, keep = _random_masks(gated)
    set_static_masks(gated, masks)
    gated.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        want = gated(x)
    arch = {"gating": gating, "position": position, "blocks": keep}
    pruned = prune_resnet(copy.deepcopy(gated), arch).eval()
    with torch.no_grad():
        got = pruned(x)
    assert (got - want).abs().max().item() <= 1e-5
    assert torch.equal(got.argmax(1), want.argmax(1))
    assert not any(isinstance(m, (GatedBlock, GateHead)) for m in pruned.modules())
    assert count_params(pruned) == count_params(registered) - _expected_removed(gated, keep, gating, position)
    f_dense = layer_forward_flops(registered.eval(), (x[:1],)).per_sample().total
    f_pruned = layer_forward_flops(pruned, (x[:1],)).per_sample().total
    assert f_pruned < f_dense
    # the export rebuilds the architecture from data, without gate modules
    path = str(tmp_path / "m.safetensors")
    save_exported(pruned, path, {"model": "resnet20", "model_kwargs": json.dumps(kw), "method": "polarization",
                                 "architecture": json.dumps({"pruned": arch})})
    loaded = load_exported(path).eval()
    assert not any(type(m).__module__.startswith(("dist_sparse.surgery", "dist_sparse.methods"))
                   for m in loaded.modules())
    with torch.no_grad():
        assert (loaded(x) - want).abs().max().item() <= 1e-5


def test_bottleneck_pruning_is_exact():
    torch.manual_seed(0)
    for gating, position in (("layer", "after"), ("channel", "middle"), ("channel", "after"), ("channel", "before")):
        gated = insert_gates(create_model("resnet50", width_mult=0.125), gating, position)
        _randomize_bn(gated)
        masks, keep = _random_masks(gated)
        set_static_masks(gated, masks)
        gated.eval()
        x = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            diff = (gated(x) - prune_resnet(copy.deepcopy(gated), {"gating": gating, "position": position,
                                                                   "blocks": keep}).eval()(x)).abs().max()
        scale = max(1.0, gated(x).abs().max().item())  # deep, random-BN bottlenecks: outputs far above 1
        assert diff.item() <= 1e-5 * scale, (gating, position)


def test_eq11_rate_matches_physical_pruning():
    model = insert_gates(create_model("resnet20", width_mult=0.25), "layer")
    masks, keep = _random_masks(model, seed=5)
    units = torch.tensor([u for _, b in gated_blocks(model) for u in unit_param_counts(b)], dtype=torch.float64)
    total = count_params(model)
    gbar = torch.cat([masks[n] for n, _ in gated_blocks(model)]).double()
    rate = float((units * (1 - gbar)).sum()) / total
    pruned = prune_resnet(copy.deepcopy(model), {"gating": "layer", "blocks": keep})
    assert rate == pytest.approx(1 - count_params(pruned) / total, abs=1e-12)
    # per-sample masks: the Eq. 11 rate is the mean of the per-sample rates
    rates, stack = [], []
    for s in range(4):
        m, k = _random_masks(model, seed=10 + s)
        stack.append(torch.cat([m[n] for n, _ in gated_blocks(model)]).double())
        rates.append(1 - count_params(prune_resnet(copy.deepcopy(model), {"gating": "layer", "blocks": k})) / total)
    mean_gbar = torch.stack(stack).mean(0)
    assert float((units * (1 - mean_gbar)).sum()) / total == pytest.approx(sum(rates) / 4, abs=1e-12)


# ------------------------------------------------------------------------------------------------
# 5.8, 5.10: consensus in one process, dynamic vs static agreement
# ------------------------------------------------------------------------------------------------


def _fixed_gates(model, gen_seed=0):
    """Make every gate input-independent (weights 0, bias +-0.5): a perfectly unified model."""
    g = torch.Generator().manual_seed(gen_seed)
    for _, blk in gated_blocks(model):
        last = blk.gate.fc2 or blk.gate.fc1
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.where(torch.rand(last.bias.shape, generator=g) > 0.4, 0.5, -0.5))


def test_consensus_and_dynamic_static_agreement():
    torch.manual_seed(0)
    model = insert_gates(create_model("resnet20", width_mult=0.25, in_chans=1), "channel", "middle")
    _fixed_gates(model)
    _randomize_bn(model)
    batches = [(torch.randn(8, 1, 16, 16),) for _ in range(3)]
    res = derive_consensus(model, batches, lambda m, b: m(b[0]))
    assert res["unification"] == 1.0 and res["sample_agreement"] == 1.0 and res["samples"] == 24
    pruned = prune_resnet(copy.deepcopy(model), {"gating": "channel", "position": "middle", "blocks": res["keep"]})
    model.eval(), pruned.eval()
    with torch.no_grad():
        for (x,) in batches:
            a, b = model(x), pruned(x)
            assert torch.equal(a.argmax(1), b.argmax(1)) and (a - b).abs().max().item() <= 1e-5


def test_consensus_tie_keeps_and_reports_ambiguity():
    model = insert_gates(create_model("resnet20", width_mult=0.25, in_chans=1), "layer")
    name, blk = gated_blocks(model)[0]
    real = blk.gate.forward
    blk.gate.forward = lambda x: torch.tensor([[1.0], [0.0]]).repeat(x.shape[0] // 2, 1)  # exactly half open
    res = derive_consensus(model, [(torch.randn(4, 1, 8, 8),)], lambda m, b: m(b[0]))
    blk.gate.forward = real
    assert res["p"][name] == [0.5] and res["keep"][name] == [0]  # p >= tau keeps
    assert res["unification"] < 1 and res["max_ambiguity"] == 0.5
    assert res["sample_agreement"] == 0.5  # the samples whose first gate is closed disagree with the mask


# ------------------------------------------------------------------------------------------------
# 5.5, 5.6: the toy task polarizes; lambda_act controls the rate
# ------------------------------------------------------------------------------------------------


def _toy_batch(i: int, n: int = 64):
    g = torch.Generator().manual_seed(i)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
    x[:, :, :2, :2] += y.view(-1, 1, 1, 1).float()
    return x, y


def _toy_run(lambda_polar: float, lambda_act: float, steps: int = 30, **kw):
    kw = {"gate_init_bias": 0.0, "gate_init_std": 1.0, "gate_depth": 1, **kw}
    cfg = PolarizationConfig(lambda_polar=lambda_polar, lambda_act=lambda_act, **kw)
    method = Polarization(cfg, seed=0)
    method.setup(RunContext(total_steps=steps, steps_per_epoch=steps))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = method.prepare(create_model("resnet20", num_classes=4, in_chans=1, width_mult=0.25))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    method.bind(model, opt)
    for s in range(steps):
        x, y = _toy_batch(s)
        loss = F.cross_entropy(model(x), y) + method.regularizer(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(model, s)
    res = derive_consensus(model, [_toy_batch(1000 + i) for i in range(3)], lambda m, b: m(b[0]))
    p = torch.tensor([v for layer in res["p"].values() for v in layer], dtype=torch.float64)
    return method, res, p


def test_toy_task_polarizes():
    torch.set_num_threads(1)
    _, res, p = _toy_run(3.0, 0.1, steps=60)
    polarized = ((p <= 0.01) | (p >= 0.99)).double().mean().item()
    assert polarized >= 0.95 and float(((1 - p) * p).mean()) < 0.01 and res["unification"] >= 0.95
    _, _, p0 = _toy_run(0.0, 0.1, steps=60)
    assert float(((1 - p0) * p0).mean()) > float(((1 - p) * p).mean())  # the term does something
    _, res5, _ = _toy_run(3.0, 0.5)
    assert sum(len(v) for v in res5["keep"].values()) < len(res5["keep"])  # at least one gate closed


_OPEN = dict(gating="channel", position="middle", gate_init_bias=0.5, gate_init_std=0.01, gate_depth=2,
             polar_schedule="ramp", ramp_start=0.5, ramp_end=0.8)  # every gate starts open; polarize late


def test_rate_is_monotone_in_lambda_act():
    # 5.6(a): the Eq. 11 rate on the eval set does not decrease with lambda_act (1 point of noise allowed)
    torch.set_num_threads(1)
    rates = [100 * m.prune_rate(p) for m, _, p in (_toy_run(3.0, la, steps=150, **_OPEN) for la in (0, 0.25, 0.5, 1))]
    assert all(b >= a - 1 for a, b in zip(rates, rates[1:])), rates
    assert rates[0] < 1 and rates[-1] > 50, rates  # lambda_act 0 keeps every gate, 1 closes most


def test_controller_law_by_hand():
    cfg = PolarizationConfig(target_sparsity=0.5, controller_eta=0.1, controller_kp=2.0, controller_floor=-1.0,
                             controller_interval=1, lambda_act=0.2)
    m = Polarization(cfg)
    assert m.lambda_act == pytest.approx(1.0)  # 0.2 + 2 * (0.5 - 0), clipped to 1: all gates start open
    m._units, m._total_params = [[30], [10, 10]], 100
    m._ctl = [torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64), 1]  # rate 0.3
    m._control()
    assert m._la_int == pytest.approx(0.22) and m.lambda_act == pytest.approx(0.22 + 2 * 0.2)
    m._ctl = [torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64) * 2, 2]  # rate 0.5 + ... all closed: 0.5
    m._control()
    assert m.lambda_act == pytest.approx(0.22)  # on target: the integral alone
    m._ctl = [torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64), 1]
    m._units = [[60], [20, 20]]  # rate 1.0: error -0.5
    m._control()
    assert m._la_int == pytest.approx(0.17) and m.lambda_act == pytest.approx(-0.83)  # below 0 with the floor at -1
    resumed = Polarization(cfg)
    resumed.load_state_dict(m.state_dict())
    assert (resumed._la_int, resumed.lambda_act) == (m._la_int, m.lambda_act)  # the integral is checkpointed
    with pytest.raises(ConfigError, match="controller_floor"):
        PolarizationConfig(controller_floor=-2).validate()


@pytest.mark.parametrize("target", [0.3, 0.5])
def test_controller_reaches_the_target_band(target):
    # 5.6(b): with the controller the Eq. 11 rate on the eval set ends within +-3 points of the target
    torch.set_num_threads(1)
    m, res, p = _toy_run(3.0, 0.0, steps=150, target_sparsity=target, controller_interval=1, controller_eta=0.01,
                         controller_kp=8.0, controller_floor=-1.0, act_weighting="params", **_OPEN)
    assert abs(m.prune_rate(p) - target) <= 0.03 and res["unification"] >= 0.95


# ------------------------------------------------------------------------------------------------
# Config and model checks
# ------------------------------------------------------------------------------------------------


def test_refuses_non_resnet_models():
    method = create_method(config_from_dict({"model": {"name": "resnet20"},
                                             "method": {"name": "polarization"}}).method)
    with pytest.raises(ConfigError, match="model.name"):
        method.prepare(create_model("deit_tiny", num_classes=10, img_size=32))


def test_refuses_channel_gates_with_groupnorm_and_bad_values():
    method = create_method(config_from_dict({"model": {"name": "resnet20"},
                                             "method": {"name": "polarization", "gating": "channel"}}).method)
    with pytest.raises(ConfigError, match="model.norm"):
        method.prepare(create_model("resnet20", norm="gn"))
    with pytest.raises(ConfigError, match="method.lambda_act"):
        config_from_dict({"model": {"name": "resnet20"}, "method": {"name": "polarization", "lambda_act": 2}})


def test_ramp_schedule():
    cfg = PolarizationConfig(polar_schedule="ramp", lambda_polar=3.0, ramp_start=0.2, ramp_end=0.6)
    m = Polarization(cfg)
    m.setup(RunContext(total_steps=100, steps_per_epoch=10))
    assert [m.lambda_polar(s) for s in (0, 19, 20, 40, 60, 99)] == pytest.approx([0, 0, 0, 1.5, 3, 3])
