"""The decoded-image pipeline: DataLoader workers, per-sample seeds, the torchvision/timm recipes.

Real images: Fashion-MNIST test images written as PNG (and JPEG) files into an ImageFolder."""
from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import torch

from dist_sparse.config import DataConfig, load_config
from dist_sparse.data import build_data, calibration_batches
from dist_sparse.data.transforms import build_transforms, sample_seed, seeded
from dist_sparse.errors import ConfigError
from tests.conftest import FMNIST, TINY, needs_fmnist

pytestmark = needs_fmnist


def write_fmnist_folder(root, per_class: int, classes: int = 10, ext: str = "png", upscale: int = 0) -> None:
    """The first ``2 * per_class`` Fashion-MNIST test images of each class as files of
    ``root/{train,val}/<class>/``, optionally upscaled to ``upscale`` pixels (RGB)."""
    from PIL import Image

    with gzip.open(os.path.join(FMNIST, "t10k-images-idx3-ubyte.gz")) as fh:
        x = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(FMNIST, "t10k-labels-idx1-ubyte.gz")) as fh:
        y = np.frombuffer(fh.read(), np.uint8, offset=8)
    for split, offset in (("train", 0), ("val", per_class)):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for k, i in enumerate(np.flatnonzero(y == c)[offset:offset + per_class]):
                im = Image.fromarray(x[i])
                if upscale:
                    im = im.convert("RGB").resize((upscale, upscale), Image.BICUBIC)
                im.save(d / f"{k}.{ext}", quality=90) if ext == "jpg" else im.save(d / f"{k}.{ext}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist_png")
    write_fmnist_folder(root, per_class=6)
    return root


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist_jpg")
    write_fmnist_folder(root, per_class=3, classes=4, ext="jpg", upscale=64)
    return root


def _bundle(root, rank=0, world=1, extra=(), channels=1, size=28):
    cfg = load_config(TINY, ["data.name=image_folder", f"data.root={root}", "data.batch_size=8", "run.num_processes=0",
                             f"data.extra.img_size={size}", f"data.extra.channels={channels}", *extra])
    return build_data(cfg, rank=rank, world_size=world, device="cpu", run_dir=str(root))


def _epoch(loader, epoch=1, start=0):
    return [(x.clone(), y.clone()) for x, y in loader.iter_from(epoch, start)]


def _same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


TIMM_AUG = ["data.transform=timm", "data.auto_augment=rand-m9-mstd0.5-inc1", "data.re_prob=0.25",
            "data.interpolation=bicubic", "data.scale=[0.35,1.0]"]


@pytest.mark.parametrize("aug", [[], TIMM_AUG], ids=["crop_flip", "timm"])
def test_workers_do_not_change_the_tensors(rgb_folder, aug):
    zero = _bundle(rgb_folder, extra=["data.num_workers=0", *aug], channels=3, size=32)
    two = _bundle(rgb_folder, extra=["data.num_workers=2", *aug], channels=3, size=32)
    a = _epoch(zero.train)
    _same(a, _epoch(two.train))
    _same(_epoch(zero.val, 0), _epoch(two.val, 0))
    assert not torch.equal(a[0][0], _epoch(zero.train, epoch=2)[0][0])  # a new epoch: new draws


@pytest.mark.parametrize("aug", [[], TIMM_AUG], ids=["crop_flip", "timm"])
def test_two_ranks_see_the_rows_of_one(rgb_folder, aug):
    one = _epoch(_bundle(rgb_folder, extra=aug, channels=3, size=32).train)
    halves = [_epoch(_bundle(rgb_folder, rank=r, world=2, extra=["data.num_workers=1", *aug], channels=3,
                             size=32).train) for r in (0, 1)]
    glued = [(torch.cat([h0[0], h1[0]]), torch.cat([h0[1], h1[1]])) for h0, h1 in zip(*halves)]
    _same(one, glued)


def test_resume_starts_at_the_exact_batch(folder):
    b = _bundle(folder, extra=["data.num_workers=2"])
    full = _epoch(b.train, epoch=3)
    assert len(full) == len(b.train) == 60 // 8
    _same(full[5:], _epoch(b.train, epoch=3, start=5))


def test_val_shards_cover_every_sample_once(folder):
    for world in (1, 2, 4):  # 60 val images: shards of 60, 30, 15 (the last batches partly empty)
        counts, labels = [], []
        for r in range(world):
            batches = _epoch(_bundle(folder, rank=r, world=world).val, 0)
            counts.append(len(batches))
            labels += [y for _, y in batches]
            assert all(x.shape[1:] == (1, 28, 28) for x, _ in batches)
        assert len(set(counts)) == 1  # the same number of forwards on every rank
        assert torch.cat(labels).bincount().tolist() == [6] * 10


