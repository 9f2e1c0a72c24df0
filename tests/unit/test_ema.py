"""The weight EMA: the update equation and warm-up against hand-computed values, the swap used for
evaluation, exact save/load (the multi-process and backend checks live in tests/e2e and
tests/distributed)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_sparse.ema import WeightEMA, ema_decay_at


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.register_buffer("stat", torch.zeros(1))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # not floating point: not averaged


def _set(m: Tiny, w: float, stat: float) -> None:
    with torch.no_grad():
        m.w.fill_(w)
        m.stat.fill_(stat)


def test_decay_with_and_without_warmup():
    assert ema_decay_at(0.99996, 0, warmup=False) == 0.99996
    assert ema_decay_at(0.99, 0, warmup=True) == 0.0  # 1 - 1 ** (-2/3): the first update copies
    assert ema_decay_at(0.99, 7, warmup=True) == pytest.approx(0.75)  # 1 - 8 ** (-2/3) = 1 - 1/4
    assert ema_decay_at(0.5, 7, warmup=True) == 0.5  # capped by the decay
    assert ema_decay_at(0.99996, 10 ** 9, warmup=True) == 0.99996


def test_update_follows_the_equation():
    m = Tiny()
    ema = WeightEMA(m, decay=0.5)  # starts at the model: w = 0, stat = 0
    assert ema.names == ["w", "stat"]
    _set(m, 4.0, 2.0)
    ema.update(m, 0)  # 0.5 * 0 + 0.5 * 4
    _set(m, 8.0, 0.0)
    ema.update(m, 1)  # 0.5 * 2 + 0.5 * 8
    assert ema.shadow["w"].tolist() == [5.0, 5.0]
    assert ema.shadow["stat"].tolist() == [0.5]  # 0.5 * (0.5 * 0 + 0.5 * 2) + 0.5 * 0
    assert ema.updates == 2 and ema.shadow["w"].dtype == torch.float32


def test_warmup_update_copies_first_then_averages():
    m = Tiny()
    ema = WeightEMA(m, decay=0.9, warmup=True)
    _set(m, 3.0, 0.0)
    ema.update(m, 0)  # decay 0: the average becomes the weights
    assert ema.shadow["w"].tolist() == [3.0, 3.0]
    _set(m, 7.0, 0.0)
    ema.update(m, 7)  # decay 0.75: 0.75 * 3 + 0.25 * 7 = 4
    assert ema.shadow["w"].tolist() == [4.0, 4.0]


def test_bf16_weights_average_in_fp32():
    m = Tiny().to(torch.bfloat16)
    ema = WeightEMA(m, decay=0.999)
    with torch.no_grad():
        m.w.fill_(1.0)
    for t in range(10):
        ema.update(m, t)
    want = 1.0 - 0.999 ** 10  # an fp32 average: well below bf16's resolution of steps near 1
    assert ema.shadow["w"].dtype == torch.float32
    assert ema.shadow["w"][0].item() == pytest.approx(want, rel=1e-5)


def test_swap_in_evaluates_the_average_and_restores_the_live_weights():
    m = Tiny()
    ema = WeightEMA(m, decay=0.5)
    _set(m, 4.0, 2.0)
    ema.update(m, 0)
    live = {k: v.clone() for k, v in m.state_dict().items()}
    seen = []

    def project(model):  # e.g. a mask: applied to the swapped-in weights only
        seen.append(model.w.tolist())
        with torch.no_grad():
            model.w[1] = 0.0

    with ema.swapped_in(m, project):
        assert m.w.tolist() == [2.0, 0.0] and m.stat.tolist() == [1.0]
    assert seen == [[2.0, 2.0]]
    for k, v in m.state_dict().items():
        assert torch.equal(v, live[k]), k
    assert ema.shadow["w"].tolist() == [2.0, 2.0]  # the projection did not touch the average


def test_swap_restores_even_when_the_block_raises():
    m = Tiny()
    ema = WeightEMA(m, decay=0.5)
    _set(m, 4.0, 2.0)
    with pytest.raises(ZeroDivisionError):
        with ema.swapped_in(m):
            1 / 0
    assert m.w.tolist() == [4.0, 4.0]


def test_full_state_in_one_process_is_the_average():
    m = Tiny()
    ema = WeightEMA(m, decay=0.5)
    _set(m, 4.0, 2.0)
    ema.update(m, 0)
    full = ema.full_state(m)
    assert full["w"].tolist() == [2.0, 2.0] and full["stat"].tolist() == [1.0]


def test_save_load_is_exact(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3))
    ema = WeightEMA(m, decay=0.9)
    for t in range(3):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        m(torch.randn(4, 5))  # running statistics move too
        ema.update(m, t)
    ema.save(str(tmp_path), m)
    other = WeightEMA(m, decay=0.9)
    other.load(str(tmp_path), m)
    assert other.updates == 3
    for n in ema.names:
        assert torch.equal(other.shadow[n], ema.shadow[n]), n


def test_load_refuses_a_checkpoint_without_ema_and_other_tensors(tmp_path):
    m = Tiny()
    ema = WeightEMA(m, decay=0.5)
    with pytest.raises(FileNotFoundError, match="no weight EMA"):
        ema.load(str(tmp_path), m)
    WeightEMA(nn.Linear(2, 2), decay=0.5).save(str(tmp_path), nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="other tensors"):
        ema.load(str(tmp_path), m)


def test_decay_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        WeightEMA(Tiny(), decay=1.0)


def test_tied_weights_are_averaged_once_and_exported_under_every_name():
    m = nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 4, bias=False))
    m[1].weight = m[0].weight  # tied, as a Transformer's embedding and output projection
    ema = WeightEMA(m, decay=0.5)
    assert ema.names == ["0.weight"]
    with torch.no_grad():
        m[0].weight.add_(2.0)
    ema.update(m, 0)
    full = ema.full_state(m)
    assert set(full) == set(m.state_dict()) and torch.equal(full["0.weight"], full["1.weight"])
    m2 = nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 4, bias=False))
    m2.load_state_dict(full)
    assert torch.equal(m2[1].weight, ema.shadow["0.weight"])
