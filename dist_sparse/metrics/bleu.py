"""Corpus BLEU and chrF with sacrebleu, on detokenized text.

Both metrics are computed by sacrebleu on plain (detokenized) hypotheses and references, so the
numbers are the ones ``sacrebleu ref.txt -i hyp.txt -m bleu chrf`` prints; the returned signature
records the settings (tokenizer, smoothing, case, version) that make a score reproducible.

Example::

    scores = corpus_scores(["The cat sat."], ["The cat sat down."])
    print(scores["bleu"], scores["bleu_signature"])
"""
from __future__ import annotations

from typing import Sequence

from sacrebleu.metrics import BLEU, CHRF

__all__ = ["corpus_scores"]


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str], *, tokenize: str = "13a",
                  lowercase: bool = False) -> dict:
    """Corpus-level BLEU and chrF of detokenized hypotheses against one reference each.

    Args:
        hypotheses: one detokenized system output per segment.
        references: the detokenized reference of each segment (same order and length).
        tokenize: sacrebleu's BLEU tokenizer ("13a" is the WMT default; "none" for pre-tokenized).
        lowercase: case-insensitive BLEU.

    Returns:
        dict with ``bleu`` and ``chrf`` (0-100 floats), ``bleu_signature`` and ``chrf_signature``
        (sacrebleu signature strings), ``bleu_precisions`` (1- to 4-gram precisions, %),
        ``bleu_bp`` (brevity penalty), ``sys_len`` and ``ref_len`` (BLEU-tokenized lengths) and
        ``num_segments``.

    Raises:
        ValueError: when the two lists differ in length or contain a non-string.
    """
    hyps, refs = list(hypotheses), list(references)
    if len(hyps) != len(refs):
        raise ValueError(f"corpus_scores: {len(hyps)} hypotheses but {len(refs)} references; "
                         "expected one reference per hypothesis")
    for name, seq in (("hypotheses", hyps), ("references", refs)):
        bad = next((i for i, s in enumerate(seq) if not isinstance(s, str)), None)
        if bad is not None:
            raise ValueError(f"corpus_scores: {name}[{bad}] = {seq[bad]!r} is not a string")
    # sacrebleu treats a line break inside a segment as a segment boundary in files; keep one line each.
    hyps = [h.replace("\n", " ") for h in hyps]
    refs = [r.replace("\n", " ") for r in refs]
    bleu_metric = BLEU(tokenize=tokenize, lowercase=lowercase)
    chrf_metric = CHRF()
    bleu = bleu_metric.corpus_score(hyps, [refs])
    chrf = chrf_metric.corpus_score(hyps, [refs])
    return {
        "bleu": float(bleu.score),
        "chrf": float(chrf.score),
        "bleu_signature": str(bleu_metric.get_signature()),
        "chrf_signature": str(chrf_metric.get_signature()),
        "bleu_precisions": [float(p) for p in bleu.precisions],
        "bleu_bp": float(bleu.bp),
        "sys_len": int(bleu.sys_len),
        "ref_len": int(bleu.ref_len),
        "num_segments": len(hyps),
    }
