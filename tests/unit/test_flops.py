"""FLOP counting: hand-computed per-layer, sparse, training and inference FLOPs (2 FLOPs per multiply-add)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dist_sparse.metrics.flops import (FlopReport, RunFlops, effective_forward_flops, flop_counter,
                                       flops_summary, format_flops_table, layer_forward_flops,
                                       sparse_forward_flops, training_flops)
from dist_sparse.metrics.layer_stats import layer_stats
from dist_sparse.models import create_model, model_names


class ConvNet(nn.Module):
    """Conv2d(2, 3, 3) on 6x5 -> (3, 4, 3); flatten -> Linear(36, 4); then ``h @ P`` in the root itself."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(36, 4)
        self.proj = nn.Parameter(torch.ones(4, 5))

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1)) @ self.proj


def test_linear_and_conv_exact():
    lin = nn.Sequential(nn.Linear(4, 3))
    r = layer_forward_flops(lin, torch.randn(5, 4))
    assert r.per_layer == {"0": 2 * 4 * 3 * 5} and r.total == 120 and r.other == 0 and r.batch_size == 5

    root = layer_forward_flops(nn.Linear(4, 3), torch.randn(5, 4))  # a root that is itself a layer
    assert root.per_layer == {"": 120.0} and root.kinds == {"": "linear"}

    b = 2
    r = layer_forward_flops(ConvNet(), torch.randn(b, 2, 6, 5))
    conv = 2 * 3 * 2 * 3 * 3 * 4 * 3 * b  # 2 * Cout * Cin * kh * kw * Hout * Wout * batch = 2592
    fc = 2 * 36 * 4 * b
    other = 2 * 4 * 5 * b  # the root's own matmul
    assert r.per_layer == {"conv": conv, "fc": fc}
    assert r.kinds == {"conv": "conv", "fc": "linear"}
    assert (r.other, r.total) == (other, conv + fc + other)
    assert sum(r.per_layer.values()) + r.other == r.total

    one = r.per_sample()
    assert one.batch_size == 1 and one.per_layer == {"conv": conv / b, "fc": fc / b}
    assert one.total == r.total / b and one.other == other / b
    assert FlopReport.from_dict(r.to_dict()) == r
    assert r.scaled(6).total == 3 * r.total


def test_grouped_conv_tuple_and_dict_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Conv1d(4, 6, 2, groups=2)

        def forward(self, x, y):
            return self.a(x).sum() + self.b(y).sum()

    x, y = torch.randn(3, 3), torch.randn(3, 4, 5)
    expect = {"a": 2 * 3 * 2 * 3, "b": 2 * 6 * (4 // 2) * 2 * 4 * 3}
    assert layer_forward_flops(Two(), (x, y)).per_layer == expect
    r = layer_forward_flops(Two(), {"x": x, "y": y})
    assert r.per_layer == expect and r.batch_size == 3
    assert layer_forward_flops(Two(), (x, y), batch_size=1).per_sample().total == sum(expect.values())


def test_mode_restored_and_no_grad():
    m = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    m.train()
    m[1].eval()
    layer_forward_flops(m, torch.randn(2, 4))
    assert m.training and m[0].training and not m[1].training and m[2].training
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("name,kw", [("resnet20", {}), ("deit_micro", {"patch_size": 7})])
def test_project_models(name, kw):
    assert name in model_names()
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=1, img_size=28, **kw)
    x = torch.randn(2, 1, 28, 28)
    r = layer_forward_flops(model, x)
    layers = {n for n, mod in model.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}
    assert layers <= set(r.per_layer)
    assert all(r.per_layer[n] > 0 for n in layers)
    assert sum(r.per_layer.values()) + r.other == r.total

    with torch.no_grad(), flop_counter() as c:
        model.eval()
        model(x)
    assert r.total == c.get_total_flops()

    if name == "deit_micro":  # 16 patches + cls = 17 tokens, width 64, 2 heads of 32
        tokens, b, d = 17, 2, 64
        assert r.per_layer["blocks.0.attn.qkv"] == 2 * b * tokens * d * 3 * d
        assert r.per_layer["blocks.0.attn"] == 2 * 2 * b * 2 * tokens * tokens * 32  # q@k^T and attn@v
        assert r.kinds["blocks.0.attn"] == "Attention"
    else:  # no attention: the stock counter agrees exactly
        with torch.no_grad(), torch.utils.flop_counter.FlopCounterMode(display=False) as plain:
            model(x)
        assert r.total == plain.get_total_flops()
        assert r.other == 0 and set(r.per_layer) == layers


def _mlp() -> nn.Sequential:
    m = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.arange(1, p.numel() + 1, dtype=p.dtype).reshape(p.shape))
    return m


