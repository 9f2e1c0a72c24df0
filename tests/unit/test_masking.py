"""Pure mask machinery: target selection, distributions (ERK by hand), exact counts, drop/grow, ties."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dist_sparse.surgery import masking as M


# ------------------------------------------------------------------------------------------------
# seeds and random masks
# ------------------------------------------------------------------------------------------------


def test_stable_seed_is_deterministic_and_keyed():
    assert M.stable_seed(0, "fc.weight") == M.stable_seed(0, "fc.weight")
    assert M.stable_seed(0, "fc.weight") != M.stable_seed(1, "fc.weight")
    assert M.stable_seed(0, "fc.weight") != M.stable_seed(0, "conv.weight")
    assert 0 <= M.stable_seed("x") < 2**63


def test_random_mask_exact_count_and_reproducible():
    for n_active in (0, 1, 37, 60):
        m = M.random_mask((6, 10), n_active, M.make_generator(0, "a"))
        assert m.dtype == torch.bool and m.shape == (6, 10)
        assert int(m.sum()) == n_active
    a = M.random_mask((6, 10), 20, M.make_generator(3, "layer"))
    b = M.random_mask((6, 10), 20, M.make_generator(3, "layer"))
    c = M.random_mask((6, 10), 20, M.make_generator(3, "other"))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError):
        M.random_mask((2, 2), 5, M.make_generator(0))


def test_active_count_uses_floor_of_zeros():
    assert M.active_count(100, 0.2) == 20  # floor(0.8 * 100) = 80 zeros
    assert M.active_count(10, 0.25) == 3  # floor(7.5) = 7 zeros -> 3 active
    assert M.active_count(7, 1.0) == 7
    assert M.active_count(9, 0.0) == 0


# ------------------------------------------------------------------------------------------------
# which tensors
# ------------------------------------------------------------------------------------------------


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.conv = nn.Conv1d(8, 8, 3, groups=8)  # depthwise
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.pos = nn.Parameter(torch.zeros(1, 4, 8))
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 11, bias=False)
        self.out.weight = self.embed.weight  # tied output projection


def test_sparsifiable_parameters_defaults_and_globs():
    model = _Toy()
    names = [n for n, _ in M.sparsifiable_parameters(model)]
    assert names == ["conv.weight", "attn.in_proj_weight", "attn.out_proj.weight", "fc.weight"]
    with_emb = [n for n, _ in M.sparsifiable_parameters(model, sparse_embeddings=True)]
    assert with_emb[0] == "embed.weight" and len(with_emb) == 5  # the tied projection appears once
    only = [n for n, _ in M.sparsifiable_parameters(model, include=["attn.*"], exclude=["*out_proj*"])]
    assert only == ["attn.in_proj_weight"]


# ------------------------------------------------------------------------------------------------
# distributions
# ------------------------------------------------------------------------------------------------


def test_erk_hand_computed_no_dense_layer():
    # r = (10+2)/20 = 0.6, (10+10)/100 = 0.2, 0.6; budget 10 + 50 + 10 = 70; divisor 12 + 20 + 12 = 44
    shapes = {"a": (10, 2), "b": (10, 10), "c": (2, 10)}
    d, dense = M.erk_densities(shapes, 0.5)
    eps = 70 / 44
    assert dense == []
    assert d["a"] == pytest.approx(0.6 * eps, abs=1e-12) and d["c"] == pytest.approx(0.6 * eps, abs=1e-12)
    assert d["b"] == pytest.approx(0.2 * eps, abs=1e-12)
    counts = {n: M.active_count(math.prod(s), d[n]) for n, s in shapes.items()}
    assert counts == {"a": 20, "b": 32, "c": 20}  # 20 - floor(0.909..) = 20; 100 - floor(68.18) = 32


def test_erk_hand_computed_forces_smallest_layer_dense():
    # r = 4/4 = 1.0, 40/400 = 0.1, 30/200 = 0.15; S = 0.8: zeros 3, 320, 160
    # round 1: eps = (1 + 80 + 40) / (4 + 40 + 30) = 121/74 -> eps * 1.0 > 1: "a" becomes dense
    # round 2: eps = (-3 + 80 + 40) / (40 + 30) = 117/70 -> max 0.15 * 117/70 = 0.2507 <= 1
    shapes = {"a": (2, 2), "b": (20, 20), "c": (10, 20)}
    d, dense = M.erk_densities(shapes, 0.8)
    assert dense == ["a"] and d["a"] == 1.0
    assert d["b"] == pytest.approx(117 / 700, abs=1e-12)
    assert d["c"] == pytest.approx(0.15 * 117 / 70, abs=1e-12)
    counts = {n: M.active_count(math.prod(s), d[n]) for n, s in shapes.items()}
    assert counts == {"a": 4, "b": 67, "c": 51}
    budget = sum(math.prod(s) - math.floor(0.8 * math.prod(s)) for s in shapes.values())
    assert abs(sum(counts.values()) - budget) <= len(shapes)


def test_erk_linear_only_equals_er_and_power_zero_equals_uniform():
    assert M.raw_erk_score((30, 20)) == pytest.approx((30 + 20) / (30 * 20))  # ER for Linear
    assert M.raw_erk_score((8, 4, 3, 3)) == pytest.approx(18 / 288)  # ERK adds the kernel sides
    shapes = {"a": (30, 20), "b": (64, 64), "c": (10, 64)}
    d, _ = M.erk_densities(shapes, 0.7, power_scale=0.0)
    for n, s in shapes.items():
        numel = math.prod(s)
        assert abs(M.active_count(numel, d[n]) - M.active_count(numel, 0.3)) <= 1


def _resnet50_layers() -> dict[str, tuple[tuple[int, ...], int]]:
    """ResNet-50 (torchvision v1.5 layout) conv/fc weight shapes with their output side at 224x224."""
    layers = {"conv1.weight": ((64, 3, 7, 7), 112)}
    cin, side = 64, 56
    for si, (width, blocks) in enumerate(zip([64, 128, 256, 512], [3, 4, 6, 3])):
        for b in range(blocks):
            out_side = side // 2 if (b == 0 and si > 0) else side
            p = f"layer{si + 1}.{b}."
            layers[p + "conv1.weight"] = ((width, cin, 1, 1), side)
            layers[p + "conv2.weight"] = ((width, width, 3, 3), out_side)
            layers[p + "conv3.weight"] = ((4 * width, width, 1, 1), out_side)
            if b == 0:
                layers[p + "downsample.0.weight"] = ((4 * width, cin, 1, 1), out_side)
            cin, side = 4 * width, out_side
    layers["fc.weight"] = ((1000, 2048), 1)
    return layers


@pytest.mark.parametrize("sparsity", [0.8, 0.9])
def test_erk_budget_resnet50(sparsity):
    layers = _resnet50_layers()
    shapes = {n: s for n, (s, _) in layers.items()}
    assert sum(math.prod(s) for s in shapes.values()) == 25_502_912
    d, dense = M.erk_densities(shapes, sparsity)
    counts = {n: M.active_count(math.prod(s), d[n]) for n, s in shapes.items()}
    budget = sum(math.prod(s) - math.floor(sparsity * math.prod(s)) for s in shapes.values())
    assert abs(sum(counts.values()) - budget) <= len(shapes)
    assert all(0.0 < v <= 1.0 for v in d.values())
    # exactly the layers the loop made dense have density 1; every other one is below 1
    assert {n for n, v in d.items() if v == 1.0} == set(dense)
    print(f"ResNet-50 ERK {sparsity}: active {sum(counts.values())}, dense {dense}")
    print({n: round(v, 4) for n, v in d.items()})


def test_flops_fraction_resnet50_matches_reference():
    # Acceptance check 11: 0.23x (uniform, first layer dense) and 0.42x (ERK) at S = 0.8, +-0.01.
    layers = _resnet50_layers()
    shapes = {n: s for n, (s, _) in layers.items()}
    flops = {n: 2 * math.prod(s) * side * side for n, (s, side) in layers.items()}
    uni = M.layer_densities(shapes, 0.8, "uniform")
    erk = M.layer_densities(shapes, 0.8, "erk")
    assert uni["conv1.weight"] == 1.0 and erk["conv1.weight"] < 1.0
    assert M.sparse_flops_fraction(flops, uni) == pytest.approx(0.23, abs=0.01)
    assert M.sparse_flops_fraction(flops, erk) == pytest.approx(0.42, abs=0.01)
    assert M.sparse_flops_fraction(flops, M.layer_densities(shapes, 0.9, "erk")) == pytest.approx(0.24, abs=0.01)


def test_layer_densities_first_last_and_overrides():
    shapes = {"stem.weight": (8, 3, 3, 3), "mid.weight": (16, 8, 3, 3), "head.weight": (10, 16)}
    uni = M.layer_densities(shapes, 0.9, "uniform")
    assert uni == {"stem.weight": 1.0, "mid.weight": pytest.approx(0.1), "head.weight": pytest.approx(0.1)}
    uni_sparse_stem = M.layer_densities(shapes, 0.9, "uniform", first_layer_dense=False, last_layer_dense=True)
    assert uni_sparse_stem["stem.weight"] == pytest.approx(0.1) and uni_sparse_stem["head.weight"] == 1.0
    erk = M.layer_densities(shapes, 0.9, "erk")
    assert erk["stem.weight"] < 1.0  # ERK sparsifies the first layer by default
    ov = M.layer_densities(shapes, 0.9, "erk", overrides={"head.*": 0.5})
    assert ov["head.weight"] == pytest.approx(0.5)
    # the overridden layer is outside the budget: the other two share sum(N - floor(0.9 N))
    budget = sum(n - math.floor(0.9 * n) for n in (8 * 27, 16 * 72))
    got = sum(M.active_count(math.prod(shapes[n]), ov[n]) for n in ("stem.weight", "mid.weight"))
    assert abs(got - budget) <= 2
    with pytest.raises(ValueError):
        M.layer_densities(shapes, 0.9, "er")


# ------------------------------------------------------------------------------------------------
# top-k, drop/grow
# ------------------------------------------------------------------------------------------------


def test_topk_ties_go_to_lowest_flat_index():
    s = torch.ones(3, 4)
    assert torch.equal(M.topk_mask(s, 5).reshape(-1), torch.tensor([1] * 5 + [0] * 7, dtype=torch.bool))
    s = torch.tensor([0.5, 2.0, 0.5, 0.5, float("-inf"), 2.0])
    assert M.topk_mask(s, 3).tolist() == [True, True, False, False, False, True]
    assert M.topk_mask(s, 6).sum() == 6 and M.topk_mask(s, 0).sum() == 0
    big = torch.zeros(10_000)
    big[7] = 1.0
    m = M.topk_mask(big, 100)
    assert m[7] and int(m[:99].sum()) == 99 and not m[100:].any()  # 7 plus indices 0..98


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_topk_same_on_cpu_and_cuda():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 4, (5000,), generator=g).float()  # many ties
    assert torch.equal(M.topk_mask(s, 1234), M.topk_mask(s.cuda(), 1234).cpu())


def test_drop_grow_hand_made():
    mask = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    w = torch.tensor([0.9, -0.1, 0.5, 0.05, 0.0, 0.0, 0.0, 0.0])
    g = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.3, -0.7, 0.1, 0.2])
    res = M.drop_grow(mask, w.abs(), g.abs(), 2)
    # drop the two smallest |w| among active (idx 3: 0.05, idx 1: 0.1); grow the two largest |g| (5, 4)
    assert res.kept.tolist() == [True, False, True, False, False, False, False, False]
    assert res.grown.tolist() == [False, False, False, False, True, True, False, False]
    assert torch.equal(res.mask, res.kept | res.grown) and int(res.mask.sum()) == 4
    assert res.n_drop == 2 and res.n_regrown == 0 and res.n_zero_score == 0
    # a just-dropped position with a large gradient is re-grown (counted as regrown)
    g2 = g.clone()
    g2[1] = 5.0
    res2 = M.drop_grow(mask, w.abs(), g2.abs(), 2)
    assert res2.grown.tolist() == [False, True, False, False, False, True, False, False]
    assert res2.n_regrown == 1
    # inactive entries can never be kept, even when their drop score is large
    res3 = M.drop_grow(mask, torch.full((8,), 1.0), torch.zeros(8), 1)
    assert not (res3.kept & ~mask).any() and int(res3.mask.sum()) == 4
    # all-zero gradient: still exactly k grown, lowest non-kept indices, all counted as zero-score
    res4 = M.drop_grow(mask, w.abs(), torch.zeros(8), 2)
    assert res4.grown.tolist() == [False, True, False, True, False, False, False, False]
    assert res4.n_zero_score == 2 and res4.n_regrown == 2
    with pytest.raises(ValueError):
        M.drop_grow(mask, w, g, 5)


def test_drop_grow_invariants_random():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        mask = M.random_mask((13, 7), 30, gen)
        w = torch.randn(13, 7, generator=gen) * mask
        g = torch.randn(13, 7, generator=gen)
        k = int(torch.randint(0, 31, (1,), generator=gen))
        res = M.drop_grow(mask, w.abs(), g.abs(), k)
        dropped = mask & ~res.kept
        assert int(dropped.sum()) == k == int(res.grown.sum())
        assert not (dropped & ~mask).any()  # dropped subset of old active
        assert not (res.grown & res.kept).any()  # grown and kept disjoint
        assert torch.equal(res.mask, res.kept | res.grown) and int(res.mask.sum()) == 30


def test_magnitude_prune_and_pack_roundtrip():
    mask = torch.tensor([1, 1, 0, 1, 1], dtype=torch.bool)
    w = torch.tensor([0.3, -0.2, 9.0, 0.1, -0.4])
    assert M.magnitude_prune(mask, w.abs(), 2).tolist() == [True, False, False, False, True]
    m = M.random_mask((5, 9, 3), 50, M.make_generator(0))
    assert torch.equal(M.unpack_mask(M.pack_mask(m)), m)
    other = m.clone().reshape(-1)
    i, j = int(torch.nonzero(other)[0]), int(torch.nonzero(~other)[0])
    other[i], other[j] = False, True  # same count, different positions
    assert not torch.equal(M.mask_checksum(m), M.mask_checksum(other.view_as(m)))
