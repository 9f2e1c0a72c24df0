"""WebDataset tar shards: the same images as an image folder give the same tensors; every sample once
per epoch over ranks and workers."""
from __future__ import annotations

import io
import os
import tarfile

import pytest

from dist_sparse.config import load_config
from dist_sparse.data import build_data
from dist_sparse.errors import ConfigError
from tests.conftest import TINY, needs_fmnist
from tests.unit.test_pipeline import _epoch, _same, write_fmnist_folder

pytestmark = needs_fmnist


def folder_to_shards(folder, out, per_shard: int) -> None:
    """Each split of an ImageFolder written as WebDataset shards (``<key>.png`` + ``<key>.cls``), in the
    folder's sorted order, ``per_shard`` samples a shard."""
    for split in ("train", "val"):
        classes = sorted(os.listdir(folder / split))
        files = [(folder / split / c / f, ci) for ci, c in enumerate(classes) for f in sorted(os.listdir(folder / split / c))]
        for s in range(0, len(files), per_shard):
            with tarfile.open(out / f"{split}-{s // per_shard:05d}.tar", "w") as tf:
                for k, (path, label) in enumerate(files[s:s + per_shard]):
                    key = f"{split}_{s + k:06d}"
                    for name, data in ((f"{key}.png", path.read_bytes()), (f"{key}.cls", str(label).encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(data)
                        tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    folder = tmp_path_factory.mktemp("png")
    write_fmnist_folder(folder, per_class=5)
    shards = tmp_path_factory.mktemp("wds")
    folder_to_shards(folder, shards, per_shard=16)
    return folder, shards


def _data(name, root, rank=0, world=1, extra=()):
    cfg = load_config(TINY, [f"data.name={name}", f"data.root={root}", "data.batch_size=8", "run.num_processes=0",
                             "data.extra.img_size=28", "data.extra.channels=1", *extra])
    return build_data(cfg, rank=rank, world_size=world, device="cpu", run_dir=str(root))


def test_shards_give_the_tensors_of_the_same_image_folder(both):
    folder, shards = both
    a, b = _data("image_folder", folder), _data("webdataset", shards, extra=["data.num_workers=2"])
    assert len(os.listdir(shards)) == 8 and b.info["num_classes"] == 10 and len(b.train) == 50 // 8
    _same(_epoch(a.train), _epoch(b.train))
    _same(_epoch(a.val, 0), _epoch(b.val, 0))


def test_every_sample_once_per_epoch_over_ranks_and_workers(both):
    _, shards = both
    seen = []
    for r in range(2):
        loader = _data("webdataset", shards, rank=r, world=2, extra=["data.num_workers=2"]).train
        seen += [k[1] for batch in loader._keys(4, 0) for k in batch]
        assert sum(len(y) for _, y in loader.iter_from(4)) == 6 * 4  # 6 batches of 4 rows on each rank
    assert len(seen) == len(set(seen)) == 48  # 6 global batches of 8: no duplicate, nothing lost


def test_a_sample_without_label_is_refused(tmp_path):
    with tarfile.open(tmp_path / "train-0.tar", "w") as tf:
        info = tarfile.TarInfo("a.png")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ConfigError) as err:
        _data("webdataset", tmp_path)
    assert err.value.key == "data.root" and "lack" in str(err.value)
