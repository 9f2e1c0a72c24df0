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

__all__ = ["DataBundle", "EpochLoader", "register_dataset", "dataset_names", "build_data"]


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


def register_dataset(name: str):
    def deco(fn):
        _BUILDERS[name] = fn
        return fn

    return deco


def _load_builtin() -> None:
    import importlib

    for mod in ("vision", "translation"):
        try:
            importlib.import_module(f"dist_sparse.data.{mod}")
        except ModuleNotFoundError as err:
            if err.name != f"dist_sparse.data.{mod}":
                raise


def dataset_names() -> list[str]:
    _load_builtin()
    return sorted(_BUILDERS)


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
