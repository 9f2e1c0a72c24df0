"""Image classification data: Fashion-MNIST (the embedded default), image folders, local HF data sets.

Fashion-MNIST (47 MB) is held in memory as uint8 tensors (N, C, H, W); its augmentation (random crop
with zero padding, horizontal flip) and normalization are torch ops on whole batches. Image folders
and HF image sets are decoded one sample at a time by ``data.num_workers`` DataLoader workers with the
torchvision/timm transforms of ``data.transform`` (``pipeline.py``, ``transforms.py``).

Distribution: an epoch is a seeded permutation cut into GLOBAL batches of ``data.batch_size``; rank r
takes rows ``[r*b, (r+1)*b)`` of every global batch (b = batch_size / world_size). The random crop and
flip of a sample depend on (seed, epoch, global batch index, row), not on the rank, so 1 process and
N processes see bit-identical inputs for the same global batch.
"""
from __future__ import annotations

import gzip
import os
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from . import DataBundle, epoch_order, register_dataset

__all__ = ["FASHION_MNIST_DIRS", "load_idx_images", "load_idx_labels", "load_fashion_mnist", "ImageLoader",
           "ImageFolderData", "HFImages", "INSTALL_HINT"]

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
# Per-channel mean/std of the Fashion-MNIST training images (pixel values in [0, 1]).
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def load_idx_images(path: str) -> np.ndarray:
    """Read an IDX3 image file (optionally gzipped) into a uint8 array (N, rows, cols)."""
    with _open(path) as fh:
        raw = fh.read()
    magic, n, rows, cols = np.frombuffer(raw[:16], dtype=">u4")
    if magic != 2051:
        raise ValueError(f"{path}: not an IDX3 image file (magic {magic}, expected 2051)")
    data = np.frombuffer(raw, dtype=np.uint8, offset=16)
    if data.size != n * rows * cols:
        raise ValueError(f"{path}: truncated ({data.size} bytes for {n}x{rows}x{cols})")
    return data.reshape(int(n), int(rows), int(cols))


def load_idx_labels(path: str) -> np.ndarray:
    """Read an IDX1 label file (optionally gzipped) into a uint8 array (N,)."""
    with _open(path) as fh:
        raw = fh.read()
    magic, n = np.frombuffer(raw[:8], dtype=">u4")
    if magic != 2049:
        raise ValueError(f"{path}: not an IDX1 label file (magic {magic}, expected 2049)")
    data = np.frombuffer(raw, dtype=np.uint8, offset=8)
    if data.size != n:
        raise ValueError(f"{path}: truncated ({data.size} labels, header says {n})")
    return data


def find_fashion_mnist(root: str = "") -> str:
    """The directory holding the four Fashion-MNIST IDX files: ``root``, $DIST_SPARSE_DATA, then Debian's."""
    candidates = []
    if root:
        candidates.append(root)
    env = os.environ.get("DIST_SPARSE_DATA")
    if env:
        candidates += [os.path.join(env, "fashion-mnist"), env]
    candidates += list(FASHION_MNIST_DIRS)
    for d in candidates:
        if os.path.isfile(os.path.join(d, "train-images-idx3-ubyte.gz")) or os.path.isfile(
                os.path.join(d, "train-images-idx3-ubyte")):
            return d
    raise ConfigError("data.root", root or "(default)",
                      f"a directory with the Fashion-MNIST IDX files (searched {', '.join(candidates)}); "
                      f"install them with: {INSTALL_HINT}")


def load_fashion_mnist(root: str = "") -> dict[str, torch.Tensor]:
    """Fashion-MNIST as uint8 tensors: train_x (60000,1,28,28), train_y, test_x (10000,1,28,28), test_y."""
    d = find_fashion_mnist(root)

    def path(stem: str) -> str:
        p = os.path.join(d, stem + ".gz")
        return p if os.path.isfile(p) else os.path.join(d, stem)

    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = load_idx_images(path(f"{prefix}-images-idx3-ubyte"))
        y = load_idx_labels(path(f"{prefix}-labels-idx1-ubyte"))
        out[f"{split}_x"] = torch.from_numpy(x.copy()).unsqueeze(1)
        out[f"{split}_y"] = torch.from_numpy(y.astype(np.int64))
    return out


