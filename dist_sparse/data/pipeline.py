"""Parallel, resumable, rank-invariant loading of decoded images through a ``torch.utils.data.DataLoader``.

The epoch plan is the one of the in-memory loader: a seeded permutation of the training set cut into
GLOBAL batches of ``data.batch_size``; rank r takes rows ``[r*b, (r+1)*b)`` of every global batch
(b = batch / processes). A batch sampler hands each rank's rows to ``data.num_workers`` worker
processes, which decode and augment them; the main process copies finished batches to the device
(pinned memory and non-blocking copies on CUDA).

Every sample is transformed under generators seeded from (seed, epoch, sample index) (see
``transforms.seeded``), so a sample's augmentation does not depend on the number of workers, on
the number of ranks or on which worker drew it, and a resumed run sees the tensors it would have
seen. ``iter_from(epoch, start)`` starts at global batch ``start``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Protocol

import torch

from ..errors import ConfigError
from . import epoch_order
from .transforms import key_seed, seeded

__all__ = ["SampleSource", "PipelineLoader"]


class SampleSource(Protocol):
    """Indexable decoded samples: ``load(i) -> (PIL image or uint8 tensor (C, H, W), label)``."""

    def __len__(self) -> int:
        ...

    def load(self, i: int) -> tuple[Any, int]:
        ...


class _Keyed(torch.utils.data.Dataset):
    """``dataset[(epoch, i)]``: sample i decoded and transformed under its own seed."""

    def __init__(self, source: SampleSource, transform: Callable, seed: int, randomized: bool):
        self.source, self.transform, self.seed, self.randomized = source, transform, seed, randomized

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, ...]):
        i = key[1]
        img, label = self.source.load(i)
        if self.randomized:
            with seeded(key_seed(self.seed, key)):
                x = self.transform(img)
        else:
            x = self.transform(img)
        return x, label


class _Plan(torch.utils.data.Sampler):
    """Yields this rank's keys of every batch in ``batches`` (set before each pass)."""

    def __init__(self):
        self.batches: list[list[tuple[int, ...]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class PipelineLoader:
    """Rank-aware, resumable loader over decoded samples, with worker processes.

    Args:
        source: the samples (:class:`SampleSource`).
        size: number of samples used (the first ``size`` of ``source``).
        global_batch: samples per global batch (all ranks together).
        rank, world_size: this process's rows of each global batch.
        device: where batches go.
        seed: the run seed (order and augmentation).
        train: shuffle, drop the last partial batch and augment; else sequential contiguous per-rank
            shards with the last partial batch kept (every rank runs the same number of batches).
        train_transform, eval_transform: per-sample callables returning uint8 tensors (C, S, S).
        finish: ``finish(x, keys, seed)`` on the device: uint8 batch -> normalized float batch
            (``transforms.Finish``; keys given for augmented batches only).
        out_shape: (C, S, S) of one transformed sample (for the empty batches of short val shards).
        mix: optional ``mix(x, y, keys, seed) -> (x, soft targets)`` for augmented training batches
            (``transforms.PairMix``: Mixup/CutMix over pairs of rows of the global batch).
        num_workers: decoding/augmenting processes per rank (0: in this process).
        prefetch_factor: batches each worker keeps ready.
        channels_last: return images in channels_last memory format.
        repeats: repeated augmentation (Hoffer et al. 2020; DeiT's sampler): each global batch holds
            m = ceil(global_batch / repeats) distinct samples, each ``repeats`` times with its own
            augmentation, the copies m rows apart (on different ranks once there are ``repeats`` or
            more; the last copies are cut where ``repeats`` does not divide the batch); an epoch
            keeps its number of batches, so it sees about 1/repeats of the distinct samples.

    ``augment`` (an attribute): False makes a training loader use the eval transform (calibration
    batches); it keeps its shuffled order.
    """

    def __init__(self, source: SampleSource, size: int, global_batch: int, *, rank: int, world_size: int, device,
                 seed: int, train: bool, train_transform: Callable, eval_transform: Callable, finish: Callable,
                 out_shape: tuple[int, int, int], num_workers: int = 0, prefetch_factor: int = 2,
                 channels_last: bool = False, augment: bool = True, mix: Callable | None = None, repeats: int = 1):
        if global_batch % world_size:
            raise ConfigError("data.batch_size", global_batch, f"a multiple of the number of processes ({world_size})")
        if train and size < global_batch:
            raise ConfigError("data.batch_size", global_batch, f"at most the training set size ({size})")
        self.source, self.size, self.global_batch = source, size, global_batch
        self.rank, self.world, self.device, self.seed, self.train = rank, world_size, torch.device(device), seed, train
        self.local_batch = global_batch // world_size
        if mix is not None and train and self.local_batch % 2:
            raise ConfigError("data.batch_size", global_batch, f"an even number of samples per process ({world_size} "
                              "processes) with data.mixup/data.cutmix: pairs of rows are mixed on one rank")
        self.mix = mix if train else None
        self.repeats = int(repeats) if train else 1
        self.train_transform, self.eval_transform, self.finish = train_transform, eval_transform, finish
        self.out_shape = tuple(out_shape)
        self.num_workers, self.prefetch_factor = int(num_workers), int(prefetch_factor)
        self.channels_last, self.augment = channels_last, augment and train
        self._loaders: dict[bool, tuple[_Plan, torch.utils.data.DataLoader]] = {}
        if not train:
            per = -(-size // world_size)
            self.shard = list(range(rank * per, min(size, (rank + 1) * per)))

    def __len__(self) -> int:
        if self.train:
            return self.size // self.global_batch
        per = -(-self.size // self.world)
        return max(1, -(-per // self.local_batch))

    def __getstate__(self):  # copies (calibration) and pickling build their own DataLoader
        state = dict(self.__dict__)
        state["_loaders"] = {}
        return state

    def __copy__(self):
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__getstate__())
        return new

    def _loader(self, randomized: bool) -> tuple[_Plan, torch.utils.data.DataLoader]:
        if randomized not in self._loaders:
            plan = _Plan()
            ds = _Keyed(self.source, self.train_transform if randomized else self.eval_transform, self.seed, randomized)
            workers = self.num_workers
            dl = torch.utils.data.DataLoader(
                ds, batch_sampler=plan, num_workers=workers, pin_memory=self.device.type == "cuda",
                persistent_workers=workers > 0, prefetch_factor=self.prefetch_factor if workers > 0 else None)
            self._loaders[randomized] = (plan, dl)
        return self._loaders[randomized]

    def _keys(self, epoch: int, start: int) -> list[list[tuple[int, ...]]]:
        if not self.train:
            bs = self.local_batch
            return [[(epoch, i) for i in self.shard[b * bs:(b + 1) * bs]] for b in range(start, len(self))]
        order = epoch_order(self.seed, epoch, self.size)
        lo, hi = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
        m = -(-self.global_batch // self.repeats)  # distinct samples per global batch (all of it without repeats)
        out = []
        for b in range(start, len(self)):
            uniq = order[b * m:(b + 1) * m].tolist()
            # copy c of distinct sample k at row c*m + k; a batch that repeats does not divide ends early
            rows = [(epoch, int(i), c) for c in range(self.repeats) for i in uniq][:self.global_batch]
            out.append(rows[lo:hi])
        return out

    def _to_device(self, x: torch.Tensor, y: torch.Tensor, keys: list[tuple[int, ...]] | None):
        nb = self.device.type == "cuda"
        x = self.finish(x.to(self.device, non_blocking=nb), keys, self.seed)
        y = y.to(self.device, non_blocking=nb)
        if self.mix is not None and keys is not None:
            x, y = self.mix(x, y, keys, self.seed)  # soft targets (B, classes)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def iter_from(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images, labels) of ``epoch`` from global batch ``start`` on, for this rank."""
        keys = self._keys(epoch, start)
        full = [k for k in keys if k]  # a short last val shard ends in empty batches
        randomized = self.train and self.augment
        plan, dl = self._loader(randomized)
        plan.batches = full
        n = 0
        if full:
            for x, y in dl:
                yield self._to_device(x, torch.as_tensor(y, dtype=torch.int64), full[n] if randomized else None)
                n += 1
        for _ in range(len(keys) - n):
            yield self._to_device(torch.zeros((0, *self.out_shape), dtype=torch.uint8),
                                  torch.zeros(0, dtype=torch.int64), None)

    def close(self) -> None:
        """Stop the worker processes (they also stop with this process)."""
        self._loaders.clear()