def test_calibration_batches_use_the_eval_transform(folder):
    b = _bundle(folder)
    c1 = [x for x, _ in calibration_batches(b.train, 2)]
    c2 = [x for x, _ in calibration_batches(b.train, 2, epoch=0)]
    assert all(torch.equal(a, c) for a, c in zip(c1, c2))
    aug = [x for x, _ in b.train.iter_from(0)][:2]
    assert not all(torch.equal(a, c) for a, c in zip(c1, aug))  # augmented differs from clean
    assert b.train.augment  # the loader itself is unchanged


def test_seeded_restores_the_global_generators():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with seeded(sample_seed(0, 1, 2)):
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    with seeded(sample_seed(0, 1, 2)):
        assert torch.equal(torch.rand(3), a)
    with seeded(sample_seed(0, 1, 3)):
        assert not torch.equal(torch.rand(3), a)
    assert len({sample_seed(0, e, i) for e in range(20) for i in range(200)}) == 4000


def _coord_image(n=240):
    """An RGB image whose red channel is the column and green the row (value = coordinate)."""
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    return torch.stack([xx, yy, torch.zeros_like(xx)]).to(torch.uint8)


def test_random_resized_crop_area_and_aspect_in_range():
    d = DataConfig(transform="rrc", scale=[0.25, 0.6], ratio=[0.5, 2.0], interpolation="nearest")
    train, _, _ = build_transforms(d, 60, (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255))
    areas, aspects = [], []
    for s in range(60):
        with seeded(s):
            out = train(_coord_image())
        x, y = out[0].long(), out[1].long()  # pixel coordinates of the source image
        w = float(x.max() - x.min() + 1)
        h = float(y.max() - y.min() + 1)
        areas.append(w * h / 240 ** 2)
        aspects.append(w / h)
    tol = 1.1  # nearest sampling of a 60-pixel output loses up to a few source pixels per side
    assert min(areas) >= 0.25 / tol and max(areas) <= 0.6 * tol, (min(areas), max(areas))
    assert min(aspects) >= 0.5 / tol and max(aspects) <= 2.0 * tol
    assert max(areas) - min(areas) > 0.2 and max(aspects) / min(aspects) > 2  # really random


def test_eval_transform_resizes_then_centre_crops():
    d = DataConfig(transform="rrc", crop_pct=0.8, interpolation="nearest")
    _, ev, _ = build_transforms(d, 40, (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255))
    out = ev(_coord_image(200))  # short side 200 -> 50, centre crop 40: source columns 20..180
    assert out.shape == (3, 40, 40)
    assert abs(float(out[0].min()) - 20) <= 4 and abs(float(out[0].max()) - 179) <= 4


def test_timm_randaugment_has_n_ops_of_magnitude_m():
    from timm.data.auto_augment import RandAugment

    d = DataConfig(transform="timm", auto_augment="rand-m7-n3-mstd0.5-inc1", re_prob=0.25)
    train, _, finish = build_transforms(d, 32, (0.5,) * 3, (0.25,) * 3)
    ra = [t for t in train.inner.transforms if isinstance(t, RandAugment)]
    assert len(ra) == 1 and ra[0].num_layers == 3
    assert all(op.magnitude == 7 and op.magnitude_std == 0.5 for op in ra[0].ops)
    names = {op.name for op in ra[0].ops}  # inc1: ops whose severity grows with the magnitude
    assert {"BrightnessIncreasing", "SolarizeIncreasing"} <= names and "Brightness" not in names
    assert finish.erase is not None and finish.erase.probability == 0.25  # after normalization, per sample


def test_the_same_seed_gives_the_same_tensor(rgb_folder):
    d = DataConfig(transform="timm", auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, color_jitter=0.4)
    train, _, _ = build_transforms(d, 32, (0.5,) * 3, (0.25,) * 3)
    from PIL import Image

    img = Image.open(next((rgb_folder / "train" / "c0").iterdir())).convert("RGB")
    outs = []
    for s in (1, 1, 2):
        with seeded(s):
            outs.append(train(img))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert outs[0].dtype == torch.uint8 and outs[0].shape == (3, 32, 32)  # workers hand over uint8


