"""WebDataset tar shards as an indexed, random-access image source (``data.name: webdataset``).

A shard is a plain tar file in the WebDataset layout: the files of one sample share a key (the name
up to the first dot) and differ in extension, e.g. ``n01440764_10026.jpg`` + ``n01440764_10026.cls``
(the class index as text). Instead of streaming the shards, each rank reads the tar headers once and
keeps, per sample, (shard, byte offset, size) of its image and its label; workers then read a
sample with one seek. So the shards serve the same seeded plan of global batches as an image folder:
every sample exactly once per epoch over all ranks and workers (no duplicates, no losses, no
per-worker shard split to balance), exact resume, and the augmentation seeded per sample.

    data.name: webdataset
    data.root: /data/imagenet-wds          # holds the shards
    data.extra: {train_shards: "train-*.tar", val_shards: "val-*.tar"}
"""
from __future__ import annotations

import glob
import os
import tarfile

from ..errors import ConfigError
from . import DataBundle, register_dataset

__all__ = ["TarShards", "build_webdataset"]

IMAGE_EXT = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
LABEL_EXT = ("cls", "cls2", "class", "label", "txt")


def _split(name: str) -> tuple[str, str]:
    base = os.path.basename(name)
    d = os.path.dirname(name)
    key, _, ext = base.partition(".")
    return (f"{d}/{key}" if d else key), ext.lower()


class TarShards:
    """Samples of WebDataset tar shards, by index.

    Args:
        pattern: a glob of shard files (sorted; the sample order is shard by shard, in tar order).
        channels: 1 (grayscale) or 3 (RGB).
        decoder: ``torchvision`` or ``pil`` (see ``vision.ImageFolderData``).
    """

    def __init__(self, pattern: str, channels: int = 3, decoder: str = "torchvision"):
        self.paths = sorted(glob.glob(pattern))
        if not self.paths:
            raise ConfigError("data.root", pattern, "a directory holding WebDataset .tar shards matching this pattern")
        self.channels, self.decoder = channels, decoder
        self.samples: list[tuple[int, int, int, int]] = []  # (shard, offset, size, label)
        for s, path in enumerate(self.paths):
            pending: dict[str, dict] = {}
            with tarfile.open(path, "r:") as tf:  # uncompressed: headers only, data skipped by seeking
                for m in tf:
                    if not m.isfile():
                        continue
                    key, ext = _split(m.name)
                    entry = pending.setdefault(key, {})
                    if ext in IMAGE_EXT:
                        entry["img"] = (m.offset_data, m.size)
                    elif ext in LABEL_EXT:
                        tf.fileobj.seek(m.offset_data)
                        entry["label"] = int(tf.fileobj.read(m.size).decode().strip().split()[0])
                    if "img" in entry and "label" in entry:
                        off, size = entry["img"]
                        self.samples.append((s, off, size, entry["label"]))
                        del pending[key]
            incomplete = [k for k in pending if pending[k]]
            if incomplete:
                raise ConfigError("data.root", path, f"shards whose samples all have an image ({', '.join(IMAGE_EXT)}) "
                                  f"and a label ({', '.join(LABEL_EXT)}); {len(incomplete)} keys lack one, "
                                  f"e.g. {incomplete[0]}")
        if not self.samples:
            raise ConfigError("data.root", pattern, "shards holding samples (image + .cls label)")
        self._files: dict[int, dict[int, object]] = {}  # per process id: open shard files

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        pid = os.getpid()  # a forked worker must not share the parent's file offsets
        files = self._files.setdefault(pid, {})
        fh = files.get(shard)
        if fh is None:
            fh = files[shard] = open(self.paths[shard], "rb")
        fh.seek(offset)
        return fh.read(size)

    def load(self, i: int):
        from .vision import _decode_bytes

        shard, offset, size, label = self.samples[i]
        return _decode_bytes(self._read(shard, offset, size), self.channels, self.decoder), label

    @property
    def num_classes(self) -> int:
        return max(s[3] for s in self.samples) + 1


@register_dataset("webdataset", decoded=True)
def build_webdataset(cfg, *, rank: int, world_size: int, device, run_dir: str) -> DataBundle:
    """Tar shards under ``data.root`` (``data.extra.train_shards`` / ``val_shards`` globs)."""
    from .vision import _decoded_bundle, _extra, _subset, decoded_layout

    root, size, ch = decoded_layout(cfg)
    train = TarShards(os.path.join(root, _extra(cfg, "train_shards", "train-*.tar")), ch, cfg.data.decoder)
    val = TarShards(os.path.join(root, _extra(cfg, "val_shards", "val-*.tar")), ch, cfg.data.decoder)
    n_tr, n_va = _subset(len(train), cfg.data.train_subset), _subset(len(val), cfg.data.val_subset)
    num_classes = int(_extra(cfg, "num_classes", 0)) or max(train.num_classes, val.num_classes)
    info = dict(num_classes=num_classes, in_chans=ch, img_size=size, mean=tuple(_extra(cfg, "mean", [0.5] * ch)),
                std=tuple(_extra(cfg, "std", [0.25] * ch)), train_size=n_tr, val_size=n_va)
    bundle = _decoded_bundle(cfg, train, n_tr, val, n_va, info, rank=rank, world_size=world_size, device=device)
    info.pop("mean"), info.pop("std")
    return bundle
