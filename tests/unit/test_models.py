"""Model zoo: every registered model builds and runs; exact parameter counts; norms; masking; errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dist_sparse.config import ConfigError
from dist_sparse.models import create_model, model_family, model_names
from dist_sparse.models import deit, resnet, transformer


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --------------------------------------------------------------------------------- registry / shapes

def test_registry_lists_every_model_with_its_family():
    expected = {
        "resnet": {"resnet20", "resnet32", "resnet56", "resnet18", "resnet34", "resnet50"},
        "deit": {"deit_micro", "deit_tiny", "deit_small", "deit_base"},
        "transformer": {"transformer_tiny", "transformer_small", "transformer_wmt_base", "transformer_wmt_big"},
    }
    assert set(model_names()) == set().union(*expected.values())
    for fam, names in expected.items():
        assert {model_family(n) for n in names} == {fam}


@pytest.mark.parametrize("name", model_names())
def test_every_model_forwards_on_meta_device(name):
    # Full-size shape check without allocating memory or running the (slow) inits.
    fam = model_family(name)
    with torch.device("meta"):
        if fam == "transformer":
            m = create_model(name, vocab_size=50)
            y = m(torch.zeros(2, 7, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))
            assert y.shape == (2, 5, 50)
        else:
            extra = {"patch_size": 8} if fam == "deit" else {}
            m = create_model(name, num_classes=13, in_chans=1, img_size=32, **extra)
            y = m(torch.zeros(2, 1, 32, 32))
            assert y.shape == (2, 13)


@pytest.mark.parametrize("name,kw,x_shape", [
    ("resnet20", {}, (3, 3, 32, 32)),
    ("resnet32", {"norm": "gn"}, (2, 1, 28, 28)),
    ("resnet18", {"width_mult": 0.25}, (2, 3, 32, 32)),
    ("resnet18", {"width_mult": 0.25, "stem": "imagenet"}, (2, 3, 64, 64)),
    ("resnet50", {"width_mult": 0.125, "norm": "none"}, (2, 1, 28, 28)),
    ("deit_micro", {"img_size": 32, "patch_size": 8}, (2, 3, 32, 32)),
])
def test_small_vision_models_forward_real_values(name, kw, x_shape):
    torch.manual_seed(0)
    m = create_model(name, num_classes=10, in_chans=x_shape[1], **kw).eval()
    with torch.no_grad():
        y = m(torch.randn(x_shape))
    assert y.shape == (x_shape[0], 10)
    assert torch.isfinite(y).all()


def test_layer_names_are_findable_by_glob():
    r = dict(create_model("resnet20").named_parameters())
    for key in ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer3.2.conv2.weight", "fc.weight", "fc.bias"):
        assert key in r, key
    r18 = dict(create_model("resnet18", width_mult=0.25).named_parameters())
    assert "layer2.0.downsample.0.weight" in r18 and "layer4.1.conv2.weight" in r18
    d = dict(create_model("deit_micro", img_size=32, patch_size=8).named_parameters())
    for key in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.1.attn.qkv.weight",
                "blocks.1.attn.proj.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "head.weight"):
        assert key in d, key
    t = create_model("transformer_tiny", vocab_size=30)
    mods = dict(t.named_modules())
    for key in ("encoder.layers.1.self_attn.q_proj", "encoder.layers.0.self_attn.out_proj", "encoder.layers.0.fc1",
                "decoder.layers.1.cross_attn.k_proj", "decoder.layers.0.self_attn.v_proj", "decoder.layers.1.fc2"):
        assert isinstance(mods[key], nn.Linear), key


def test_wrap_classes_are_the_block_types():
    assert resnet.WRAP_CLASSES == (resnet.BasicBlock, resnet.Bottleneck)
    assert deit.WRAP_CLASSES == (deit.Block,)
    assert transformer.WRAP_CLASSES == (transformer.EncoderLayer, transformer.DecoderLayer)
    t = create_model("transformer_tiny", vocab_size=30)
    assert sum(isinstance(m, transformer.WRAP_CLASSES) for m in t.modules()) == 4


# --------------------------------------------------------------------------------- exact parameter counts

def _conv(cin, cout, k):
    return cin * cout * k * k


def test_resnet20_option_a_parameter_count_by_hand():
    # stem conv+bn; stage s has 3 blocks of two 3x3 convs (each followed by bn: 2C params); fc.
    total = _conv(3, 16, 3) + 2 * 16
    cin = 16
    for c in (16, 32, 64):
        for _ in range(3):
            total += _conv(cin, c, 3) + 2 * c + _conv(c, c, 3) + 2 * c
            cin = c
    total += 64 * 10 + 10
    assert total == 269_722  # the paper's "0.27M"
    assert n_params(create_model("resnet20", num_classes=10, in_chans=3)) == total
    # Option B adds a 1x1 conv + bn at the two stage transitions.
    extra = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert n_params(create_model("resnet20", shortcut="B")) == total + extra == 272_474


def test_resnet18_cifar_parameter_count_by_hand():
    total = _conv(3, 64, 3) + 2 * 64
    cin = 64
    for c in (64, 128, 256, 512):
        for j in range(2):
            total += _conv(cin, c, 3) + 2 * c + _conv(c, c, 3) + 2 * c
            if cin != c:
                total += cin * c + 2 * c  # 1x1 projection + bn
            cin = c
    total += 512 * 10 + 10
    assert total == 11_173_962
    assert n_params(create_model("resnet18", num_classes=10, in_chans=3)) == total


@pytest.mark.parametrize("name,count", [
    # ImageNet stem, 1000 classes: the torchvision reference counts.
    ("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032)])
def test_imagenet_resnet_counts_match_torchvision(name, count):
    with torch.device("meta"):
        m = create_model(name, num_classes=1000, stem="imagenet")
    assert n_params(m) == count


@pytest.mark.parametrize("name,count", [
    # 224x224, patch 16, 1000 classes: the DeiT paper's 5.7M / 22M / 86M.
    ("deit_tiny", 5_717_416), ("deit_small", 22_050_664), ("deit_base", 86_567_656)])
def test_deit_counts_match_published(name, count):
    with torch.device("meta"):
        m = create_model(name)
    assert n_params(m) == count


def test_deit_count_by_hand_and_distilled_extra():
    d, c, p, ch, depth = 64, 10, 4, 1, 2
    tokens = (28 // p) ** 2 + 1
    block = 2 * (2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    total = (ch * p * p * d + d) + d + tokens * d + depth * block + 2 * d + (d * c + c)
    m = create_model("deit_micro", num_classes=c, in_chans=ch, img_size=28, patch_size=p)
    assert n_params(m) == total
    md = create_model("deit_micro", num_classes=c, in_chans=ch, img_size=28, patch_size=p, distilled=True)
    assert n_params(md) == total + d + d + (d * c + c)  # dist token, its position, head_dist


def test_transformer_count_by_hand():
    v, d, f = 37, 64, 256
    attn = 4 * (d * d + d)
    ffn = d * f + f + f * d + d
    enc = attn + ffn + 2 * 2 * d
    dec = 2 * attn + ffn + 3 * 2 * d
    total = v * d + 2 * enc + 2 * d + 2 * dec + 2 * d  # tied output projection adds nothing
    assert n_params(create_model("transformer_tiny", vocab_size=v)) == total
    post = create_model("transformer_tiny", vocab_size=v, pre_norm=False)
    assert n_params(post) == total - 4 * d  # no final LayerNorms in post-norm


def test_transformer_entry_defaults_and_overrides():
    with torch.device("meta"):
        base = create_model("transformer_wmt_base", vocab_size=100)
        big = create_model("transformer_wmt_big", vocab_size=100)
        over = create_model("transformer_wmt_base", vocab_size=100, d_model=128, ffn_dim=64, heads=2, enc_layers=1)
    assert (base.d_model, len(base.encoder.layers), len(base.decoder.layers)) == (512, 6, 6)
    assert base.encoder.layers[0].fc1.out_features == 2048 and base.encoder.layers[0].self_attn.heads == 8
    assert base.dropout.p == 0.1 and big.dropout.p == 0.3
    assert big.d_model == 1024 and big.decoder.layers[0].fc1.out_features == 4096
    assert big.decoder.layers[0].cross_attn.heads == 16
    assert over.d_model == 128 and len(over.encoder.layers) == 1 and len(over.decoder.layers) == 6
    assert over.encoder.layers[0].self_attn.heads == 2


# --------------------------------------------------------------------------------- ResNet details

def test_gn_and_none_have_no_batch_statistics():
    gn = create_model("resnet20", norm="gn")
    none = create_model("resnet20", norm="none")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gn.modules())
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in none.modules())
    for m in gn.modules():
        if isinstance(m, nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0
    assert [m.num_groups for m in gn.modules() if isinstance(m, nn.GroupNorm)][:1] == [4]  # 16 channels -> 4
    assert resnet.GroupNorm2d(512).num_groups == 32 and resnet.GroupNorm2d(24).num_groups == 6
    assert resnet.GroupNorm2d(20).num_groups == 5 and resnet.GroupNorm2d(3).num_groups == 1


@pytest.mark.parametrize("norm,independent", [("gn", True), ("none", True), ("bn", False)])
def test_train_mode_output_depends_on_batch_only_with_bn(norm, independent):
    # The reason GN/none exist: a sample's output must not depend on the rest of its (local) batch.
    torch.manual_seed(0)
    m = create_model("resnet20", norm=norm, in_chans=1, width_mult=0.5).train()
    x = torch.randn(4, 1, 16, 16)
    full, half = m(x)[:2], m(x[:2])
    assert torch.allclose(full, half, atol=1e-5) == independent


def test_zero_init_residual_makes_blocks_identity():
    torch.manual_seed(0)
    m = create_model("resnet20", norm="gn", zero_init_residual=True).eval()
    x = torch.randn(2, 16, 8, 8)
    blk = m.layer1[1]
    assert torch.equal(blk(x), torch.relu(x))
    blk = m.layer2[0]  # option-A shortcut: subsample and zero-pad 16 -> 32 channels
    y = blk(x)
    sub = torch.relu(x[:, :, ::2, ::2])
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], sub) and (y[:, :8] == 0).all() and (y[:, 24:] == 0).all()
    assert all(m_.weight.abs().sum() > 0 for m_ in create_model("resnet20", norm="gn").modules()
               if isinstance(m_, nn.GroupNorm))


def test_img_size_is_ignored_by_resnets():
    torch.manual_seed(0)
    a = create_model("resnet20", img_size=32)
    torch.manual_seed(0)
    b = create_model("resnet20", img_size=224)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.eval()(torch.randn(1, 3, 20, 20)).shape == (1, 10)


def test_width_mult_scales_channels():
    m = create_model("resnet20", width_mult=2.0)
    assert m.conv1.out_channels == 32 and m.fc.in_features == 128
    m = create_model("resnet50", width_mult=0.5)
    assert m.conv1.out_channels == 32 and m.fc.in_features == 1024


# --------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("name,kw", [
    ("resnet20", {"dropout": 0.1}), ("resnet18", {"shortcut": "A"}), ("resnet50", {"patch_size": 4}),
    ("deit_micro", {"norm": "bn"}), ("deit_tiny", {"width_mult": 2.0}),
    ("transformer_tiny", {"vocab_size": 10, "num_classes": 10}),
])
def test_unknown_kwargs_raise_type_error(name, kw):
    with pytest.raises(TypeError, match="unexpected keyword"):
        create_model(name, **kw)


@pytest.mark.parametrize("name,kw,key", [
    ("resnet20", {"norm": "ln"}, "model.norm"),
    ("resnet18", {"stem": "tiny"}, "model.stem"),
    ("resnet20", {"stem": "imagenet"}, "model.stem"),
    ("resnet20", {"width_mult": 0}, "model.width_mult"),
    ("resnet20", {"shortcut": "C"}, "model.extra.shortcut"),
    ("resnet34", {"num_classes": 0}, "model.num_classes"),
    ("deit_micro", {"img_size": 30, "patch_size": 4}, "model.img_size"),
    ("deit_micro", {"drop_path_rate": 1.5}, "model.drop_path_rate"),
    ("transformer_tiny", {"vocab_size": 50, "heads": 3}, "model.extra.heads"),
    ("transformer_tiny", {"vocab_size": 50, "bos_id": 0}, "model.extra.pad_id/bos_id/eos_id"),
    ("transformer_tiny", {"vocab_size": 50, "eos_id": 50}, "model.extra.eos_id"),
])
def test_bad_values_raise_config_error_naming_the_key(name, kw, key):
    with pytest.raises(ConfigError) as err:
        create_model(name, **kw)
    assert err.value.key == key
    assert key in str(err.value)


def test_unknown_model_name_lists_known():
    with pytest.raises(KeyError, match="resnet20"):
        create_model("resnet21")


# --------------------------------------------------------------------------------- DeiT details

@pytest.mark.parametrize("patch,tokens", [(4, 50), (7, 17)])
def test_deit_on_28x28_single_channel(patch, tokens):
    torch.manual_seed(0)
    m = create_model("deit_micro", num_classes=10, in_chans=1, img_size=28, patch_size=patch).eval()
    assert m.pos_embed.shape == (1, tokens, 64)
    x = torch.randn(3, 1, 28, 28)
    y = m(x)
    assert y.shape == (3, 10) and torch.isfinite(y).all()
    # Each image is classified on its own: batch composition does not matter in eval mode.
    assert torch.allclose(m(x[1:2]), y[1:2], atol=1e-5)


def test_deit_distilled_forward_is_mean_of_heads():
    torch.manual_seed(0)
    m = create_model("deit_micro", num_classes=5, in_chans=1, img_size=28, patch_size=7, distilled=True).eval()
    x = torch.randn(2, 1, 28, 28)
    cls, dist = m.forward_heads(x)
    assert m.pos_embed.shape[1] == 18
    assert torch.allclose(m(x), (cls + dist) / 2)
    assert not torch.allclose(cls, dist)


def test_drop_path_drops_whole_samples_and_linear_rates():
    torch.manual_seed(0)
    dp = deit.DropPath(0.5).train()
    y = dp(torch.ones(200, 3, 4))
    per_sample = y.reshape(200, -1)
    assert ((per_sample == 0).all(1) | (per_sample == 2).all(1)).all()
    assert 60 < int((per_sample == 0).all(1).sum()) < 140
    assert torch.equal(dp.eval()(torch.ones(5, 2)), torch.ones(5, 2))
    with torch.device("meta"):
        m = create_model("deit_tiny", img_size=32, patch_size=16, drop_path_rate=0.11)
    rates = [b.drop_path.p for b in m.blocks]
    assert rates[0] == 0.0 and math.isclose(rates[-1], 0.11) and math.isclose(rates[1], 0.01)


def test_deit_train_mode_is_stochastic_eval_is_not():
    torch.manual_seed(0)
    m = create_model("deit_micro", num_classes=4, in_chans=1, img_size=28, patch_size=7, drop_path_rate=0.5)
    x = torch.randn(8, 1, 28, 28)
    assert not torch.allclose(m.train()(x), m(x))
    m.eval()
    assert torch.equal(m(x), m(x))


# --------------------------------------------------------------------------------- Transformer details

def test_sinusoidal_positions_hand_values():
    pe = transformer.sinusoidal_positions(5, 8)
    assert pe.shape == (5, 8)
    assert torch.allclose(pe[0], torch.tensor([0.0, 1.0] * 4))
    assert math.isclose(pe[1, 0].item(), math.sin(1.0), rel_tol=1e-6)
    assert math.isclose(pe[1, 1].item(), math.cos(1.0), rel_tol=1e-6)
    assert math.isclose(pe[3, 2].item(), math.sin(3 / 10000 ** (2 / 8)), rel_tol=1e-6)
    assert math.isclose(pe[4, 7].item(), math.cos(4 / 10000 ** (6 / 8)), rel_tol=1e-6)


def _tiny(pre_norm=True, seed=0):
    torch.manual_seed(seed)
    return create_model("transformer_tiny", vocab_size=23, pre_norm=pre_norm).eval()


@pytest.mark.parametrize("pre_norm", [True, False])
def test_transformer_padding_does_not_change_real_positions(pre_norm):
    m = _tiny(pre_norm)
    g = torch.Generator().manual_seed(1)
    src_a, tgt_a = torch.randint(3, 23, (1, 4), generator=g), torch.randint(3, 23, (1, 3), generator=g)
    src_b, tgt_b = torch.randint(3, 23, (1, 7), generator=g), torch.randint(3, 23, (1, 6), generator=g)
    # Batch the two pairs, padding the shorter one on the right with pad_id=0.
    src = torch.zeros(2, 7, dtype=torch.long)
    tgt = torch.zeros(2, 6, dtype=torch.long)
    src[0, :4], src[1] = src_a, src_b
    tgt[0, :3], tgt[1] = tgt_a, tgt_b
    with torch.no_grad():
        out = m(src, tgt)
        alone_a, alone_b = m(src_a, tgt_a), m(src_b, tgt_b)
    assert out.shape == (2, 6, 23)
    assert torch.allclose(out[0, :3], alone_a[0], atol=1e-5)
    assert torch.allclose(out[1], alone_b[0], atol=1e-5)
    # Extra padding on both sides of the batch changes nothing either.
    src_pad = torch.cat([src, torch.zeros(2, 3, dtype=torch.long)], 1)
    tgt_pad = torch.cat([tgt, torch.zeros(2, 2, dtype=torch.long)], 1)
    with torch.no_grad():
        out2 = m(src_pad, tgt_pad)
    assert torch.allclose(out2[:, :6], out, atol=1e-5)
    assert torch.isfinite(out2).all()


def test_transformer_is_causal_and_reads_the_source():
    m = _tiny()
    g = torch.Generator().manual_seed(2)
    src, tgt = torch.randint(3, 23, (2, 6), generator=g), torch.randint(3, 23, (2, 5), generator=g)
    with torch.no_grad():
        base = m(src, tgt)
        tgt2 = tgt.clone()
        tgt2[:, 3] = (tgt2[:, 3] - 3 + 1) % 20 + 3  # change position 3 of the target
        fut = m(src, tgt2)
        src2 = src.clone()
        src2[:, 0] = (src2[:, 0] - 3 + 1) % 20 + 3
        other = m(src2, tgt)
    assert torch.allclose(base[:, :3], fut[:, :3], atol=1e-6)  # earlier positions cannot see position 3
    assert not torch.allclose(base[:, 3:], fut[:, 3:], atol=1e-4)
    assert not torch.allclose(base, other, atol=1e-4)  # every position depends on the source


def test_transformer_embeddings_are_shared_and_tied():
    m = _tiny()
    h = torch.randn(3, 64)
    assert torch.equal(m.output_logits(h), h @ m.embed_tokens.weight.T)
    assert torch.equal(m.embed_tokens.weight[0], torch.zeros(64))  # pad row
    x = m.embed(torch.tensor([[5, 0]]))
    assert torch.allclose(x[0, 0], m.embed_tokens.weight[5] * 8.0 + m.positions[0])
    assert torch.allclose(x[0, 1], m.positions[1])


def test_transformer_rejects_too_long_input():
    m = create_model("transformer_tiny", vocab_size=23, max_len=8)
    with pytest.raises(ValueError, match="max_len=8"):
        m(torch.ones(1, 9, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))
