"""Model registry: ``@register_model`` on a small entry function, ``create_model(name, **kw)`` to build.

None-valued keyword arguments are dropped, so an unset config field never overrides a model default.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from torch import nn

__all__ = ["register_model", "create_model", "model_names", "model_family"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_FAMILY: dict[str, str] = {}


def register_model(family: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register an entry function under its own name; ``family`` is 'resnet', 'deit' or 'transformer'."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _MODELS[fn.__name__] = fn
        _FAMILY[fn.__name__] = family
        return fn

    return deco


def _load_builtin() -> None:
    for mod in ("resnet", "deit", "transformer"):
        try:
            importlib.import_module(f"dist_sparse.models.{mod}")
        except ModuleNotFoundError as err:
            if err.name != f"dist_sparse.models.{mod}":
                raise


def model_names() -> list[str]:
    _load_builtin()
    return sorted(_MODELS)


def model_family(name: str) -> str:
    """'resnet', 'deit', 'transformer' for our models; 'timm' / 'torchvision' for ``timm/<arch>`` names."""
    from .external import is_external

    if is_external(name):
        return name.split("/", 1)[0]
    _load_builtin()
    return _FAMILY[name]


def create_model(name: str, **kw: Any) -> nn.Module:
    """Build a registered model, or ``timm/<arch>`` / ``torchvision/<arch>`` (models/external.py).
    Raises ``KeyError`` naming the known models for an unknown name."""
    from .external import create_external, is_external

    if is_external(name):
        return create_external(name, **{k: v for k, v in kw.items() if v is not None})
    _load_builtin()
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(_MODELS))}")
    return _MODELS[name](**{k: v for k, v in kw.items() if v is not None})
