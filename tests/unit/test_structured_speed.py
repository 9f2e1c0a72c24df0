"""benchmarks/structured_speed.py times the models the real surgery builds (checks models and output, not time)."""
import copy
import json
import math

import pytest
import torch
from torch import nn

from dist_sparse.metrics.flops import layer_forward_flops
from dist_sparse.surgery import channels as C
from dist_sparse.surgery import gates as G
from dist_sparse.surgery import lowrank as LR
from tests.conftest import load_benchmark

TINY = ["--batch", "2", "--pool", "2", "--steps", "1", "--rounds", "1", "--warmup", "1", "--data", "random",
        "--threads", "1", "--json"]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread (the SVDs and tiny convs are fastest so, and a busy box does not stall them); restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mod():
    return load_benchmark("structured_speed")


def _flops(model):
    return layer_forward_flops(model, torch.zeros(1, 1, 28, 28)).total


def _json_line(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("gating,position", [("channel", "after"), ("channel", "middle"), ("channel", "before"),
                                             ("layer", "after")])
def test_pruned_resnet20_is_the_consensus_model(mod, gating, position):
    args = mod.build_parser().parse_args(["--method", "polarization", "--gating", gating, "--position", position,
                                          "--keep", "0.5"])
    dense, small, facts = mod.build_polarization(args)
    arch = facts["arch"]
    assert arch == mod.build_polarization(args)[2]["arch"]  # seeded: the same decision every time
    # the decision: round(0.5 * units) kept per block (channel) or over the blocks (layer)
    gated = G.insert_gates(copy.deepcopy(dense), gating, position)
    blocks = G.gated_blocks(gated)
    assert len(blocks) == 9 and set(arch["blocks"]) == {n for n, _ in blocks}
    if gating == "channel":
        for name, b in blocks:
            keep = arch["blocks"][name]
            assert keep == sorted(set(keep)) and len(keep) == math.floor(0.5 * b.gated_width() + 0.5)
            assert all(0 <= i < b.gated_width() for i in keep)
    else:
        assert sum(1 for v in arch["blocks"].values() if v == [0]) == 5  # round(4.5) = 5 blocks kept
        assert facts["blocks_removed"] == 4
    # parameters: the dense count minus the units removed (the method's own per-unit counts)
    removed = sum((b.gated_width() - len(arch["blocks"][n])) * C.unit_param_counts(b)[0] for n, b in blocks)
    assert removed > 0
    assert C.count_params(small) == C.count_params(dense) - removed
    if gating == "channel" and position == "after":  # by hand: a conv2 filter (cin x 3 x 3) and bn2's pair
        by_hand = sum((b.conv2.out_channels - len(arch["blocks"][n])) * (b.conv2.in_channels * 9 + 2)
                      for n, b in blocks)
        assert removed == by_hand
    assert _flops(small) < _flops(dense)
    # the pruned model computes what the gated model does with the decision as a constant mask
    masks = {n: torch.zeros(b.gated_width()).index_fill_(0, torch.tensor(arch["blocks"][n], dtype=torch.long), 1.0)
             for n, b in blocks}
    G.set_static_masks(gated, masks)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), gated.eval()(x), rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, G.GatedBlock) for m in small.modules())


def test_lowrank_resnet18_factorizes_only_where_parameters_are_saved(mod):
    args = mod.build_parser().parse_args(["--method", "cuttlefish", "--rank-ratio", "0.85"])
    dense, small, facts = mod.build_cuttlefish(args)
    ranks = facts["ranks"]
    dmods, smods = dict(dense.named_modules()), dict(small.named_modules())
    assert dense.conv1.out_channels == 16 and dense.conv1.in_channels == 1  # quarter width, Fashion-MNIST stem
    convs = [n for n, m in dmods.items() if isinstance(m, nn.Conv2d)]
    candidates = [n for n in convs if n.startswith(("layer2", "layer3", "layer4")) and "downsample" not in n]
    assert facts["layers_candidate"] == len(candidates) == 12
    expect = {}
    for n in candidates:
        shape = tuple(dmods[n].weight.shape)
        r = math.ceil(0.85 * LR.full_rank(shape))
        if LR.saves_parameters(shape, r):
            expect[n] = r
    assert ranks == expect
    assert 0 < len(ranks) < len(candidates)  # a stage's first conv (m = n/2) would grow at this rank: kept dense
    assert all(n.endswith(".0.conv1") for n in set(candidates) - set(ranks))
    for n in convs:
        if n in ranks:
            seq = smods[n]
            assert isinstance(seq, nn.Sequential) and len(seq) == 2 and seq[0].out_channels == ranks[n]
            assert seq[0].kernel_size == dmods[n].kernel_size and seq[0].stride == dmods[n].stride
        else:
            assert type(smods[n]) is nn.Conv2d and smods[n].weight.shape == dmods[n].weight.shape
    for n in ("conv1", "fc"):  # stem and classifier untouched (same layer type and weights)
        assert type(smods[n]) is type(dmods[n])
        assert torch.equal(smods[n].weight, dmods[n].weight)
    saved = sum(LR.dense_params(tuple(dmods[n].weight.shape)) - LR.factorized_params(tuple(dmods[n].weight.shape), r)
                for n, r in ranks.items())
    assert C.count_params(small) == C.count_params(dense) - saved
    assert _flops(small) < _flops(dense)
    # the default ratio 0.25 factorizes every candidate
    quarter = mod.build_cuttlefish(mod.build_parser().parse_args(["--method", "cuttlefish"]))[2]
    assert quarter["layers_factorized"] == 12
    assert quarter["ranks"]["layer4.1.conv2"] == math.ceil(0.25 * 128)