def test_sparse_and_effective_flops():
    m = _mlp()
    x = torch.randn(3, 6)
    dense = layer_forward_flops(m, x)
    f0, f1 = 2 * 6 * 4 * 3, 2 * 4 * 2 * 3  # 144, 48
    assert dense.per_layer == {"0": f0, "2": f1} and dense.total == 192
    with torch.no_grad():
        m[0].weight.view(-1)[:12] = 0.0
    stats = layer_stats(m)
    assert stats["0"].density == 0.5
    assert effective_forward_flops(m, x) == 192 - f0 / 2
    assert sparse_forward_flops(dense, stats) == 120
    assert sparse_forward_flops(dense, {"0.weight": 0.5}) == 120  # parameter names are accepted
    assert sparse_forward_flops(dense, {"module.0": 0.5, "2": 0.25}) == 72 + 12
    with pytest.raises(KeyError):
        sparse_forward_flops(dense, {"nope.weight": 0.5})
    assert sparse_forward_flops(dense, {"nope.weight": 0.5}, strict=False) == 192
    with pytest.raises(ValueError):
        sparse_forward_flops(dense, {"0": 1.5})

    s = flops_summary(m, x)
    assert s == {"flops/forward_dense": 64.0, "flops/forward_effective": 40.0, "flops/forward_fraction": 40 / 64}
    assert flops_summary(m, x, dense_reference=80.0)["flops/forward_fraction"] == 0.5
    assert flops_summary(m, x, dense_reference=_mlp())["flops/forward_fraction"] == 40 / 64
    assert flops_summary(m, x, dense_reference=dense)["flops/forward_fraction"] == 40 / 64


def _two_layer_report() -> FlopReport:
    r = layer_forward_flops(nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)), torch.randn(1, 8))
    assert r.per_layer == {"0": 64, "1": 16}  # F_D = 80
    return r


def test_training_flops_modes():
    r = _two_layer_report()
    d = {"0": 0.5, "1": 0.25}  # F_S = 32 + 4 = 36
    assert training_flops(r) == 240
    assert training_flops(r, d, "dense") == 240
    assert training_flops(r, d, "sparse") == 3 * 36
    assert training_flops(r, d, "sparse_fwd_dense_bwd") == 2 * 36 + 80
    assert training_flops(r, None, "sparse") == 240
    with pytest.raises(ValueError):
        training_flops(r, d, "half")


def test_run_flops_accumulation_and_state():
    r = _two_layer_report()
    run = RunFlops(r)
    assert math.isnan(run.fraction())
    run.add_step({"0": 0.5, "1": 0.25}, "sparse", steps=2)  # 2 * 108 = 216
    added = run.add_step({"0.weight": 1.0, "1.weight": 0.5}, "sparse_fwd_dense_bwd")  # 2 * 72 + 80
    assert added == 224
    assert (run.total, run.dense_total, run.steps) == (440, 720, 3)
    assert run.fraction() == 440 / 720

    state = run.state_dict()
    assert state == {"total": 440.0, "dense_total": 720.0, "steps": 3}
    assert type(state["total"]) is float and type(state["dense_total"]) is float
    resumed = RunFlops(r)
    resumed.load_state_dict(state)
    for acc in (run, resumed):
        acc.add_step({"0": 0.25}, "sparse")  # 3 * (16 + 16) = 96
    assert resumed.state_dict() == run.state_dict() == {"total": 536.0, "dense_total": 960.0, "steps": 4}

    big = RunFlops(r, samples_per_step=4)
    big.add_step({"0": 0.5, "1": 0.25}, "sparse")
    assert big.total == 4 * 108 and big.fraction() == 108 / 240
    with pytest.raises(KeyError):
        resumed.load_state_dict({"total": 1.0})


def test_smaller_and_low_rank_models():
    x = torch.randn(5, 10)
    full = layer_forward_flops(nn.Linear(10, 8), x).total
    half = layer_forward_flops(nn.Linear(10, 4), x).total
    assert half == full / 2
    r = 3
    pair = nn.Sequential(nn.Linear(10, r, bias=False), nn.Linear(r, 7))
    rep = layer_forward_flops(pair, x)
    assert rep.total == 2 * 5 * r * (10 + 7)
    assert rep.per_layer == {"0": 2 * 5 * 10 * r, "1": 2 * 5 * r * 7}


def test_format_flops_table():
    m = ConvNet()
    r = layer_forward_flops(m, torch.randn(2, 2, 6, 5))
    stats = layer_stats(m)
    table = format_flops_table(r, stats)
    lines = table.splitlines()
    for name in ("conv", "fc", "(other)", "total"):
        assert any(line.split()[0] == name for line in lines)
    assert "3x2x3x3" in table and "4x36" in table
    total_line = next(line for line in lines if line.startswith("total"))
    assert f"{r.per_sample().total / 1e6:.3e}" in total_line
    assert len({len(line) for line in lines[:2]}) == 1  # header as wide as the rule
    assert "total" in format_flops_table(r)  # without stats
