"""Transformer decoding: cached == uncached search, beam search against exhaustive search, and a
tiny model that learns to copy (greedy exact match and BLEU)."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from dist_sparse.models import create_model

PAD, BOS, EOS = 0, 1, 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models on a shared 2-core machine: a second OpenMP thread mostly spins and waits.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_model(vocab: int, pre_norm: bool = True, seed: int = 0):
    """A seeded random tiny model in float64, perturbed so that its outputs are not all one repeated token.

    A freshly initialised pre-norm model mostly predicts its input token again (the residual stream
    carries the tied embedding straight to the output); scaling the layer weights and randomising the
    LayerNorm affine parameters makes the decoder's own computation matter.
    """
    torch.manual_seed(seed)
    m = create_model("transformer_tiny", vocab_size=vocab, pre_norm=pre_norm).double().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "embed_tokens.weight":
                continue
            if p.dim() == 2:
                p.mul_(4.0)
            else:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.5)
    return m


def _sources(n: int, vocab: int, seed: int, min_len: int = 3, max_len: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (n,), generator=g)
    src = torch.full((n, int(lens.max()) + 1), PAD, dtype=torch.long)
    for i, n_tok in enumerate(lens.tolist()):
        src[i, :n_tok] = torch.randint(3, vocab, (n_tok,), generator=g)
        src[i, n_tok] = EOS
    return src


@pytest.mark.parametrize("pre_norm", [True, False])
def test_cached_greedy_equals_reference_on_random_model(pre_norm):
    m = _random_model(13, pre_norm)
    src = _sources(12, 13, seed=1)
    cached = m.greedy(src, max_len=10)
    ref = m.decode_reference(src, "greedy", max_len=10)
    assert cached == ref
    assert len({tuple(h) for h in cached}) >= 3  # outputs differ between sentences: a real check
    assert all(len(h) <= 10 and PAD not in h and BOS not in h and EOS not in h for h in cached)


@pytest.mark.parametrize("pre_norm", [True, False])
def test_cached_beam_equals_reference_on_random_model(pre_norm):
    m = _random_model(13, pre_norm, seed=3)
    src = _sources(8, 13, seed=4)
    cached = m.beam_search(src, beam_size=4, max_len=9, length_penalty=0.6, return_scores=True)
    ref = m.decode_reference(src, "beam", beam_size=4, max_len=9, length_penalty=0.6, return_scores=True)
    assert [h for h, _ in cached] == [h for h, _ in ref]
    assert [s for _, s in cached] == pytest.approx([s for _, s in ref], rel=1e-9)


def test_beam_size_one_is_greedy():
    for seed in (0, 5):
        m = _random_model(11, seed=seed)
        src = _sources(10, 11, seed=seed + 1)
        assert m.beam_search(src, beam_size=1, max_len=8, length_penalty=0.6) == m.greedy(src, max_len=8)
        assert m.beam_search(src, beam_size=1, max_len=8, length_penalty=0.0) == m.greedy(src, max_len=8)


def _hypothesis_logprobs(m, src_row: torch.Tensor, hyps: list[list[int]]) -> list[float]:
    """Sum of log p(token | prefix) of each hypothesis, from one full forward pass (PAD and BOS excluded)."""
    width = max(len(h) for h in hyps)
    tgt_in = torch.full((len(hyps), width), PAD, dtype=torch.long)
    tgt_out = torch.full((len(hyps), width), PAD, dtype=torch.long)
    for i, h in enumerate(hyps):
        tgt_in[i, :len(h)] = torch.tensor([BOS] + h[:-1])
        tgt_out[i, :len(h)] = torch.tensor(h)
    logits = m(src_row[None].expand(len(hyps), -1), tgt_in).clone()
    logits[..., [PAD, BOS]] = float("-inf")
    logp = F.log_softmax(logits, dim=-1).gather(2, tgt_out[..., None])[..., 0]
    return logp.masked_fill(tgt_out == PAD, 0.0).sum(1).tolist()


@pytest.mark.parametrize("seed", [1, 6])
def test_wide_beam_equals_exhaustive_search(seed):
    # Vocabulary of 3 real tokens, at most 3 generated tokens: 1 + 3 + 9 hypotheses end in EOS and
    # 27 reach max_len. A beam of 64 keeps all of them, so it must return the best normalized score.
    vocab, max_len = 6, 3
    m = _random_model(vocab, seed=seed)
    src = _sources(4, vocab, seed=8, min_len=2, max_len=4)
    hyps = [list(body) + ([EOS] if n < max_len else [])
            for n in range(max_len + 1) for body in itertools.product(range(3, vocab), repeat=n)]
    assert len(hyps) == 40
    with torch.no_grad():
        logprobs = [_hypothesis_logprobs(m, src[b], hyps) for b in range(src.shape[0])]
    winners = set()
    for alpha in (0.0, 0.6, 1.5):
        got = m.beam_search(src, beam_size=64, max_len=max_len, length_penalty=alpha, return_scores=True)
        for b in range(src.shape[0]):
            norm = [lp / ((5.0 + len(h)) / 6.0) ** alpha for lp, h in zip(logprobs[b], hyps)]
            best = max(range(len(hyps)), key=norm.__getitem__)
            assert got[b][0] == [t for t in hyps[best] if t != EOS]
            assert got[b][1] == pytest.approx(norm[best], rel=1e-9)
            winners.add((b, best))
    # The seeds are chosen so that the winners differ between sentences and the length penalty
    # changes some of them (hypotheses of several lengths win): the check is not a trivial one.
    assert len(winners) > src.shape[0]
    assert len({len(hyps[w]) for _, w in winners}) >= 2


def test_batched_decoding_equals_one_sentence_at_a_time():
    m = _random_model(13, seed=11)
    src = _sources(5, 13, seed=12)
    greedy = m.greedy(src, max_len=8)
    beam = m.beam_search(src, beam_size=3, max_len=8)
    for b in range(src.shape[0]):
        row = src[b:b + 1]
        row = row[:, : int((row != PAD).sum())]  # drop this sentence's padding
        assert m.greedy(row, max_len=8) == [greedy[b]]
        assert m.beam_search(row, beam_size=3, max_len=8) == [beam[b]]


def test_max_len_bounds_output_and_bad_arguments():
    m = _random_model(13, seed=2)
    src = _sources(6, 13, seed=3)
    assert all(len(h) <= 2 for h in m.greedy(src, max_len=2))
    assert all(len(h) <= 1 for h in m.beam_search(src, beam_size=2, max_len=1))
    with pytest.raises(ValueError, match="max_len"):
        m.greedy(src, max_len=10_000)
    with pytest.raises(ValueError, match="beam_size"):
        m.beam_search(src, beam_size=0)
    with pytest.raises(ValueError, match="method"):
        m.decode_reference(src, "sampling")


# --------------------------------------------------------------------------------- learning

VOCAB = 20


def _copy_batch(g: torch.Generator, n: int):
    """Random sequences of 4-8 tokens (ids 3..19); the target is the source."""
    lens = torch.randint(4, 9, (n,), generator=g)
    width = int(lens.max()) + 1
    src = torch.full((n, width), PAD, dtype=torch.long)
    tgt_in, tgt_out = src.clone(), src.clone()
    for i, n_tok in enumerate(lens.tolist()):
        x = torch.randint(3, VOCAB, (n_tok,), generator=g)
        src[i, :n_tok], src[i, n_tok] = x, EOS
        tgt_in[i, 0], tgt_in[i, 1:n_tok + 1] = BOS, x
        tgt_out[i, :n_tok], tgt_out[i, n_tok] = x, EOS
    return src, tgt_in, tgt_out


@pytest.fixture(scope="module")
def copy_model():
    """transformer_tiny trained with Adam for 200 steps on the copy task (10-30 s on one core)."""
    steps, warmup = 200, 30
    torch.manual_seed(0)
    m = create_model("transformer_tiny", vocab_size=VOCAB)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3, betas=(0.9, 0.98))
    # Linear warm-up, then linear decay to 0: a constant rate leaves the end point noisy.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, (steps - s) / (steps - warmup)))
    g = torch.Generator().manual_seed(1)
    m.train()
    losses = []
    for _ in range(steps):
        src, tgt_in, tgt_out = _copy_batch(g, 64)
        logits = m(src, tgt_in)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tgt_out.reshape(-1), ignore_index=PAD,
                               label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return m.eval(), losses


def test_tiny_transformer_learns_to_copy(copy_model):
    import sacrebleu

    m, losses = copy_model
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    src, _, _ = _copy_batch(torch.Generator().manual_seed(99), 200)
    refs = [[t for t in row if t > EOS] for row in src.tolist()]
    hyps = m.greedy(src, max_len=12)
    exact = sum(h == r for h, r in zip(hyps, refs)) / len(refs)
    bleu = sacrebleu.corpus_bleu([" ".join(map(str, h)) for h in hyps], [[" ".join(map(str, r)) for r in refs]])
    assert exact > 0.9, exact
    assert bleu.score > 90, bleu.score
    beam = m.beam_search(src, beam_size=4, max_len=12)
    assert sum(h == r for h, r in zip(beam, refs)) / len(refs) > 0.9


def test_cached_equals_reference_on_trained_model(copy_model):
    m = copy.deepcopy(copy_model[0]).double()
    src, _, _ = _copy_batch(torch.Generator().manual_seed(5), 16)
    assert m.greedy(src, max_len=12) == m.decode_reference(src, "greedy", max_len=12)
    cached = m.beam_search(src, beam_size=3, max_len=12)
    assert cached == m.decode_reference(src, "beam", beam_size=3, max_len=12)
    assert len({tuple(h) for h in cached}) == 16
