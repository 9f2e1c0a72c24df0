"""The decoded-image pipeline trains as well as the in-memory path: the full Fashion-MNIST written as PNG
files into an image folder and into WebDataset shards, ResNet-20 with the tiny recipe (3 epochs, 2
processes, 2 workers each) reaches the in-memory run's test accuracy within 0.5 points. Slow (three
full demo-sized runs)."""
from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

from tests.conftest import FMNIST, TINY, needs_fmnist, read_metrics, run_train

pytestmark = [pytest.mark.slow, needs_fmnist, pytest.mark.multiproc]


def _write_full_folder(root) -> None:
    from PIL import Image

    for split, prefix in (("train", "train"), ("val", "t10k")):
        with gzip.open(os.path.join(FMNIST, f"{prefix}-images-idx3-ubyte.gz")) as fh:
            x = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(os.path.join(FMNIST, f"{prefix}-labels-idx1-ubyte.gz")) as fh:
            y = np.frombuffer(fh.read(), np.uint8, offset=8)
        for c in range(10):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(len(y)):
            Image.fromarray(x[i]).save(root / split / f"c{y[i]}" / f"{i:05d}.png")


def _acc(tmp_path, name: str, extra: list[str]) -> float:
    run_train(["--config", TINY, *extra, f"run.output_dir={tmp_path}", f"run.name={name}",
               "logging.progress_bar=false", "checkpoint.every_epoch=false"], nproc=2, timeout=3600)
    return [r for r in read_metrics(str(tmp_path / name)) if r["event"] == "end"][0]["val_acc"]


def test_png_folder_and_shards_reach_the_in_memory_accuracy(tmp_path):
    from tests.unit.test_shards import folder_to_shards

    _write_full_folder(tmp_path / "png")
    (tmp_path / "wds").mkdir()
    folder_to_shards(tmp_path / "png", tmp_path / "wds", per_shard=5000)
    common = ["data.num_workers=2", "data.extra.img_size=28", "data.extra.channels=1",
              "data.extra.mean=[0.286]", "data.extra.std=[0.353]"]
    ref = _acc(tmp_path, "memory", [])
    folder = _acc(tmp_path, "folder", ["data.name=image_folder", f"data.root={tmp_path / 'png'}", *common])
    shards = _acc(tmp_path, "shards", ["data.name=webdataset", f"data.root={tmp_path / 'wds'}", *common])
    print(f"\ntest top-1: in memory {ref:.4f}, PNG folder {folder:.4f}, shards {shards:.4f}")
    assert abs(folder - ref) <= 0.005 and abs(shards - ref) <= 0.005
    assert folder == shards  # the same files in the same order: the same run
