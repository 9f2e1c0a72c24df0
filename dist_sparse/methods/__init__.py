"""Training methods: a registry of controllers that implement :class:`~dist_sparse.methods.base.Method`."""
from .base import Method, MethodConfig, Rebuild, create_method, method_config_class, method_names, register_method

__all__ = ["Method", "MethodConfig", "Rebuild", "create_method", "method_config_class", "method_names",
           "register_method"]
