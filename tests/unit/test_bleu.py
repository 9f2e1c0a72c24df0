"""Corpus BLEU / chrF (dist_sparse.metrics.bleu) against sacrebleu's command line and hand values."""
import math
import os
import shutil
import subprocess
import sys

import pytest

from dist_sparse.metrics.bleu import corpus_scores

FIX = os.path.join(os.path.dirname(__file__), "..", "fixtures")
REF, HYP = os.path.join(FIX, "bleu_ref.txt"), os.path.join(FIX, "bleu_hyp.txt")


def _lines(path):
    with open(path, encoding="utf-8") as fh:
        return [line.rstrip("\n") for line in fh]


def _cli(*args):
    exe = shutil.which("sacrebleu", path=os.path.dirname(sys.executable)) or shutil.which("sacrebleu")
    cmd = [exe] if exe else [sys.executable, "-m", "sacrebleu"]
    out = subprocess.run(cmd + list(args), capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def test_bleu_equals_sacrebleu_command_line():
    scores = corpus_scores(_lines(HYP), _lines(REF))
    # `-b` prints the score alone, rounded to one decimal; `-w 4` asks for four.
    assert round(scores["bleu"], 1) == _cli(REF, "-i", HYP, "-b")
    assert scores["bleu"] == pytest.approx(_cli(REF, "-i", HYP, "-b", "-w", "4"), abs=1e-4)
    assert scores["chrf"] == pytest.approx(_cli(REF, "-i", HYP, "-m", "chrf", "-b", "-w", "4"), abs=1e-4)
    assert 0 < scores["bleu"] < 100 and 0 < scores["chrf"] < 100
    assert scores["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert scores["chrf_signature"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:")
    assert scores["num_segments"] == 10


def test_hand_computed_brevity_penalty():
    # Every n-gram of the 4-token hypothesis is in the 6-token reference: precisions are 100%,
    # so BLEU = BP * 100 with BP = exp(1 - 6/4).
    scores = corpus_scores(["a b c d"], ["a b c d e f"], tokenize="none")
    assert scores["bleu_precisions"] == [100.0, 100.0, 100.0, 100.0]
    assert scores["bleu_bp"] == pytest.approx(math.exp(1 - 6 / 4))
    assert scores["bleu"] == pytest.approx(100 * math.exp(-0.5))
    assert (scores["sys_len"], scores["ref_len"]) == (4, 6)


def test_identical_text_scores_100_and_disjoint_text_0():
    refs = _lines(REF)
    same = corpus_scores(refs, refs)
    assert same["bleu"] == pytest.approx(100.0) and same["chrf"] == pytest.approx(100.0)
    none = corpus_scores(["xyz qqq"] * len(refs), refs)
    assert none["bleu"] == 0.0


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        corpus_scores(["a", "b"], ["a"])
    with pytest.raises(ValueError, match=r"hypotheses\[1\]"):
        corpus_scores(["a", None], ["a", "b"])
