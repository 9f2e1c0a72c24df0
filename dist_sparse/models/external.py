"""Any timm or torchvision image model by name: ``model.name: timm/<arch>`` or ``torchvision/<arch>``.

The model is built with random weights (never from a hub at run time); ``model.extra.checkpoint``
names a local file (``.safetensors`` or a torch ``.pt``/``.pth`` state dict) to start from. A
classifier head whose shape differs from the file (another number of classes) is kept freshly
initialised and reported; any other mismatch is an error.

``model.num_classes`` / ``in_chans`` / ``img_size`` come from the data as for our own models;
``model.drop_path_rate`` is passed to timm models. Further timm keyword arguments go in
``model.extra``. torchvision's classifiers take 3-channel input only.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn

from ..errors import ConfigError

__all__ = ["PREFIXES", "is_external", "external_exists", "create_external", "load_local_weights"]

log = logging.getLogger("dist_sparse")

PREFIXES = ("timm/", "torchvision/")


def is_external(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIXES)


def external_exists(name: str) -> bool:
    """True when the library behind the prefix knows the architecture."""
    lib, _, arch = name.partition("/")
    if lib == "timm":
        import timm

        return arch in timm.list_models()
    import torchvision.models as tvm

    return arch in tvm.list_models()


def load_local_weights(model: nn.Module, path: str, new_head_ok: bool = True) -> None:
    """Load a local state dict into ``model``; tensors of another shape (a classifier head for another
    number of classes) stay as initialised, or are an error when not ``new_head_ok``."""
    import torch

    if not os.path.isfile(path):
        raise ConfigError("model.extra.checkpoint", path, "an existing local weights file (.safetensors, .pt, .pth)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    for k in skipped:
        state.pop(k)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in skipped]
    if skipped and not new_head_ok:
        raise ConfigError("model.teacher_checkpoint", path, f"weights whose every tensor fits the teacher (other "
                          f"shapes: {skipped[:4]})")
    if missing or unexpected:
        raise ConfigError("model.extra.checkpoint", path, f"weights of this architecture (missing {missing[:4]}, "
                          f"unexpected {list(unexpected)[:4]})")
    if skipped:
        log.info("weights from %s; kept freshly initialised (other shape): %s", path, ", ".join(skipped))


def create_external(name: str, num_classes: int | None = None, in_chans: int | None = None,
                    img_size: int | None = None, drop_path_rate: float | None = None,
                    checkpoint: str | None = None, **kw: Any) -> nn.Module:
    """Build ``timm/<arch>`` or ``torchvision/<arch>`` with random weights (then ``checkpoint``)."""
    lib, _, arch = name.partition("/")
    if not external_exists(name):
        raise ConfigError("model.name", name, f"an architecture {lib} knows ({lib}.list_models())")
    if lib == "timm":
        import timm

        args = dict(pretrained=False, **kw)
        if num_classes is not None:
            args["num_classes"] = num_classes
        if in_chans is not None:
            args["in_chans"] = in_chans
        if drop_path_rate is not None:
            args["drop_path_rate"] = drop_path_rate
        try:  # ViT-like models take the input size; convolutional ones refuse the keyword
            model = timm.create_model(arch, img_size=img_size, **args) if img_size else timm.create_model(arch, **args)
        except TypeError:
            model = timm.create_model(arch, **args)
    else:
        import torchvision.models as tvm

        if in_chans not in (None, 3):
            raise ConfigError("data.extra.channels", in_chans, f"3: torchvision/{arch} takes RGB input")
        if drop_path_rate is not None:
            raise ConfigError("model.drop_path_rate", drop_path_rate, f"unset for torchvision/{arch}")
        model = tvm.get_model(arch, weights=None, **({"num_classes": num_classes} if num_classes else {}), **kw)
    if checkpoint:
        load_local_weights(model, checkpoint)
    return model
