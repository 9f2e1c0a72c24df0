"""Atomic, resumable checkpoints.

A checkpoint is a directory ``<ckpt dir>/step_<global step>`` holding

* the Accelerate state (``accelerator.save_state``: model, optimizer, registered scheduler, RNG of every
  rank; sharded files under FSDP / DeepSpeed),
* ``method.pt``: the method's state (masks, thresholds, gates, ranks ...), saved with ``torch.save``
  and loaded with ``weights_only=True``,
* ``meta.json``: step, epoch, position inside the epoch, world size, the architecture history needed to
  rebuild the model before loading (written last).

Every rank writes into ``step_<n>.tmp``; after a barrier rank 0 renames it to ``step_<n>``. A rename is
atomic, so a run killed while writing leaves the previous checkpoint untouched, and the half-written
``.tmp`` directory is ignored (and removed by the next save).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Callable

import torch

__all__ = ["save_checkpoint", "find_latest", "read_meta", "load_method_state", "list_checkpoints", "export_weights",
           "save_exported", "load_exported"]

_STEP_DIR = re.compile(r"^step_(\d+)(\.old)?$")


def list_checkpoints(ckpt_dir: str) -> list[str]:
    """Complete checkpoints in ``ckpt_dir``, oldest first.

    ``step_<n>.old`` is the previous copy of a step being re-saved; it counts only while the new
    ``step_<n>`` is not in place yet (a run killed between the two renames resumes from it).
    """
    if not os.path.isdir(ckpt_dir):
        return []
    found: dict[int, str] = {}
    for name in sorted(os.listdir(ckpt_dir)):  # "step_n" sorts before "step_n.old"
        m = _STEP_DIR.match(name)
        path = os.path.join(ckpt_dir, name)
        if m and os.path.isfile(os.path.join(path, "meta.json")):
            found.setdefault(int(m.group(1)), path)
    return [found[k] for k in sorted(found)]


def _fsync_dir(path: str) -> None:
    """Make renames inside ``path`` durable (a crash after the rename keeps it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def find_latest(ckpt_dir: str) -> str | None:
    """The newest complete checkpoint directory, or None."""
    ckpts = list_checkpoints(ckpt_dir)
    return ckpts[-1] if ckpts else None


def read_meta(path: str) -> dict[str, Any]:
    with open(os.path.join(path, "meta.json"), encoding="utf-8") as fh:
        return json.load(fh)


def load_method_state(path: str) -> dict[str, Any]:
    """The method state of checkpoint ``path`` (tensors on the CPU)."""
    return torch.load(os.path.join(path, "method.pt"), map_location="cpu", weights_only=True)


def save_checkpoint(accelerator, ckpt_dir: str, step: int, meta: dict[str, Any], method_state: dict[str, Any],
                    keep_last: int, extra: Callable[[str], None] | None = None) -> str:
    """Write checkpoint ``step`` atomically; keep the newest ``keep_last``. Collective: call on every rank.

    ``extra(dir)`` runs on every rank after the accelerator's state is written and writes further
    files (this rank's weight-EMA pieces) into the checkpoint directory before it is put in place.

    Returns:
        The final directory of the checkpoint.
    """
    final = os.path.join(ckpt_dir, f"step_{step:08d}")
    tmp = final + ".tmp"
    if accelerator.is_main_process:
        os.makedirs(ckpt_dir, exist_ok=True)
        for name in os.listdir(ckpt_dir):  # leftovers of an interrupted save
            if name.endswith(".tmp"):
                shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
            elif name.endswith(".old") and os.path.isdir(os.path.join(ckpt_dir, name[:-4])):
                shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    if extra is not None:
        extra(tmp)
    if accelerator.is_main_process:
        torch.save(method_state, os.path.join(tmp, "method.pt"))
        with open(os.path.join(tmp, "meta.json.part"), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(os.path.join(tmp, "meta.json.part"), os.path.join(tmp, "meta.json"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        old = final + ".old"
        if os.path.isdir(final):  # re-saving the same step (e.g. epoch end == every_steps): the previous
            shutil.rmtree(old, ignore_errors=True)  # copy stays valid (as .old) until the new one is in place
            os.replace(final, old)
            _fsync_dir(ckpt_dir)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
        shutil.rmtree(old, ignore_errors=True)
        for stale in list_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def export_weights(accelerator, model, path: str, metadata: dict[str, str] | None = None) -> str | None:
    """Write the full (consolidated) weights of a possibly sharded model to one safetensors file.

    Collective (FSDP and ZeRO-3 gather the shards); rank 0 writes. Tensors shared between modules
    (tied embeddings) are written once per name as independent copies, so the file loads into a plain
    model with ``load_state_dict(strict=True)``.

    Returns:
        ``path`` on rank 0, None elsewhere.
    """
    from safetensors.torch import save_file

    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".part"
    save_file(tensors, tmp, metadata=metadata or {})
    os.replace(tmp, path)
    return path


def save_exported(model, path: str, metadata: dict[str, str]) -> str:
    """Write a plain (finalized) model's state dict to one safetensors file, atomically.

    Tied tensors are written once per name as independent copies, so the file loads with
    ``load_state_dict(strict=True)``. ``metadata`` (strings) tells :func:`load_exported` how to build
    the architecture.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".part"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)
    return path


def load_exported(path: str):
    """The model of an exported file, as plain torch modules (no dist_sparse training modules).

    The registered architecture is built from the stored model name and arguments, the method that
    finalized it rebuilds its changes from the stored architecture data (pruned channels, low-rank
    factors, ...), then the weights are loaded strictly. The model is returned in eval mode.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .methods.base import method_class
    from .models import create_model

    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata() or {}
    if "model" not in meta or "model_kwargs" not in meta:
        raise ValueError(f"{path} was not written by a dist_sparse export (no model description in its metadata)")
    model = create_model(meta["model"], **json.loads(meta["model_kwargs"]))
    arch = json.loads(meta.get("architecture", "{}") or "{}")
    model = method_class(meta.get("method", "dense")).build_exported(model, arch)
    model.load_state_dict(load_file(path), strict=True)
    return model.eval()