def test_random_erasing_is_per_sample_and_seeded():
    from dist_sparse.data.transforms import Finish

    x = torch.full((4, 3, 16, 16), 128, dtype=torch.uint8)
    keys = [(0, 10), (0, 11), (0, 12), (0, 13)]
    plain = Finish((0.5,) * 3, (0.25,) * 3)(x.clone(), keys, seed=0)
    erase = Finish((0.5,) * 3, (0.25,) * 3, re_prob=1.0)
    a, b = erase(x.clone(), keys, seed=0), erase(x.clone(), keys, seed=0)
    assert torch.equal(a, b)
    changed = (a != plain).flatten(1).float().mean(1)
    assert (changed > 0.01).all() and (changed < 1).all()  # one rectangle of each image
    # a sample's erasing depends on its key only, not on its row or batch-mates
    c = erase(x[2:].clone(), keys[2:], seed=0)
    assert torch.equal(c, a[2:])
    torch.testing.assert_close(plain[0], torch.full((3, 16, 16), (128 / 255 - 0.5) / 0.25))


def test_decoders_agree_on_png(folder):
    a = _epoch(_bundle(folder, extra=["data.decoder=pil"]).val, 0)
    b = _epoch(_bundle(folder, extra=["data.decoder=torchvision"]).val, 0)
    _same(a, b)


def test_reduced_size_jpeg_decoding(rgb_folder):
    from dist_sparse.data.vision import ImageFolderData

    full = ImageFolderData(str(rgb_folder / "train"), 3, decoder="pil")
    small = ImageFolderData(str(rgb_folder / "train"), 3, decoder="pil", draft=20)
    assert full.load(0)[0].size == (64, 64) and small.load(0)[0].size == (32, 32)  # 1/2 scale keeps >= 20


@pytest.mark.parametrize("override,key", [
    (["data.transform=crop_flip", "data.auto_augment=rand-m9"], "data.auto_augment"),
    (["data.transform=rrc", "data.crop_padding=4"], "data.crop_padding"),
    (["data.transform=resize"], "data.transform"),
    (["data.transform=rrc", "data.scale=[0.5,0.1]"], "data.scale"),
    (["data.decoder=opencv"], "data.decoder"),
    (["data.num_workers=-1"], "data.num_workers"),
])
def test_pipeline_keys_are_checked(folder, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["data.name=image_folder", f"data.root={folder}", *override])
    assert err.value.key == key


@pytest.mark.parametrize("override", ["data.num_workers=2", "data.transform=rrc"])
def test_pipeline_keys_are_refused_for_in_memory_sets(override):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert err.value.key == override.split("=")[0] and "fashion_mnist" in str(err.value)


@pytest.mark.parametrize("decoder", ["torchvision", "pil"])
def test_hf_image_column_is_decoded_from_its_bytes(tmp_path, folder, decoder):
    datasets = pytest.importorskip("datasets")
    files = sorted((folder / "val" / "c3").iterdir())[:4]
    for split in ("train", "test"):
        ds = datasets.Dataset.from_dict({"image": [str(f) for f in files], "label": [3] * 4})
        ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / split))
    dd = datasets.DatasetDict({s: datasets.load_from_disk(str(tmp_path / s)) for s in ("train", "test")})
    dd.save_to_disk(str(tmp_path / "dd"))
    cfg = load_config(TINY, ["data.name=hf_image", f"data.root={tmp_path / 'dd'}", "data.batch_size=2",
                             "run.num_processes=0", "data.extra.img_size=28", "data.extra.channels=1",
                             "data.extra.num_classes=10", f"data.decoder={decoder}"])
    b = build_data(cfg, rank=0, world_size=1, device="cpu", run_dir=str(tmp_path))
    got = torch.cat([x for x, _ in b.val.iter_from(0)])
    ref = torch.cat([x for x, _ in _bundle(folder).val.iter_from(0)])  # the same PNG files from the folder
    from PIL import Image

    want = [np.asarray(Image.open(f)) for f in files]
    assert got.shape == (4, 1, 28, 28) and ref.shape[1:] == (1, 28, 28)
    for g, w in zip(got, want):  # normalized back to pixels
        torch.testing.assert_close((g[0] * 0.25 + 0.5) * 255, torch.from_numpy(np.array(w)).float(), atol=1e-3, rtol=0)