KEYS = {"method", "model", "source", "batch", "threads", "steps", "rounds", "channels_last", "data", "params_dense",
        "params_small", "flops_dense", "flops_small", "flops_ratio", "train_ms_dense", "train_ms_small",
        "train_speedup", "train_realized", "infer_ms_dense", "infer_ms_small", "infer_speedup", "infer_realized"}


@pytest.mark.parametrize("argv,extra", [
    (["--method", "polarization", "--gating", "channel", "--keep", "0.5"], {"units_kept", "units_total"}),
    (["--method", "cuttlefish", "--rank-ratio", "0.25", "--frob-decay", "--channels-last"],
     {"layers_factorized", "ranks", "frob_decay"}),
])
def test_main_prints_table_and_json(mod, capsys, argv, extra):
    assert mod.main(argv + TINY) == 0
    out = capsys.readouterr().out
    line = _json_line(out)
    assert KEYS | extra <= set(line)
    assert line["method"] == argv[1] and line["source"] == "synthetic"
    assert line["flops_ratio"] > 1 and line["params_small"] < line["params_dense"]
    assert line["train_ms_dense"] > 0 and line["infer_ms_small"] > 0
    assert line["train_realized"] == pytest.approx(line["train_speedup"] / line["flops_ratio"])
    assert "| forward MFLOPs/sample |" in out and "speed-up / FLOPs ratio" in out


def test_polarization_export_is_rebuilt(mod, tmp_path, capsys):
    from dist_sparse.checkpoint import save_exported
    from dist_sparse.config import config_from_dict
    from dist_sparse.methods import create_method
    from dist_sparse.train import export_metadata

    args = mod.build_parser().parse_args(["--method", "polarization", "--gating", "channel", "--position", "middle",
                                          "--keep", "0.25", "--seed", "3"])
    dense, small, facts = mod.build_polarization(args)
    cfg = config_from_dict({"model": {"name": "resnet20"},
                            "method": {"name": "polarization", "gating": "channel", "position": "middle"}})
    method = create_method(cfg.method)
    method.pruned = facts["arch"]  # as after the method's decision
    save_exported(small, str(tmp_path / "model.safetensors"),
                  export_metadata(cfg, {"num_classes": 10, "in_chans": 1, "img_size": 28}, method, 0))
    assert mod.main(["--method", "polarization", "--export", str(tmp_path), "--modes", "infer"] + TINY) == 0
    line = _json_line(capsys.readouterr().out)
    assert line["source"] == "export" and line["position"] == "middle"
    assert line["params_small"] == C.count_params(small) and line["params_dense"] == C.count_params(dense)
    assert line["units_kept"] == facts["units_kept"] and "train_ms_dense" not in line


def test_cuttlefish_export_is_rebuilt(mod, tmp_path, capsys):
    from dist_sparse.checkpoint import save_exported
    from dist_sparse.methods import create_method
    from dist_sparse.train import export_metadata

    args = mod.build_parser().parse_args(["--method", "cuttlefish", "--rank-ratio", "0.5"])
    dense, small, facts = mod.build_cuttlefish(args)
    cfg = mod.cuttlefish_config(mod.CUTTLEFISH_CONFIG)
    method = create_method(cfg.method)
    method.ranks = dict(facts["ranks"])  # as after the switch
    path = tmp_path / "model.safetensors"
    save_exported(small, str(path), export_metadata(cfg, {"num_classes": 10, "in_chans": 1, "img_size": 28}, method, 0))
    assert mod.main(["--method", "cuttlefish", "--export", str(path), "--modes", "train"] + TINY) == 0
    line = _json_line(capsys.readouterr().out)
    assert line["source"] == "export" and line["ranks"] == facts["ranks"] and line["layers_candidate"] is None
    assert line["params_small"] == C.count_params(small) and line["params_dense"] == C.count_params(dense)
    assert "infer_ms_dense" not in line
    with pytest.raises(SystemExit, match="exported by method 'cuttlefish', not 'polarization'"):
        mod.main(["--method", "polarization", "--export", str(path)] + TINY)
