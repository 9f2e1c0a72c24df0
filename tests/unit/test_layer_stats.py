"""Parameter counts and per-layer weight statistics on small hand-computable models."""
from __future__ import annotations

import torch
from torch import nn

from dist_sparse.metrics.layer_stats import (LayerStat, clean_name, count_parameters, global_density,
                                             global_sparsity, layer_stats)


def _mlp() -> nn.Sequential:
    """Linear(6, 4) -> ReLU -> Linear(4, 2), every parameter non-zero (deterministic values)."""
    m = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.arange(1, p.numel() + 1, dtype=p.dtype).reshape(p.shape))
    return m


def test_count_parameters_dense_and_half_sparse():
    m = _mlp()
    # 6*4 + 4 (first layer) + 4*2 + 2 (second layer) = 28 + 10 = 38
    assert count_parameters(m) == (38, 38)
    with torch.no_grad():
        m[0].weight.view(-1)[:12] = 0.0  # exactly half of the 24 first-layer weights
    assert count_parameters(m) == (38, 26)


def test_layer_stats_half_sparse_layer_exact():
    m = _mlp()
    with torch.no_grad():
        m[0].weight.view(-1)[::2] = 0.0  # 12 of 24
    stats = layer_stats(m)
    assert list(stats) == ["0", "2"]
    s0, s2 = stats["0"], stats["2"]
    assert isinstance(s0, LayerStat)
    assert (s0.kind, s0.shape, s0.numel, s0.nonzero, s0.density) == ("linear", (4, 6), 24, 12, 0.5)
    assert (s0.out_channels, s0.in_channels, s0.max_rank) == (4, 6, 4)
    assert s0.weight_name == "0.weight" and s0.tied_to is None
    assert (s2.numel, s2.nonzero, s2.density, s2.max_rank) == (8, 8, 1.0, 2)
    # 12 zeros out of 24 + 8 weights (biases are not layer weights)
    assert global_sparsity(stats) == 12 / 32
    assert global_density(stats) == 20 / 32
    assert global_sparsity({"0": s0}) == 0.5
    assert global_sparsity({}) == 0.0


def test_conv_and_embedding_geometry():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3, groups=2), nn.Conv1d(2, 5, 4, bias=False),
                      nn.Embedding(10, 3))
    stats = layer_stats(m)
    c0, c1, c2, e = stats["0"], stats["1"], stats["2"], stats["3"]
    assert (c0.kind, c0.shape, c0.out_channels, c0.in_channels, c0.max_rank) == ("conv", (8, 3, 3, 3), 8, 3, 8)
    # grouped: weight (4, 8 // 2, 3, 3) -> matrix (4, 36)
    assert (c1.shape, c1.out_channels, c1.in_channels, c1.max_rank, c1.numel) == ((4, 4, 3, 3), 4, 4, 4, 144)
    # (5, 2, 4) -> matrix (5, 8)
    assert (c2.shape, c2.max_rank) == ((5, 2, 4), 5)
    assert (e.kind, e.shape, e.out_channels, e.in_channels, e.max_rank) == ("embedding", (10, 3), 3, 10, 3)
    assert e.to_dict()["shape"] == [10, 3]


def test_tied_weights_counted_once():
    emb = nn.Embedding(5, 4)
    head = nn.Linear(4, 5, bias=False)
    head.weight = emb.weight  # tied: the same Parameter object
    m = nn.ModuleDict({"emb": emb, "head": head})
    with torch.no_grad():
        emb.weight.fill_(1.0)
        emb.weight[0] = 0.0  # 4 zeros of 20
    assert count_parameters(m) == (20, 16)
    stats = layer_stats(m)
    assert stats["head"].tied_to == "emb" and stats["emb"].tied_to is None
    assert stats["head"].density == stats["emb"].density == 0.8
    assert global_sparsity(stats) == 4 / 20  # the shared weight counts once
    assert global_sparsity({"head": stats["head"]}) == 4 / 20  # its target is absent: counted itself


def test_wrapper_names_are_cleaned():
    assert clean_name("module._orig_mod.layer1.0.conv1") == "layer1.0.conv1"
    assert clean_name("blocks.0._checkpoint_wrapped_module.attn.qkv") == "blocks.0.attn.qkv"
    assert clean_name("_fsdp_wrapped_module.fc.weight") == "fc.weight"
    assert clean_name("module") == "" and clean_name("blocks.0._checkpoint_wrapped_module") == "blocks.0"
    assert clean_name("layer.module.x") == "layer.module.x"  # only a leading "module." goes

    class Wrap(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.module = inner

    stats = layer_stats(Wrap(_mlp()))
    assert list(stats) == ["0", "2"]
