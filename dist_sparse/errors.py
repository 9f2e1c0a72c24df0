"""Errors shown to the user, and the range checks that raise them.

This module imports nothing of the package, so every layer (models, data, methods, the config schema
itself) can raise a :class:`ConfigError` without importing the schema that validates it.

Example::

    check_range("method.sparsity", 1.2, 0.0 <= 1.2 < 1.0, "a number in [0, 1)")
    # ConfigError: config error: method.sparsity = 1.2 is not allowed; expected a number in [0, 1)
"""
from __future__ import annotations

from typing import Any

__all__ = ["ConfigError", "check_range", "RunError"]


class ConfigError(ValueError):
    """A bad config value; ``str(err)`` is the one line shown to the user."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config error: {key} = {value!r} is not allowed; expected {allowed}")


class RunError(RuntimeError):
    """A failure that stops a run on every rank with the same one-line message (no traceback).

    Raised, for example, on every rank when a method's surgery failed on rank 0 during a rebuild.
    """


def check_range(key: str, value: Any, ok: bool, allowed: str) -> None:
    """Raise ``ConfigError(key, value, allowed)`` unless ``ok`` (used by every ``validate()``)."""
    if not ok:
        raise ConfigError(key, value, allowed)