def _batch_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + index)
    return g


class ImageLoader:
    """Rank-aware, resumable loader over an indexable image source.

    Args:
        get_images: ``fn(indices: LongTensor) -> (uint8 images (n,C,H,W), int64 labels (n,))``.
        size: number of samples.
        global_batch: samples per global batch (all ranks together).
        rank, world_size: this process's slice of each global batch.
        train: shuffle, drop the last partial batch and augment; else sequential order, no augmentation,
            the last partial batch kept, and the val set split into contiguous per-rank shards.
        mean, std: per-channel normalization (pixel values in [0, 1]).
    """

    def __init__(self, get_images, size: int, global_batch: int, *, rank: int, world_size: int, device,
                 seed: int, train: bool, mean: Sequence[float], std: Sequence[float], padding: int = 0,
                 hflip: bool = False, augment: bool = False, channels_last: bool = False):
        if global_batch % world_size:
            raise ConfigError("data.batch_size", global_batch,
                              f"a multiple of the number of processes ({world_size})")
        self.get_images, self.size, self.global_batch = get_images, size, global_batch
        self.rank, self.world, self.device, self.seed, self.train = rank, world_size, device, seed, train
        self.local_batch = global_batch // world_size
        self.padding, self.hflip, self.augment = padding, hflip, augment
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.channels_last = channels_last
        if train and size < global_batch:
            raise ConfigError("data.batch_size", global_batch, f"at most the training set size ({size})")
        if not train:
            # Contiguous shard per rank; ranks may hold one sample more or less (sums are reduced).
            per = -(-size // world_size)
            self.shard = torch.arange(rank * per, min(size, (rank + 1) * per))

    def __len__(self) -> int:
        if self.train:
            return self.size // self.global_batch
        # The same number of batches on every rank (sharded models run collectives in forward).
        per = -(-self.size // self.world)
        return max(1, -(-per // self.local_batch))


    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True).float().div_(255.0)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def iter_from(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images, labels) of ``epoch`` from batch ``start`` on, for this rank."""
        if not self.train:
            bs = self.local_batch
            for i in range(start, len(self)):
                # may be empty on the last rank: it still takes part in every forward
                x, y = self.get_images(self.shard[i * bs:(i + 1) * bs])
                yield self._prepare(x), y.to(self.device)
            return
        order = epoch_order(self.seed, epoch, self.size)
        for i in range(start, len(self)):
            glob = order[i * self.global_batch:(i + 1) * self.global_batch]
            lo, hi = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
            x, y = self.get_images(glob[lo:hi])
            if self.augment:
                # Draw augmentation for the whole global batch, keep this rank's rows: rank-invariant.
                gen = _batch_generator(self.seed, epoch, i)
                n_all = len(glob)
                if self.padding > 0:
                    dy = torch.randint(0, 2 * self.padding + 1, (n_all,), generator=gen)
                    dx = torch.randint(0, 2 * self.padding + 1, (n_all,), generator=gen)
                else:
                    dy = dx = torch.zeros(n_all, dtype=torch.long)
                flip = torch.rand(n_all, generator=gen) < 0.5 if self.hflip else torch.zeros(n_all, dtype=torch.bool)
                x = _crop_flip(x, dy[lo:hi], dx[lo:hi], flip[lo:hi], self.padding)
            yield self._prepare(x), y.to(self.device)


def _crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, padding: int) -> torch.Tensor:
    """Crop every sample of ``x`` at offsets (dy, dx) of its zero-padded copy, then flip where ``flip``."""
    n, _, h, w = x.shape
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        rows = dy.view(n, 1, 1) + torch.arange(h).view(1, h, 1)
        cols = dx.view(n, 1, 1) + torch.arange(w).view(1, 1, w)
        x = padded.permute(0, 2, 3, 1)[torch.arange(n).view(n, 1, 1), rows, cols].permute(0, 3, 1, 2)
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    return x.contiguous()


def _in_memory(x: torch.Tensor, y: torch.Tensor):
    def get(idx: torch.Tensor):
        return x[idx], y[idx]

    return get


def _subset(n: int, k: int) -> int:
    return min(n, k) if k > 0 else n


def _bundle(cfg, train_get, n_train, val_get, n_val, info, *, rank, world_size, device) -> DataBundle:
    d = cfg.data
    mean, std = info.pop("mean"), info.pop("std")
    common = dict(rank=rank, world_size=world_size, device=device, seed=cfg.run.seed, mean=mean, std=std,
                  channels_last=cfg.run.channels_last)
    train = ImageLoader(train_get, n_train, d.batch_size, train=True, padding=d.crop_padding, hflip=d.hflip,
                        augment=d.augment, **common)
    val = ImageLoader(val_get, n_val, cfg.run.eval_batch_size or d.batch_size, train=False, **common)
    return DataBundle(task="classification", train=train, val=val, info=info)


@register_dataset("fashion_mnist")
def build_fashion_mnist(cfg, *, rank: int, world_size: int, device, run_dir: str) -> DataBundle:
    """Fashion-MNIST (60k/10k, 28x28, 10 classes) from Debian's IDX files; val = the official test set."""
    data = load_fashion_mnist(cfg.data.root)
    n_tr = _subset(len(data["train_y"]), cfg.data.train_subset)
    n_va = _subset(len(data["test_y"]), cfg.data.val_subset)
    info = dict(num_classes=10, in_chans=1, img_size=28, classes=FASHION_MNIST_CLASSES,
                mean=FASHION_MNIST_STATS[0], std=FASHION_MNIST_STATS[1], train_size=n_tr, val_size=n_va)
    return _bundle(cfg, _in_memory(data["train_x"][:n_tr], data["train_y"][:n_tr]), n_tr,
                   _in_memory(data["test_x"][:n_va], data["test_y"][:n_va]), n_va, info,
                   rank=rank, world_size=world_size, device=device)


# ------------------------------------------------------------------------------------------------
# Decoded image sets: image folders and local HF data sets, through the DataLoader pipeline
# ------------------------------------------------------------------------------------------------

_IMG_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


def _pil_mode(channels: int) -> str:
    return "L" if channels == 1 else "RGB"


def to_pil(img, channels: int):
    """A PIL image (or an array-like (H, W[, C])) in mode L or RGB."""
    from PIL import Image

    if not isinstance(img, Image.Image):
        arr = np.asarray(img, dtype=np.uint8)
        img = Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    return img if img.mode == _pil_mode(channels) else img.convert(_pil_mode(channels))


class ImageFolderData:
    """Files of an ``ImageFolder`` layout (``root/<class>/<images>``), decoded one sample at a time.

    Args:
        root: directory with one sub-directory per class.
        channels: 1 (grayscale) or 3 (RGB).
        classes: class names to use (default: sorted sub-directories of ``root``).
        decoder: ``pil`` (Pillow; JPEGs decoded at reduced size when ``draft`` allows) or
            ``torchvision`` (``torchvision.io.decode_image``, libjpeg-turbo / libpng, a uint8 tensor).
        draft: the smallest side the transform needs (None: full size): Pillow decodes a JPEG at 1/2,
            1/4 or 1/8 scale while both sides stay >= ``draft``.
    """

    def __init__(self, root: str, channels: int = 3, classes: list[str] | None = None, decoder: str = "pil",
                 draft: int | None = None):
        if not os.path.isdir(root):
            raise ConfigError("data.root", root, "a directory with class sub-directories (ImageFolder layout)")
        self.classes = classes or sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes:
            raise ConfigError("data.root", root, "a directory with at least one class sub-directory")
        self.files: list[tuple[str, int]] = []
        for ci, c in enumerate(self.classes):
            cdir = os.path.join(root, c)
            if not os.path.isdir(cdir):
                continue
            for dirpath, _, names in sorted(os.walk(cdir)):
                for name in sorted(names):
                    if name.lower().endswith(_IMG_EXT):
                        self.files.append((os.path.join(dirpath, name), ci))
        if not self.files:
            raise ConfigError("data.root", root, f"class folders holding images ({', '.join(_IMG_EXT)})")
        self.channels, self.decoder, self.draft = channels, decoder, draft

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int):
        path, label = self.files[i]
        if self.decoder == "torchvision":
            from torchvision.io import ImageReadMode, decode_image, read_file

            mode = ImageReadMode.GRAY if self.channels == 1 else ImageReadMode.RGB
            return decode_image(read_file(path), mode=mode), label
        from PIL import Image

        with Image.open(path) as im:
            if self.draft and im.format == "JPEG":
                im.draft(_pil_mode(self.channels), (self.draft, self.draft))
            return to_pil(im, self.channels).copy(), label


def _decode_bytes(data: bytes, channels: int, decoder: str):
    if decoder == "torchvision":
        from torchvision.io import ImageReadMode, decode_image

        mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return to_pil(im, channels).copy()


class HFImages:
    """Images and labels of a local ``datasets.Dataset``, one row at a time.

    An ``Image`` column is read as its encoded bytes and decoded by ``decoder`` (torchvision or
    Pillow); a column of arrays (H, W[, C]) becomes a PIL image as it is.
    """

    def __init__(self, ds, image_key: str, label_key: str, channels: int, decoder: str = "torchvision"):
        missing = [k for k in (image_key, label_key) if k not in ds.column_names]
        if missing:
            raise ConfigError("data.extra.image_key/label_key", missing, "columns of the data set: " + ", ".join(ds.column_names))
        import datasets

        if isinstance(ds.features.get(image_key), datasets.Image):
            ds = ds.cast_column(image_key, datasets.Image(decode=False))
        self.ds, self.image_key, self.label_key, self.channels, self.decoder = ds, image_key, label_key, channels, decoder

    def __len__(self) -> int:
        return len(self.ds)

    def load(self, i: int):
        row = self.ds[int(i)]
        img = row[self.image_key]
        if isinstance(img, dict) and img.get("bytes") is not None:
            return _decode_bytes(img["bytes"], self.channels, self.decoder), int(row[self.label_key])
        if isinstance(img, dict) and img.get("path"):
            with open(img["path"], "rb") as fh:
                return _decode_bytes(fh.read(), self.channels, self.decoder), int(row[self.label_key])
        return to_pil(img, self.channels), int(row[self.label_key])


def _extra(cfg, key: str, default):
    return cfg.data.extra.get(key, default)


def _decoded_bundle(cfg, train_src, n_train, val_src, n_val, info, *, rank, world_size, device) -> DataBundle:
    from .pipeline import PipelineLoader
    from .transforms import build_transforms

    d = cfg.data
    size, ch = info["img_size"], info["in_chans"]
    train_tf, eval_tf, finish = build_transforms(d, size, info["mean"], info["std"])
    common = dict(rank=rank, world_size=world_size, device=device, seed=cfg.run.seed, train_transform=train_tf,
                  eval_transform=eval_tf, finish=finish, out_shape=(ch, size, size), num_workers=d.num_workers,
                  channels_last=cfg.run.channels_last)
    mix = None
    if d.mixup > 0 or d.cutmix > 0:
        from .transforms import PairMix

        mix = PairMix(d.mixup, d.cutmix, d.mix_prob, d.mix_switch_prob, cfg.optim.label_smoothing,
                      info["num_classes"])
    train = PipelineLoader(train_src, n_train, d.batch_size, train=True, augment=d.augment, mix=mix,
                           repeats=d.repeated_aug, **common)
    val = PipelineLoader(val_src, n_val, cfg.run.eval_batch_size or d.batch_size, train=False, **common)
    return DataBundle(task="classification", train=train, val=val, info=info)


def _drafts(cfg, size: int) -> tuple[int | None, int]:
    """(train, eval) reduced-decoding sides: crop_flip resizes to ``size``; rrc/timm crop at full size."""
    from .transforms import eval_resize

    d = cfg.data
    if d.transform == "crop_flip":
        return size, size
    return None, eval_resize(size, d.crop_pct)


def decoded_layout(cfg) -> tuple[str, int, int]:
    """(root, output side, channels) of a decoded image set: ``data.root`` (or $DIST_SPARSE_DATA),
    ``data.extra.img_size`` (or ``model.img_size``, 32) and ``data.extra.channels`` (1 or 3)."""
    root = cfg.data.root or os.environ.get("DIST_SPARSE_DATA", "")
    size = int(_extra(cfg, "img_size", cfg.model.img_size or 32))
    ch = int(_extra(cfg, "channels", cfg.model.in_chans or 3))
    if ch not in (1, 3):
        raise ConfigError("data.extra.channels", ch, "1 or 3")
    return root, size, ch


@register_dataset("image_folder", decoded=True)
def build_image_folder(cfg, *, rank: int, world_size: int, device, run_dir: str) -> DataBundle:
    """``data.root`` holds ``train/`` and ``val/`` class folders (CIFAR/ImageNet exported to disk)."""
    root, size, ch = decoded_layout(cfg)
    tr_draft, va_draft = _drafts(cfg, size)
    train = ImageFolderData(os.path.join(root, _extra(cfg, "train_dir", "train")), ch, decoder=cfg.data.decoder,
                            draft=tr_draft)
    val = ImageFolderData(os.path.join(root, _extra(cfg, "val_dir", "val")), ch, classes=train.classes,
                          decoder=cfg.data.decoder, draft=va_draft)
    n_tr, n_va = _subset(len(train), cfg.data.train_subset), _subset(len(val), cfg.data.val_subset)
    info = dict(num_classes=len(train.classes), in_chans=ch, img_size=size, classes=train.classes,
                mean=tuple(_extra(cfg, "mean", [0.5] * ch)), std=tuple(_extra(cfg, "std", [0.25] * ch)),
                train_size=n_tr, val_size=n_va)
    bundle = _decoded_bundle(cfg, train, n_tr, val, n_va, info, rank=rank, world_size=world_size, device=device)
    info.pop("mean"), info.pop("std")
    return bundle


# ------------------------------------------------------------------------------------------------
# Hugging Face `datasets` on local disk (load_from_disk directory, or parquet/arrow files)
# ------------------------------------------------------------------------------------------------


def _load_hf_split(root: str, split: str):
    import datasets

    if os.path.isdir(root) and (os.path.isfile(os.path.join(root, "dataset_dict.json"))
                                or os.path.isfile(os.path.join(root, "dataset_info.json"))):
        ds = datasets.load_from_disk(root)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ConfigError("data.extra", split, "a split of the saved DatasetDict: " + ", ".join(ds))
            return ds[split]
        return ds
    files = []
    for ext in ("parquet", "arrow"):
        cand = os.path.join(root, f"{split}.{ext}")
        if os.path.isfile(cand):
            files.append((ext, cand))
    if not files:
        raise ConfigError("data.root", root, f"a load_from_disk directory or {split}.parquet / {split}.arrow files")
    ext, path = files[0]
    return datasets.Dataset.from_parquet(path) if ext == "parquet" else datasets.Dataset.from_file(path)


@register_dataset("hf_image", decoded=True)
def build_hf_image(cfg, *, rank: int, world_size: int, device, run_dir: str) -> DataBundle:
    """A local Hugging Face image data set (``save_to_disk`` directory or ``train/test.parquet``)."""
    root, size, ch = decoded_layout(cfg)
    ik, lk = _extra(cfg, "image_key", "image"), _extra(cfg, "label_key", "label")
    dec = cfg.data.decoder
    train = HFImages(_load_hf_split(root, _extra(cfg, "train_split", "train")), ik, lk, ch, dec)
    val = HFImages(_load_hf_split(root, _extra(cfg, "val_split", "test")), ik, lk, ch, dec)
    num_classes = int(_extra(cfg, "num_classes", 0)) or int(max(train.ds[lk]) + 1)
    n_tr, n_va = _subset(len(train), cfg.data.train_subset), _subset(len(val), cfg.data.val_subset)
    info = dict(num_classes=num_classes, in_chans=ch, img_size=size, mean=tuple(_extra(cfg, "mean", [0.5] * ch)),
                std=tuple(_extra(cfg, "std", [0.25] * ch)), train_size=n_tr, val_size=n_va)
    bundle = _decoded_bundle(cfg, train, n_tr, val, n_va, info, rank=rank, world_size=world_size, device=device)
    info.pop("mean"), info.pop("std")
    return bundle
