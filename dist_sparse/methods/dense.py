"""The dense baseline: every hook is a no-op."""
from __future__ import annotations

from .base import Method, MethodConfig, register_method


@register_method
class Dense(Method):
    """Plain dense training (the reference every method is compared with)."""

    name = "dense"
    Config = MethodConfig
