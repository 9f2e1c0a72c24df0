"""Metrics: translation quality (:mod:`.bleu`), FLOPs and per-layer statistics.

Submodules are imported where they are used (``from dist_sparse.metrics.bleu import corpus_scores``)
so that importing one metric never pulls in the dependencies of another.
"""
