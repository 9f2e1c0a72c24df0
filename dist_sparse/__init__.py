"""dist_sparse: sparse and low-rank training (RigL, AutoSparse, Polarization, Cuttlefish) made a
one-line choice, under DDP, FSDP and DeepSpeed ZeRO, with Hugging Face Accelerate.

Public API::

    from dist_sparse import create_model, create_method, load_config, train, load_exported
"""
from .checkpoint import load_exported
from .config import Config, ConfigError, load_config
from .methods import Method, Rebuild, create_method, method_names, register_method
from .models import create_model, model_names, register_model

__version__ = "0.1.0"

__all__ = ["Config", "ConfigError", "load_config", "Method", "Rebuild", "create_method", "method_names",
           "register_method", "create_model", "model_names", "register_model", "train", "load_exported",
           "__version__"]


def train(cfg):
    """Run one training job described by a :class:`Config` (see ``dist_sparse.train``)."""
    from .train import run

    return run(cfg)
