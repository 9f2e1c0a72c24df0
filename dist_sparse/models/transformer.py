"""Encoder-decoder Transformer for translation ("Attention is all you need", Vaswani et al. 2017).

* One token embedding ``embed_tokens`` shared by source, target (joint vocabulary) and the output
  projection (tied: logits = h @ E^T), scaled by sqrt(d_model); fixed sinusoidal positions.
* ``encoder.layers.{i}`` = :class:`EncoderLayer` (``self_attn.{q,k,v,out}_proj``, ``fc1``, ``fc2``);
  ``decoder.layers.{i}`` = :class:`DecoderLayer` (adds ``cross_attn.{q,k,v,out}_proj``). Every
  projection is a plain ``nn.Linear`` so that sparsity methods find it by FQN glob.
* ``pre_norm=True`` (default; stabler for short runs): ``x + f(LN(x))`` and a final LayerNorm in the
  encoder and decoder. ``pre_norm=False`` is the paper's post-norm ``LN(x + f(x))``.
* Padding masks come from ``pad_id``: source pads are never attended to (encoder self-attention and
  cross-attention); target pads are masked as keys in decoder self-attention, on top of the causal mask.

``forward(src, tgt_in) -> logits (B, T, V)``; the trainer computes the (label-smoothed) loss.

Decoding (:meth:`Seq2SeqTransformer.greedy`, :meth:`Seq2SeqTransformer.beam_search`) is batched and
incremental: the decoder's self-attention keys/values are cached per layer (written in place into
preallocated buffers) and the cross-attention keys/values of the encoder output are computed once.
:meth:`Seq2SeqTransformer.decode_reference` runs the very same search but recomputes the whole decoder
on the full prefix at every step; the tests check both give the same tokens.

Search rules (shared by the cached and reference paths):

* BOS and PAD can never be generated (their log-probabilities are -inf).
* ``max_len`` bounds the generated tokens, EOS included; a hypothesis that reaches it without EOS
  ends there (returned as is).
* Beam search keeps, per sentence, the ``beam_size`` best live hypotheses among the ``2 * beam_size``
  best expansions; an expansion ending in EOS is finished only when it ranks among the top
  ``beam_size`` expansions (so ``beam_size=1`` is exactly greedy search); a sentence stops when it
  has ``beam_size`` finished hypotheses. Finished hypotheses are ranked by ``logprob / lp(len)`` with
  GNMT's length penalty ``lp(len) = ((5 + len) / 6) ** length_penalty``, ``len`` counting EOS.
* Returned token lists exclude BOS and EOS.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import register_model

__all__ = ["MultiheadAttention", "EncoderLayer", "DecoderLayer", "Encoder", "Decoder", "Seq2SeqTransformer",
           "WRAP_CLASSES", "sinusoidal_positions", "transformer_tiny", "transformer_small",
           "transformer_wmt_base", "transformer_wmt_big"]


def sinusoidal_positions(n: int, dim: int) -> torch.Tensor:
    """The paper's fixed position encodings.

    Args:
        n: number of positions.
        dim: encoding width (even).

    Returns:
        (n, dim) float tensor: ``PE[p, 2i] = sin(p / 10000^(2i/dim))``, ``PE[p, 2i+1] = cos(...)``.
    """
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    inv = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    pe = torch.zeros(n, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * inv)
    pe[:, 1::2] = torch.cos(pos * inv)
    return pe.float()


def _key_mask(allowed: torch.Tensor) -> torch.Tensor:
    """Let a query whose keys are all masked attend to every key (its output is unused; this avoids NaN)."""
    return allowed | ~allowed.any(dim=-1, keepdim=True)


class MultiheadAttention(nn.Module):
    """Multi-head attention with separate ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` linears.

    Args:
        dim: model width (divisible by ``heads``).
        heads: attention heads.
        dropout: dropout on the attention weights (training only).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ConfigError("model.extra.heads", heads, f"a divisor of d_model={dim}")
        self.heads, self.dropout = heads, dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, self.heads, -1).transpose(1, 2)  # (B, H, T, Dh)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x: (B, S, D). Returns: keys and values, each (B, heads, S, D/heads)."""
        return self._split(self.k_proj(x)), self._split(self.v_proj(x))

    def attend(self, q_in: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention of ``q_in`` (B, Tq, D, not yet projected) over projected ``k``, ``v`` (B, H, Tk, Dh).

        Args:
            q_in: queries before ``q_proj``.
            k: keys, already split into heads.
            v: values, already split into heads.
            mask: bool, broadcastable to (B, H, Tq, Tk); True = may attend. None = attend to all.

        Returns:
            (B, Tq, D) after ``out_proj``.
        """
        q = self._split(self.q_proj(q_in))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        b, _, t, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))

    def forward(self, query: torch.Tensor, key_value: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Args: query (B, Tq, D), key_value (B, Tk, D), mask as in :meth:`attend`. Returns: (B, Tq, D)."""
        k, v = self.project_kv(key_value)
        return self.attend(query, k, v, mask)


class EncoderLayer(nn.Module):
    """Self-attention + feed-forward, each in a residual branch with LayerNorm (pre- or post-norm).

    Args:
        dim: model width.
        ffn_dim: feed-forward hidden width.
        heads: attention heads.
        dropout: dropout on each branch output (residual dropout).
        attn_dropout: dropout on attention weights.
        activation_dropout: dropout after the ReLU of the feed-forward.
        pre_norm: pre-norm (True) or post-norm (False).
    """

    def __init__(self, dim: int, ffn_dim: int, heads: int, dropout: float, attn_dropout: float,
                 activation_dropout: float, pre_norm: bool):
        super().__init__()
        self.pre_norm = pre_norm
        self.self_attn = MultiheadAttention(dim, heads, attn_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.activation_dropout = nn.Dropout(activation_dropout)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_dropout(F.relu(self.fc1(x))))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Args: x (B, S, D); mask (B, 1, 1|S, S) bool, True = may attend. Returns: (B, S, D)."""
        if self.pre_norm:
            h = self.self_attn_layer_norm(x)
            x = x + self.dropout(self.self_attn(h, h, mask))
            return x + self.dropout(self._ffn(self.final_layer_norm(x)))
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x, x, mask)))
        return self.final_layer_norm(x + self.dropout(self._ffn(x)))


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention over the encoder output, feed-forward.

    Arguments as :class:`EncoderLayer`. :meth:`forward` processes a whole target prefix;
    :meth:`step` processes one new position using (and filling) a key/value cache.
    """

    def __init__(self, dim: int, ffn_dim: int, heads: int, dropout: float, attn_dropout: float,
                 activation_dropout: float, pre_norm: bool):
        super().__init__()
        self.pre_norm = pre_norm
        self.self_attn = MultiheadAttention(dim, heads, attn_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.cross_attn = MultiheadAttention(dim, heads, attn_dropout)
        self.cross_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.activation_dropout = nn.Dropout(activation_dropout)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_dropout(F.relu(self.fc1(x))))

    def _rest(self, x: torch.Tensor, self_out_fn, cross_k: torch.Tensor, cross_v: torch.Tensor,
              src_mask: torch.Tensor) -> torch.Tensor:
        # The three residual branches; ``self_out_fn(h)`` gives the self-attention of the normed (or
        # raw, post-norm) input, computed with or without a cache by the caller.
        if self.pre_norm:
            x = x + self.dropout(self_out_fn(self.self_attn_layer_norm(x)))
            x = x + self.dropout(self.cross_attn.attend(self.cross_attn_layer_norm(x), cross_k, cross_v, src_mask))
            return x + self.dropout(self._ffn(self.final_layer_norm(x)))
        x = self.self_attn_layer_norm(x + self.dropout(self_out_fn(x)))
        x = self.cross_attn_layer_norm(x + self.dropout(self.cross_attn.attend(x, cross_k, cross_v, src_mask)))
        return self.final_layer_norm(x + self.dropout(self._ffn(x)))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, self_mask: torch.Tensor,
                src_mask: torch.Tensor) -> torch.Tensor:
        """Full-prefix pass.

        Args:
            x: target states (B, T, D).
            memory: encoder output (B, S, D).
            self_mask: (B, 1, T, T) bool (causal and target padding), True = may attend.
            src_mask: (B, 1, 1, S) bool, True = non-pad source position.

        Returns:
            (B, T, D).
        """
        cross_k, cross_v = self.cross_attn.project_kv(memory)
        return self._rest(x, lambda h: self.self_attn(h, h, self_mask), cross_k, cross_v, src_mask)

    def step(self, x: torch.Tensor, pos: int, cache_k: torch.Tensor, cache_v: torch.Tensor,
             cross_k: torch.Tensor, cross_v: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """One new target position with a key/value cache.

        Args:
            x: states of the new position (N, 1, D).
            pos: its index in the target (0 = BOS).
            cache_k: (N, H, max_len, Dh) self-attention keys; positions ``< pos`` are filled, ``pos`` is
                written here.
            cache_v: values, like ``cache_k``.
            cross_k: precomputed cross-attention keys (N, H, S, Dh).
            cross_v: precomputed cross-attention values.
            src_mask: (N, 1, 1, S) bool, True = non-pad source position.

        Returns:
            (N, 1, D).
        """

        def self_out(h: torch.Tensor) -> torch.Tensor:
            k, v = self.self_attn.project_kv(h)
            cache_k[:, :, pos:pos + 1] = k
            cache_v[:, :, pos:pos + 1] = v
            # The new position may attend to every cached position <= pos: no mask needed.
            return self.self_attn.attend(h, cache_k[:, :, :pos + 1], cache_v[:, :, :pos + 1])

        return self._rest(x, self_out, cross_k, cross_v, src_mask)


class _Stack(nn.Module):
    def __init__(self, layer_cls, n: int, dim: int, ffn_dim: int, heads: int, dropout: float, attn_dropout: float,
                 activation_dropout: float, pre_norm: bool):
        super().__init__()
        self.layers = nn.ModuleList(layer_cls(dim, ffn_dim, heads, dropout, attn_dropout, activation_dropout,
                                              pre_norm) for _ in range(n))
        # Pre-norm leaves the residual stream un-normalized: one LayerNorm closes the stack.
        self.layer_norm = nn.LayerNorm(dim) if pre_norm else nn.Identity()


class Encoder(_Stack):
    """``layers`` of :class:`EncoderLayer` and a final ``layer_norm`` (pre-norm only)."""

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """Args: x embedded source (B, S, D); src_mask (B, 1, 1, S) bool. Returns: (B, S, D)."""
        for layer in self.layers:
            x = layer(x, src_mask)
        return self.layer_norm(x)


class Decoder(_Stack):
    """``layers`` of :class:`DecoderLayer` and a final ``layer_norm`` (pre-norm only)."""

    def forward(self, x: torch.Tensor, memory: torch.Tensor, self_mask: torch.Tensor,
                src_mask: torch.Tensor) -> torch.Tensor:
        """Args: x embedded target (B, T, D), memory (B, S, D), masks. Returns: (B, T, D)."""
        for layer in self.layers:
            x = layer(x, memory, self_mask, src_mask)
        return self.layer_norm(x)


class Seq2SeqTransformer(nn.Module):
    """The full model; see the module docstring.

    Args:
        vocab_size: joint source/target vocabulary size.
        pad_id: padding token id (masked in attention, never generated).
        bos_id: begin-of-sentence id (first decoder input).
        eos_id: end-of-sentence id (ends a hypothesis).
        d_model: model width.
        ffn_dim: feed-forward hidden width.
        heads: attention heads.
        enc_layers: encoder layers.
        dec_layers: decoder layers.
        dropout: residual and embedding dropout.
        attn_dropout: dropout on attention weights.
        activation_dropout: dropout after the feed-forward ReLU.
        pre_norm: pre-norm (True) or the paper's post-norm (False).
        max_len: longest source or target sequence (size of the position table).
    """

    def __init__(self, vocab_size: int, pad_id: int = 0, bos_id: int = 1, eos_id: int = 2, d_model: int = 512,
                 ffn_dim: int = 2048, heads: int = 8, enc_layers: int = 6, dec_layers: int = 6, dropout: float = 0.1,
                 attn_dropout: float = 0.0, activation_dropout: float = 0.0, pre_norm: bool = True,
                 max_len: int = 1024):
        super().__init__()
        self.vocab_size, self.d_model, self.max_len = vocab_size, d_model, max_len
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.embed_tokens = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.embed_scale = math.sqrt(d_model)
        self.register_buffer("positions", sinusoidal_positions(max_len, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)
        args = (d_model, ffn_dim, heads, dropout, attn_dropout, activation_dropout, pre_norm)
        self.encoder = Encoder(EncoderLayer, enc_layers, *args)
        self.decoder = Decoder(DecoderLayer, dec_layers, *args)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # Scaled by sqrt(d) on the way in, the embeddings start near unit variance; tied as the output
        # projection, they give logits of order 1 for unit-variance decoder states.
        nn.init.normal_(self.embed_tokens.weight, std=self.d_model ** -0.5)
        with torch.no_grad():
            self.embed_tokens.weight[self.pad_id].zero_()

    # -------------------------------------------------------------------------------- training path

    def embed(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Args: tokens (B, T) ids at positions start..start+T-1. Returns: (B, T, D) scaled embeddings + positions."""
        t = tokens.shape[1]
        if start + t > self.max_len:
            raise ValueError(f"sequence of length {start + t} exceeds the model's max_len={self.max_len}")
        pos = self.positions[start:start + t].to(self.embed_tokens.weight.dtype)
        return self.dropout(self.embed_tokens(tokens) * self.embed_scale + pos)

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: src (B, S) token ids. Returns: encoder output (B, S, D) and src_mask (B, 1, 1, S) bool."""
        src_mask = _key_mask(src != self.pad_id)[:, None, None, :]
        return self.encoder(self.embed(src), src_mask), src_mask

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """Full decoder pass. Args: tgt_in (B, T), memory, src_mask from :meth:`encode`. Returns: logits (B, T, V)."""
        t = tgt_in.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=tgt_in.device).tril()
        self_mask = _key_mask(causal[None] & (tgt_in != self.pad_id)[:, None, :])[:, None]
        h = self.decoder(self.embed(tgt_in), memory, self_mask, src_mask)
        return self.output_logits(h)

    def output_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tied output projection. Args: h (..., D). Returns: (..., V)."""
        return F.linear(h, self.embed_tokens.weight)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Args: src (B, S), tgt_in (B, T) token ids padded with pad_id. Returns: logits (B, T, vocab_size)."""
        memory, src_mask = self.encode(src)
        return self.decode(tgt_in, memory, src_mask)

    # -------------------------------------------------------------------------------- decoding

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, max_len: Optional[int] = None) -> list[list[int]]:
        """Greedy decoding with a key/value cache (call in eval mode: dropout would make it random).

        Args:
            src: (B, S) source ids, padded with pad_id.
            max_len: most generated tokens, EOS included (default: ``S + 10``, within the position table).

        Returns:
            B lists of token ids, without BOS and EOS.
        """
        return self._greedy(src, max_len, cached=True)

    @torch.no_grad()
    def beam_search(self, src: torch.Tensor, beam_size: int = 4, max_len: Optional[int] = None,
                    length_penalty: float = 0.6, return_scores: bool = False):
        """Batched beam search with a key/value cache (rules in the module docstring).

        Args:
            src: (B, S) source ids, padded with pad_id.
            beam_size: hypotheses kept per sentence.
            max_len: most generated tokens, EOS included (default: ``S + 10``).
            length_penalty: GNMT alpha; 0 ranks by plain log-probability.
            return_scores: also return each result's normalized score.

        Returns:
            B lists of token ids without BOS/EOS; with ``return_scores``, B (tokens, score) pairs.
        """
        return self._beam(src, beam_size, max_len, length_penalty, return_scores, cached=True)

    @torch.no_grad()
    def decode_reference(self, src: torch.Tensor, method: str = "greedy", beam_size: int = 4,
                         max_len: Optional[int] = None, length_penalty: float = 0.6, return_scores: bool = False):
        """The same searches without a cache: the full decoder is recomputed on the prefix at every step.

        Args:
            src: (B, S) source ids.
            method: "greedy" or "beam".
            beam_size, max_len, length_penalty, return_scores: as in :meth:`beam_search`.

        Returns:
            as :meth:`greedy` or :meth:`beam_search`.
        """
        if method == "greedy":
            return self._greedy(src, max_len, cached=False)
        if method == "beam":
            return self._beam(src, beam_size, max_len, length_penalty, return_scores, cached=False)
        raise ValueError(f"decode_reference: method={method!r} is not allowed; expected 'greedy' or 'beam'")

    def _max_len(self, src: torch.Tensor, max_len: Optional[int]) -> int:
        if max_len is None:
            max_len = min(src.shape[1] + 10, self.max_len)
        if not 1 <= max_len <= self.max_len:
            raise ValueError(f"max_len={max_len} is not allowed; expected 1..{self.max_len} (the model's max_len)")
        return max_len

    def _stepper(self, src: torch.Tensor, repeat: int, max_len: int, cached: bool) -> "_Stepper":
        memory, src_mask = self.encode(src)
        return (_CachedStepper if cached else _FullStepper)(self, memory, src_mask, repeat, max_len)

    def _next_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float().clone() if logits.dtype in (torch.float16, torch.bfloat16) else logits.clone()
        logits[:, self.pad_id] = float("-inf")
        logits[:, self.bos_id] = float("-inf")
        return F.log_softmax(logits, dim=-1)

    def _greedy(self, src: torch.Tensor, max_len: Optional[int], cached: bool) -> list[list[int]]:
        max_len = self._max_len(src, max_len)
        b = src.shape[0]
        stepper = self._stepper(src, 1, max_len, cached)
        prefix = torch.full((b, 1), self.bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(b, dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            nxt = self._next_logprobs(stepper.step(prefix)).argmax(dim=-1)
            nxt = nxt.masked_fill(done, self.pad_id)  # finished rows only pad (ignored)
            prefix = torch.cat([prefix, nxt[:, None]], dim=1)
            done |= nxt == self.eos_id
            if bool(done.all()):
                break
        return [self._strip(row) for row in prefix[:, 1:].tolist()]

    def _strip(self, ids: list[int]) -> list[int]:
        out = []
        for t in ids:
            if t == self.eos_id or t == self.pad_id:
                break
            out.append(t)
        return out

    def _beam(self, src: torch.Tensor, k: int, max_len: Optional[int], alpha: float, return_scores: bool,
              cached: bool):
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"beam_size={k!r} is not allowed; expected an integer >= 1")
        max_len = self._max_len(src, max_len)
        b, v, dev = src.shape[0], self.vocab_size, src.device
        stepper = self._stepper(src, k, max_len, cached)
        prefix = torch.full((b * k, 1), self.bos_id, dtype=torch.long, device=dev)
        # Cumulative log-probabilities; only beam 0 is live at the start so that the k beams of a
        # sentence do not all expand the same BOS.
        scores = torch.full((b, k), float("-inf"), device=dev, dtype=torch.float64)
        scores[:, 0] = 0.0
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
        done = [False] * b
        offsets = (torch.arange(b, device=dev) * k)[:, None]
        n_cand = min(2 * k, k * v)
        for t in range(max_len):
            logp = self._next_logprobs(stepper.step(prefix)).to(torch.float64)  # (B*K, V)
            cand = (scores.reshape(b * k, 1) + logp).reshape(b, k * v)
            top_s, top_i = cand.topk(n_cand, dim=1)  # sorted best first
            beam_idx, tok = top_i // v, top_i % v
            is_eos = tok == self.eos_id
            last = t == max_len - 1
            # Finish: EOS expansions among the top k (and, at the last step, the top k live ones).
            fin = (is_eos | last) & (torch.arange(n_cand, device=dev) < k)[None] & torch.isfinite(top_s)
            lp = ((5.0 + t + 1) / 6.0) ** alpha
            if bool(fin.any()):
                rows, cols = fin.nonzero(as_tuple=True)
                hist = prefix[:, 1:].tolist()
                for r, c in zip(rows.tolist(), cols.tolist()):
                    if done[r] or len(finished[r]) >= k:
                        continue
                    toks = hist[r * k + int(beam_idx[r, c])] + ([] if bool(is_eos[r, c]) else [int(tok[r, c])])
                    finished[r].append((float(top_s[r, c]) / lp, toks))
            for r in range(b):
                if not done[r] and len(finished[r]) >= k:
                    done[r] = True
            if last or all(done):
                break
            # Live beams: the first k non-EOS expansions (there are at most k EOS among 2k).
            order = torch.where(is_eos, n_cand, 0) + torch.arange(n_cand, device=dev)[None]
            keep = order.argsort(dim=1)[:, :k]
            scores = top_s.gather(1, keep)
            src_rows = (offsets + beam_idx.gather(1, keep)).reshape(-1)
            prefix = torch.cat([prefix[src_rows], tok.gather(1, keep).reshape(-1, 1)], dim=1)
            stepper.reorder(src_rows)
        results = []
        for r in range(b):
            best = max(finished[r], key=lambda s: s[0]) if finished[r] else (float("-inf"), [])
            toks = self._strip(best[1])
            results.append((toks, best[0]) if return_scores else toks)
        return results


class _Stepper:
    """Gives the next-token logits (N, V) for a batch of prefixes (N, t+1); ``reorder`` follows beams.

    ``memory``/``src_mask`` hold one row per sentence; each sentence owns ``repeat`` consecutive rows
    (its beams) of the prefixes.
    """

    def __init__(self, model: Seq2SeqTransformer, memory: torch.Tensor, src_mask: torch.Tensor, repeat: int,
                 max_len: int):
        self.model = model
        self.src_mask = src_mask.repeat_interleave(repeat, dim=0)

    def step(self, prefix: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reorder(self, rows: torch.Tensor) -> None:
        pass


class _FullStepper(_Stepper):
    """Reference: run the whole decoder on the whole prefix and keep the last position's logits."""

    def __init__(self, model: Seq2SeqTransformer, memory: torch.Tensor, src_mask: torch.Tensor, repeat: int,
                 max_len: int):
        super().__init__(model, memory, src_mask, repeat, max_len)
        self.memory = memory.repeat_interleave(repeat, dim=0)

    def step(self, prefix: torch.Tensor) -> torch.Tensor:
        return self.model.decode(prefix, self.memory, self.src_mask)[:, -1]


class _CachedStepper(_Stepper):
    """Incremental: one new position per step, self-attention K/V cached, cross-attention K/V precomputed."""

    def __init__(self, model: Seq2SeqTransformer, memory: torch.Tensor, src_mask: torch.Tensor, repeat: int,
                 max_len: int):
        super().__init__(model, memory, src_mask, repeat, max_len)
        layers = model.decoder.layers
        # Project the encoder output once per sentence, then share it among the sentence's beams.
        self.cross = [tuple(t.repeat_interleave(repeat, dim=0) for t in layer.cross_attn.project_kv(memory))
                      for layer in layers]
        # Self-attention K/V buffers in the projections' dtype (bf16 under autocast), like the cross K/V.
        proto = self.cross[0][0]
        shape = (proto.shape[0], proto.shape[1], max_len, proto.shape[3])
        self.cache = [(proto.new_zeros(shape), proto.new_zeros(shape)) for _ in layers]

    def step(self, prefix: torch.Tensor) -> torch.Tensor:
        pos = prefix.shape[1] - 1
        x = self.model.embed(prefix[:, -1:], start=pos)
        for layer, (ck, cv), (xk, xv) in zip(self.model.decoder.layers, self.cache, self.cross):
            x = layer.step(x, pos, ck, cv, xk, xv, self.src_mask)
        return self.model.output_logits(self.model.decoder.layer_norm(x))[:, -1]

    def reorder(self, rows: torch.Tensor) -> None:
        # Beams move within their sentence, so the cross-attention K/V (equal for all beams of a
        # sentence) stay valid; only the self-attention cache follows the surviving beams.
        self.cache = [(ck.index_select(0, rows), cv.index_select(0, rows)) for ck, cv in self.cache]


WRAP_CLASSES = (EncoderLayer, DecoderLayer)


def _build(vocab_size, pad_id, bos_id, eos_id, d_model, ffn_dim, heads, enc_layers, dec_layers, dropout,
           attn_dropout, activation_dropout, pre_norm, max_len) -> Seq2SeqTransformer:
    def need(ok: bool, key: str, val, allowed: str) -> None:
        if not ok:
            raise ConfigError(key, val, allowed)

    need(isinstance(vocab_size, int) and vocab_size >= 4, "model.extra.vocab_size", vocab_size, "an integer >= 4")
    for key, val in (("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)):
        need(isinstance(val, int) and 0 <= val < vocab_size, f"model.extra.{key}", val, f"an id in [0, {vocab_size})")
    need(len({pad_id, bos_id, eos_id}) == 3, "model.extra.pad_id/bos_id/eos_id", (pad_id, bos_id, eos_id),
         "three different ids")
    for key, val in (("d_model", d_model), ("ffn_dim", ffn_dim), ("heads", heads), ("max_len", max_len)):
        need(isinstance(val, int) and val >= 1, f"model.extra.{key}", val, "an integer >= 1")
    need(d_model % 2 == 0, "model.extra.d_model", d_model, "an even integer (sinusoidal positions)")
    need(d_model % heads == 0, "model.extra.heads", heads, f"a divisor of d_model={d_model}")
    for key, val in (("enc_layers", enc_layers), ("dec_layers", dec_layers)):
        need(isinstance(val, int) and val >= 1, f"model.extra.{key}", val, "an integer >= 1")
    for key, val in (("dropout", dropout), ("attn_dropout", attn_dropout), ("activation_dropout", activation_dropout)):
        need(isinstance(val, (int, float)) and 0.0 <= val < 1.0, f"model.extra.{key}", val, "a probability in [0, 1)")
    return Seq2SeqTransformer(vocab_size, pad_id, bos_id, eos_id, d_model, ffn_dim, heads, enc_layers, dec_layers,
                              dropout, attn_dropout, activation_dropout, bool(pre_norm), max_len)


_DOC = """{title}: {enc}+{dec} layers, d_model {d}, FFN {ffn}, {heads} heads, dropout {drop}.

    Every size below is a default that a keyword argument overrides.

    Args:
        vocab_size: joint vocabulary size.
        pad_id: padding id.
        bos_id: begin-of-sentence id.
        eos_id: end-of-sentence id.
        d_model: model width.
        ffn_dim: feed-forward hidden width.
        heads: attention heads.
        enc_layers: encoder layers.
        dec_layers: decoder layers.
        dropout: residual and embedding dropout.
        pre_norm: pre-norm (True) or the paper's post-norm (False).
        max_len: longest sequence (position table size).
        attn_dropout: dropout on attention weights.
        activation_dropout: dropout after the feed-forward ReLU.

    Returns:
        the model.
    """


@register_model("transformer")
def transformer_tiny(vocab_size: int, pad_id: int = 0, bos_id: int = 1, eos_id: int = 2, d_model: int = 64,
                     ffn_dim: int = 256, heads: int = 4, enc_layers: int = 2, dec_layers: int = 2,
                     dropout: float = 0.0, pre_norm: bool = True, max_len: int = 256, attn_dropout: float = 0.0,
                     activation_dropout: float = 0.0) -> Seq2SeqTransformer:
    return _build(vocab_size, pad_id, bos_id, eos_id, d_model, ffn_dim, heads, enc_layers, dec_layers, dropout,
                  attn_dropout, activation_dropout, pre_norm, max_len)


@register_model("transformer")
def transformer_small(vocab_size: int, pad_id: int = 0, bos_id: int = 1, eos_id: int = 2, d_model: int = 256,
                      ffn_dim: int = 1024, heads: int = 4, enc_layers: int = 3, dec_layers: int = 3,
                      dropout: float = 0.1, pre_norm: bool = True, max_len: int = 1024, attn_dropout: float = 0.0,
                      activation_dropout: float = 0.0) -> Seq2SeqTransformer:
    return _build(vocab_size, pad_id, bos_id, eos_id, d_model, ffn_dim, heads, enc_layers, dec_layers, dropout,
                  attn_dropout, activation_dropout, pre_norm, max_len)


@register_model("transformer")
def transformer_wmt_base(vocab_size: int, pad_id: int = 0, bos_id: int = 1, eos_id: int = 2, d_model: int = 512,
                         ffn_dim: int = 2048, heads: int = 8, enc_layers: int = 6, dec_layers: int = 6,
                         dropout: float = 0.1, pre_norm: bool = True, max_len: int = 1024, attn_dropout: float = 0.0,
                         activation_dropout: float = 0.0) -> Seq2SeqTransformer:
    return _build(vocab_size, pad_id, bos_id, eos_id, d_model, ffn_dim, heads, enc_layers, dec_layers, dropout,
                  attn_dropout, activation_dropout, pre_norm, max_len)


@register_model("transformer")
def transformer_wmt_big(vocab_size: int, pad_id: int = 0, bos_id: int = 1, eos_id: int = 2, d_model: int = 1024,
                        ffn_dim: int = 4096, heads: int = 16, enc_layers: int = 6, dec_layers: int = 6,
                        dropout: float = 0.3, pre_norm: bool = True, max_len: int = 1024, attn_dropout: float = 0.0,
                        activation_dropout: float = 0.0) -> Seq2SeqTransformer:
    return _build(vocab_size, pad_id, bos_id, eos_id, d_model, ffn_dim, heads, enc_layers, dec_layers, dropout,
                  attn_dropout, activation_dropout, pre_norm, max_len)


for _fn, _args in ((transformer_tiny, ("Transformer-tiny (tests)", 2, 2, 64, 256, 4, 0.0)),
                   (transformer_small, ("Transformer-small", 3, 3, 256, 1024, 4, 0.1)),
                   (transformer_wmt_base, ("Transformer-base (WMT)", 6, 6, 512, 2048, 8, 0.1)),
                   (transformer_wmt_big, ("Transformer-big (WMT)", 6, 6, 1024, 4096, 16, 0.3))):
    _fn.__doc__ = _DOC.format(title=_args[0], enc=_args[1], dec=_args[2], d=_args[3], ffn=_args[4], heads=_args[5],
                              drop=_args[6])
