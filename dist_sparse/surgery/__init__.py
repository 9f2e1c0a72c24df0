"""Model surgery: pure functions model -> model or tensor -> tensor, no training logic.

``masking`` (sparse masks, distributions, drop/grow), ``lowrank`` (factorized layers) and ``channels``
(channel removal) are imported by the methods that use them.
"""
