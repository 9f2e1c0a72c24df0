"""Image data: IDX parsing, image folders, local HF data sets, rank-aware resumable loaders."""
from __future__ import annotations

import gzip
import os

import numpy as np
import pytest
import torch

from dist_sparse.config import ConfigError, load_config
from dist_sparse.data import build_data
from dist_sparse.data.vision import ImageLoader, load_fashion_mnist, load_idx_images, load_idx_labels
from tests.conftest import TINY, needs_fmnist


def write_idx(dirpath, prefix, images, labels):
    with gzip.open(os.path.join(dirpath, f"{prefix}-images-idx3-ubyte.gz"), "wb") as fh:
        n, r, c = images.shape
        fh.write(np.array([2051, n, r, c], dtype=">u4").tobytes() + images.astype(np.uint8).tobytes())
    with gzip.open(os.path.join(dirpath, f"{prefix}-labels-idx1-ubyte.gz"), "wb") as fh:
        fh.write(np.array([2049, len(labels)], dtype=">u4").tobytes() + labels.astype(np.uint8).tobytes())


def test_idx_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    imgs, labels = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)
    write_idx(tmp_path, "train", imgs, labels)
    write_idx(tmp_path, "t10k", imgs[:3], labels[:3])
    assert (load_idx_images(str(tmp_path / "train-images-idx3-ubyte.gz")) == imgs).all()
    assert (load_idx_labels(str(tmp_path / "train-labels-idx1-ubyte.gz")) == labels).all()
    data = load_fashion_mnist(str(tmp_path))
    assert data["train_x"].shape == (7, 1, 28, 28) and data["test_y"].tolist() == labels[:3].tolist()


def test_idx_bad_magic(tmp_path):
    p = tmp_path / "x.gz"
    with gzip.open(p, "wb") as fh:
        fh.write(np.array([1234, 1, 1, 1], dtype=">u4").tobytes() + b"\0")
    with pytest.raises(ValueError, match="magic"):
        load_idx_images(str(p))


def test_missing_data_dir_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setattr("dist_sparse.data.vision.FASHION_MNIST_DIRS", (str(tmp_path / "none"),))
    monkeypatch.delenv("DIST_SPARSE_DATA", raising=False)
    with pytest.raises(ConfigError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("")


def _loader(world, rank, n=40, gb=8, augment=True):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, 1, 6, 6), generator=g, dtype=torch.uint8)
    y = torch.arange(n)
    return ImageLoader(lambda idx: (x[idx], y[idx]), n, gb, rank=rank, world_size=world, device="cpu", seed=3,
                       train=True, mean=(0.5,), std=(0.25,), padding=2, hflip=True, augment=augment)


def test_rank_slices_form_the_global_batch_with_identical_augmentation():
    one = list(_loader(1, 0).iter_from(epoch=2))
    two = [list(_loader(2, r).iter_from(epoch=2)) for r in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == 5
    for i in range(5):
        x = torch.cat([two[0][i][0], two[1][i][0]])
        y = torch.cat([two[0][i][1], two[1][i][1]])
        assert torch.equal(y, one[i][1])
        assert torch.equal(x, one[i][0])  # same crop/flip per sample on 1 or 2 processes


def test_epoch_is_a_permutation_and_epochs_differ():
    ys = torch.cat([b[1] for b in _loader(1, 0).iter_from(0)])
    assert sorted(ys.tolist()) == list(range(40))
    ys1 = torch.cat([b[1] for b in _loader(1, 0).iter_from(1)])
    assert not torch.equal(ys, ys1)


def test_iter_from_skips_exactly():
    full = list(_loader(2, 1).iter_from(0))
    tail = list(_loader(2, 1).iter_from(0, start=3))
    assert len(tail) == 2
    for a, b in zip(full[3:], tail):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_val_loader_covers_every_sample_once_with_equal_batch_counts():
    x = torch.zeros(11, 1, 4, 4, dtype=torch.uint8)
    y = torch.arange(11)
    loaders = [ImageLoader(lambda idx: (x[idx], y[idx]), 11, 4, rank=r, world_size=2, device="cpu", seed=0,
                           train=False, mean=(0.0,), std=(1.0,)) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1])
    seen = torch.cat([b[1] for ld in loaders for b in ld.iter_from(0)])
    assert sorted(seen.tolist()) == list(range(11))


def test_batch_not_divisible_by_world_is_an_error():
    with pytest.raises(ConfigError, match="data.batch_size"):
        _loader(3, 0, gb=8)


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(d / f"{i}.png")
    cfg = load_config(TINY, ["data.name=image_folder", f"data.root={tmp_path}", "data.batch_size=4",
                             "data.extra.img_size=8", "run.num_processes=0"])
    b = build_data(cfg, rank=0, world_size=1, device="cpu", run_dir=str(tmp_path))
    assert b.info["num_classes"] == 2 and b.info["in_chans"] == 3 and b.info["img_size"] == 8
    x, y = next(b.train.iter_from(0))
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32
    assert sorted(torch.cat([yy for _, yy in b.val.iter_from(0)]).tolist()) == [0, 0, 1, 1]


def test_hf_image_dataset_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    ds = datasets.DatasetDict({
        split: datasets.Dataset.from_dict({"image": [rng.integers(0, 256, (8, 8)).astype(np.uint8).tolist()
                                                     for _ in range(n)], "label": [i % 3 for i in range(n)]})
        for split, n in (("train", 9), ("test", 4))})
    ds.save_to_disk(str(tmp_path / "ds"))
    cfg = load_config(TINY, ["data.name=hf_image", f"data.root={tmp_path / 'ds'}", "data.batch_size=3", "run.num_processes=0",
                             "data.extra.img_size=8", "data.extra.channels=1"])
    b = build_data(cfg, rank=0, world_size=1, device="cpu", run_dir=str(tmp_path))
    assert b.info["num_classes"] == 3 and len(b.train) == 3
    x, y = next(b.train.iter_from(0))
    assert x.shape == (3, 1, 8, 8)


@needs_fmnist
def test_real_fashion_mnist():
    data = load_fashion_mnist()
    assert data["train_x"].shape == (60000, 1, 28, 28) and data["test_x"].shape == (10000, 1, 28, 28)
    assert torch.bincount(data["train_y"]).tolist() == [6000] * 10


def test_hf_image_dataset_from_parquet_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(1)
    for split, n in (("train", 8), ("test", 3)):
        datasets.Dataset.from_dict({"img": [rng.integers(0, 256, (6, 6, 3)).astype(np.uint8).tolist() for _ in range(n)],
                                    "y": [i % 2 for i in range(n)]}).to_parquet(str(tmp_path / f"{split}.parquet"))
    cfg = load_config(TINY, ["data.name=hf_image", f"data.root={tmp_path}", "data.batch_size=4",
                             "data.extra.img_size=6", "data.extra.channels=3", "data.extra.image_key=img",
                             "data.extra.label_key=y"])
    b = build_data(cfg, rank=0, world_size=1, device="cpu", run_dir=str(tmp_path))
    assert b.info["num_classes"] == 2 and b.info["in_chans"] == 3 and len(b.train) == 2
    x, y = next(b.train.iter_from(0))
    assert x.shape == (4, 3, 6, 6)
    assert sorted(torch.cat([yy for _, yy in b.val.iter_from(0)]).tolist()) == [0, 0, 1]