def _pair_batch():
    """Two constant images (0 and 200) with labels 1 and 3."""
    x = torch.stack([torch.zeros(3, 32, 32), torch.full((3, 32, 32), 200.0)])
    return x, torch.tensor([1, 3])


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixed_targets_sum_to_one_with_the_mixed_weight(kind):
    from dist_sparse.data.transforms import PairMix

    mix = PairMix(0.8 if kind == "mixup" else 0.0, 1.0 if kind == "cutmix" else 0.0, 1.0, 0.5, 0.0, 5)
    seen = set()
    for first in range(20):
        x, y = _pair_batch()
        out, t = mix(x, y, [(0, first), (0, first + 1)], seed=3)
        torch.testing.assert_close(t.sum(1), torch.ones(2))
        w_partner = float(t[0, 3])  # weight of row 1's label in row 0's target
        assert float(t[0, 1]) == pytest.approx(1 - w_partner)
        share = out[0] / 200.0  # how much of row 1 (value 200) is in row 0, per pixel
        if kind == "mixup":  # every pixel: lam * 0 + (1 - lam) * 200
            torch.testing.assert_close(share, torch.full_like(share, w_partner), atol=1e-5, rtol=0)
        else:  # a pasted box: its area fraction is the partner's weight
            assert set(share.unique().tolist()) <= {0.0, 1.0}
            assert float(share.mean()) == pytest.approx(w_partner, abs=1e-6)
        assert float(t[1, 1]) == pytest.approx(w_partner) and float(t[1, 3]) == pytest.approx(1 - w_partner)
        seen.add(round(w_partner, 4))
    assert len(seen) > 10  # lam really drawn per pair


def test_label_smoothing_is_folded_into_mixed_targets():
    from dist_sparse.data.transforms import PairMix

    x, y = _pair_batch()
    _, t = PairMix(0.8, 0.0, 1.0, 0.5, 0.1, 5)(x, y, [(0, 0), (0, 1)], seed=0)
    torch.testing.assert_close(t.sum(1), torch.ones(2))
    assert float(t[0].min()) == pytest.approx(0.1 / 5)  # off-target classes keep the smoothing mass


def test_mixup_is_rank_invariant_and_needs_even_rows(rgb_folder):
    mix = ["data.mixup=0.8", "data.cutmix=1.0", *TIMM_AUG]
    one = _epoch(_bundle(rgb_folder, extra=mix, channels=3, size=32).train)
    halves = [_epoch(_bundle(rgb_folder, rank=r, world=2, extra=mix, channels=3, size=32).train) for r in (0, 1)]
    glued = [(torch.cat([h0[0], h1[0]]), torch.cat([h0[1], h1[1]])) for h0, h1 in zip(*halves)]
    _same(one, glued)
    assert one[0][1].dtype == torch.float32 and one[0][1].shape == (8, 4)  # soft targets
    with pytest.raises(ConfigError) as err:
        _bundle(rgb_folder, rank=0, world=8, extra=mix, channels=3, size=32)  # 1 row per process
    assert err.value.key == "data.batch_size"


def test_soft_target_loss_is_the_cross_entropy_of_the_mixture():
    from dist_sparse.tasks import ClassificationTask

    task = ClassificationTask.__new__(ClassificationTask)
    task.cfg = load_config(TINY, [])
    logits = torch.randn(4, 5)
    model = lambda x: logits  # noqa: E731
    soft = torch.softmax(torch.randn(4, 5), 1)
    want = -(soft * torch.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(task.loss(model, (None, soft)), want)


def test_repeated_augmentation_spreads_copies_with_their_own_draws(rgb_folder):
    ra = ["data.repeated_aug=2", *TIMM_AUG]
    b = _bundle(rgb_folder, extra=ra, channels=3, size=32)
    keys = b.train._keys(1, 0)
    assert len(keys) == len(b.train) == 12 // 8
    first = keys[0]
    assert [k[1] for k in first[:4]] == [k[1] for k in first[4:]]  # copy 1 of row k at row k + 4
    assert [k[2] for k in first] == [0] * 4 + [1] * 4
    x, _ = next(b.train.iter_from(1))
    assert all(not torch.equal(x[k], x[k + 4]) for k in range(4))  # each copy augmented on its own
    one = _epoch(b.train)
    halves = [_epoch(_bundle(rgb_folder, rank=r, world=2, extra=ra, channels=3, size=32).train) for r in (0, 1)]
    _same(one, [(torch.cat([h0[0], h1[0]]), torch.cat([h0[1], h1[1]])) for h0, h1 in zip(*halves)])
    k3 = _bundle(rgb_folder, extra=["data.repeated_aug=3"], channels=3, size=32).train._keys(0, 0)[0]
    assert [k[2] for k in k3] == [0, 0, 0, 1, 1, 1, 2, 2]  # 3 distinct samples, the last copy cut
