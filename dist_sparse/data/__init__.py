"""Data sets and distributed, resumable loaders.

Every builder returns a :class:`DataBundle`. Loaders are *rank-aware* themselves (no
``accelerator.prepare`` on them): a training epoch is a fixed sequence of GLOBAL batches (seeded by
(seed, epoch)), and each rank takes its contiguous slice of every global batch. Hence the same global
batch gives the same averaged gradient on 1 or N processes, and a resumed run can skip exactly the
batches it has already seen (``loader.iter_from(epoch, start_batch)``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

__all__ = ["DataBundle", "EpochLoader", "register_dataset", "dataset_names", "dataset_task", "build_data",
           "calibration_batches", "CastLoader", "cast_batch", "dataset_decoded", "PIPELINE_KEYS", "epoch_order"]


class EpochLoader(Protocol):
    def __len__(self) -> int:  # batches per epoch (per rank == global batches)
        ...

    def iter_from(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """Batches of ``epoch`` starting at batch index ``start`` (already on the right device)."""
        ...


@dataclass
class DataBundle:
    task: str  # "classification" or "translation"
    train: EpochLoader
    val: EpochLoader
    info: dict = field(default_factory=dict)  # num_classes, in_chans, img_size / vocab_size, pad_id, ...


_BUILDERS: dict[str, Callable[..., DataBundle]] = {}


_TASKS: dict[str, str] = {}
_DECODED: set[str] = set()

# data.* keys of the decoded-image pipeline (data/pipeline.py, data/transforms.py)
PIPELINE_KEYS = ("num_workers", "decoder", "transform", "scale", "ratio", "interpolation", "crop_pct", "color_jitter",
                 "auto_augment", "re_prob", "mixup", "cutmix", "mix_prob", "mix_switch_prob", "repeated_aug")


def register_dataset(name: str, task: str = "classification", decoded: bool = False):
    """Register a data-set builder under ``name``; ``task`` is "classification" or "translation";
    ``decoded``: its images are decoded per sample by the DataLoader pipeline (reads PIPELINE_KEYS)."""
    def deco(fn):
        _BUILDERS[name] = fn
        _TASKS[name] = task
        if decoded:
            _DECODED.add(name)
        return fn

    return deco


def _load_builtin() -> None:
    import importlib

    for mod in ("vision", "shards", "translation"):
        try:
            importlib.import_module(f"dist_sparse.data.{mod}")
        except ModuleNotFoundError as err:
            if err.name != f"dist_sparse.data.{mod}":
                raise


def dataset_names() -> list[str]:
    _load_builtin()
    return sorted(_BUILDERS)


def dataset_task(name: str) -> str:
    """The task a registered data set serves ("classification" or "translation")."""
    _load_builtin()
    return _TASKS[name]


def dataset_decoded(name: str) -> bool:
    """True when the data set decodes images per sample through the worker pipeline."""
    _load_builtin()
    return name in _DECODED


def build_data(cfg, *, rank: int, world_size: int, device, run_dir: str) -> DataBundle:
    """Build the data set named by ``cfg.data.name`` for this rank.

    Args:
        cfg: the full :class:`dist_sparse.config.Config`.
        rank, world_size: this process and the number of processes.
        device: where batches go.
        run_dir: the run directory (tokenizers are trained into it).
    """
    _load_builtin()
    return _BUILDERS[cfg.data.name](cfg, rank=rank, world_size=world_size, device=device, run_dir=run_dir)


def cast_batch(batch: Any, dtype) -> Any:
    """``batch`` with every floating-point tensor cast to ``dtype`` (token ids and labels unchanged)."""
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: cast_batch(v, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(cast_batch(v, dtype) for v in batch)
    return batch


class CastLoader:
    """A loader whose floating-point batches are cast to ``dtype`` (DeepSpeed bf16/fp16 engines)."""

    def __init__(self, inner: EpochLoader, dtype):
        self.inner, self.dtype = inner, dtype

    def __len__(self) -> int:
        return len(self.inner)

    def iter_from(self, epoch: int, start: int = 0) -> Iterator[Any]:
        for batch in self.inner.iter_from(epoch, start):
            yield cast_batch(batch, self.dtype)


def epoch_order(seed: int, epoch: int, size: int):
    """The seeded permutation of ``size`` samples that an image epoch is cut into global batches from."""
    import torch

    g = torch.Generator()
    g.manual_seed(seed * 7919 + epoch)
    return torch.randperm(size, generator=g)


def calibration_batches(loader: EpochLoader, n: int, epoch: int = 0) -> Iterator[Any]:
    """Up to ``n`` training batches without augmentation, in the seeded order of ``epoch``.

    Each rank gets its rows of the same global batches, so statistics all-reduced over them do not
    depend on the number of processes. The loader itself is not changed (a shallow copy is used).
    """
    import copy

    if isinstance(loader, CastLoader):
        for batch in calibration_batches(loader.inner, n, epoch):
            yield cast_batch(batch, loader.dtype)
        return
    clean = copy.copy(loader)
    if hasattr(clean, "augment"):
        clean.augment = False
    for i, batch in enumerate(clean.iter_from(epoch, 0)):
        if i >= n:
            break
        yield batch
