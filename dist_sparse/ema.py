"""An exponential moving average (EMA) of the model's weights, kept shard by shard.

After every applied optimizer step ``t`` (an fp16 step the gradient scaler skipped is not one), every
floating-point parameter and buffer ``w`` updates its average::

    ema <- d_t * ema + (1 - d_t) * w,     d_t = decay                                (ema_warmup off)
                                          d_t = min(decay, 1 - (1 + t) ** (-2/3))     (ema_warmup on)

(Polyak averaging; the warm-up is the one of timm's ``ModelEmaV3``, so that early, random weights do
not linger in the average). DeiT trains with ``decay = 0.99996`` (Touvron et al. 2021).

Each rank averages only the piece of each tensor it stores (``distributed.local_view``: the whole
tensor under DDP and ZeRO-1/2, the FSDP2 shard, the ZeRO-3 partition), in fp32 whatever the weights'
dtype, so the EMA costs one fp32 copy of this rank's share of the model and no communication per
step. For evaluation the averages are swapped into the live weights and swapped back afterwards;
the method's constraints (masks) are re-applied to the swapped-in weights, so the EMA of a sparse
model is evaluated on the same sparsity pattern. Checkpoints hold the averages exactly (one file per
rank where the layout is sharded), and the final export writes ``model_ema.safetensors`` through the
method's ``finalize`` beside ``model.safetensors``.

A rebuild (Cuttlefish's switch to low rank, Polarization's physical pruning) changes the parameter
shapes: the EMA then restarts from the rebuilt weights.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator

import torch
from torch import nn

from . import distributed as D

__all__ = ["WeightEMA", "ema_decay_at"]

WARMUP_POWER = 2.0 / 3.0


def ema_decay_at(decay: float, step: int, warmup: bool) -> float:
    """The decay used by the update after optimizer step ``step`` (0-based: the first step is 0)."""
    if not warmup:
        return float(decay)
    return float(min(decay, 1.0 - (1.0 + step) ** (-WARMUP_POWER)))


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Floating-point parameters and buffers by name (tied tensors once, under their first name)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or not t.is_floating_point() or id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = t
    return out


class WeightEMA:
    """The EMA of ``model``'s floating-point parameters and buffers (this rank's pieces, fp32).

    Args:
        model: the unwrapped (possibly sharded) model the averages follow; they start equal to it.
        decay: the decay per optimizer step, in [0, 1).
        warmup: use ``min(decay, 1 - (1 + t) ** (-2/3))`` at step ``t`` (timm's EMA warm-up).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.updates = 0
        self.reset(model)

    def reset(self, model: nn.Module) -> None:
        """Start the averages from ``model``'s current weights (first use and after a rebuild)."""
        D.reshard(model)
        live = _tensors(model)
        self.names = list(live)
        with torch.no_grad():
            self.shadow = {n: D.local_view(t).detach().to(torch.float32, copy=True) for n, t in live.items()}

    def _live(self, model: nn.Module) -> dict[str, torch.Tensor]:
        D.reshard(model)  # FSDP2 gathered by an evaluation forward: its parameters become the shards again
        live = _tensors(model)
        if list(live) != self.names:
            raise RuntimeError("the model's tensors changed since the EMA was started (a rebuild without "
                               "WeightEMA.reset?)")
        return live

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Average in the weights after optimizer step ``step``."""
        d = ema_decay_at(self.decay, step, self.warmup)
        live = self._live(model)
        shadow = [self.shadow[n] for n in self.names]
        # local_view is a view: .float() copies only where the weights are not fp32 already
        values = [D.local_view(live[n]).detach().to(torch.float32) for n in self.names]
        torch._foreach_lerp_(shadow, values, 1.0 - d)
        self.updates += 1

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module, project: Callable[[nn.Module], None] | None = None) -> Iterator[None]:
        """Inside the block the model's weights are the averages (cast to the weights' dtype); on exit
        the live weights come back bit for bit. ``project(model)`` runs after the swap (masks)."""
        live = self._live(model)
        saved = {}
        with torch.no_grad():
            for n in self.names:
                local = D.local_view(live[n])
                saved[n] = local.detach().clone()
                local.copy_(self.shadow[n])
            D.refresh_full_copies(model)  # FSDP2 / ZeRO-3 full copies follow the shards
            if project is not None:
                project(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for n in self.names:
                    D.local_view(live[n]).copy_(saved[n])
                D.refresh_full_copies(model)

    def full_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The averages as full fp32 CPU tensors on every rank (a collective), keyed like the plain
        module's ``state_dict`` (floating-point entries only)."""
        live = self._live(model)
        full = D.batched_gather_full({n: live[n] for n in self.names}, local={n: self.shadow[n] for n in self.names})
        first = {id(t): n for n, t in live.items()}
        out = {}
        for name, t in list(model.named_parameters(remove_duplicate=False)) + \
                list(model.named_buffers(remove_duplicate=False)):
            if id(t) in first:  # tied tensors appear under every name, as in state_dict()
                out[D.plain_name(name)] = full[first[id(t)]]
        return out

    # -- checkpoints: this rank's pieces, exactly ------------------------------------------------
    def _file(self, dir_: str, model: nn.Module) -> str:
        sharded = any(D.layout(t) != "plain" for t in self._live(model).values())
        return os.path.join(dir_, f"ema.rank{D.rank()}.pt" if sharded else "ema.pt")

    def save(self, dir_: str, model: nn.Module) -> None:
        """Write the averages into checkpoint directory ``dir_`` (every rank calls it: one file per rank
        for a sharded layout, rank 0's copy otherwise)."""
        path = self._file(dir_, model)
        if path.endswith("ema.pt") and not D.is_main():
            return
        torch.save({"decay": self.decay, "warmup": self.warmup, "updates": self.updates, "names": self.names,
                    "shadow": {n: t.cpu() for n, t in self.shadow.items()}}, path)

    def load(self, dir_: str, model: nn.Module) -> None:
        path = self._file(dir_, model)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: this checkpoint holds no weight EMA (was it written with "
                                    "model.ema_decay = 0?)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["names"] != self.names:
            raise RuntimeError(f"{path}: the EMA was saved for other tensors than this model's")
        self.updates = int(state["updates"])
        for n in self.names:
            saved = state["shadow"][n]
            if saved.shape != self.shadow[n].shape:
                raise RuntimeError(f"{path}: EMA piece {n} has shape {tuple(saved.shape)}, this rank holds "
                                   f"{tuple(self.shadow[n].shape)}")
            self.shadow[n].copy_(saved)
