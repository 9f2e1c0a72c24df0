"""Translation data: parallel text -> sentencepiece ids -> token-bucketed, rank-sliced batches.

Data sets (``data.name``):

* ``ding_de_en`` - the embedded default: sentence pairs from the Ding German-English dictionary
  (Debian package ``trans-de-en``), split once into train/valid/test with a fixed seed.
* ``parallel_text`` - your own corpus: two aligned plain-text files per split, a TSV or JSONL file
  per split, or a ``datasets.save_to_disk`` directory with a ``translation`` column.
* ``copy`` and ``reverse`` - seeded synthetic sequence tasks for tests; the vocabulary is the
  symbols themselves (ids 4 .. vocab_size-1, written as decimal numbers), no sentencepiece.

Text data sets share one joint unigram sentencepiece model trained on the training split by rank 0
and saved as ``<run_dir>/spm.model`` (reused when present, e.g. on resume). Ids: pad 0, bos 1,
eos 2, unk 3.

Batches: an epoch is a fixed list of GLOBAL batches computed identically on every rank from
(seed, epoch): pairs are shuffled, stably sorted by (source, target) length and packed greedily so
that ``batch_size * (max_src_len + max_tgt_len) <= data.max_tokens`` (padded tokens of the whole
global batch). Each rank takes its contiguous slice of every global batch, so every rank sees the
same number of batches. A batch is a dict::

    src      (B, S) long  source pieces + eos, right-padded with pad_id
    tgt_in   (B, T) long  bos + target pieces (decoder input)
    tgt_out  (B, T) long  target pieces + eos (labels; pad_id where padded)
    ntokens  int          non-pad target tokens of this rank's slice
    global_ntokens int    non-pad target tokens of the whole global batch (normalize the summed
                          loss by this and multiply by world_size, then DDP's mean gives exactly the
                          single-process gradient)
    nsentences int        pairs in this rank's slice

:func:`evaluate_translation` decodes a split (sharded across ranks, gathered) and scores it with
sacrebleu (BLEU and chrF on detokenized text).
"""
from __future__ import annotations

import io
import json
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from . import DataBundle, register_dataset

__all__ = [
    "PAD_ID", "BOS_ID", "EOS_ID", "UNK_ID", "DING_DEFAULT_PATH",
    "parse_ding_line", "read_ding", "split_pairs", "read_parallel",
    "SpmTokenizer", "SymbolTokenizer", "train_sentencepiece",
    "TranslationSplit", "TokenBatchLoader", "TranslationBundle", "evaluate_translation",
]

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
DING_DEFAULT_PATH = "/usr/share/trans/de-en"
_DING_INSTALL = "apt-get install -y trans-de-en"

# ------------------------------------------------------------------------------------------------
# data.extra options per data set: defaults (one-line meaning each) and a typed reader
# ------------------------------------------------------------------------------------------------

_COMMON_EXTRA = {
    "spm_model": "",  # an existing sentencepiece model to use instead of training one ('' = train)
    "spm_max_sentences": 2_000_000,  # train sentencepiece on at most this many sentences (seeded sample)
    "spm_wait_s": 600,  # seconds other ranks wait for rank 0's spm.model when no process group exists
    "max_sentences": 0,  # cap on pairs per global batch (0: only data.max_tokens limits)
}
_EVAL_EXTRA = {  # read by the trainer's final evaluation (dist_sparse/tasks.py), valid for every data set
    "bleu_at_end": True,  # decode the bleu_split with beam search at the end of training, report BLEU/chrF
    "bleu_split": "test",  # split decoded at the end (val or test)
    "bleu_limit": 0,  # decode only the first N sentences of that split (0: all)
    "beam_size": 4,  # beam size of the final decoding (1: greedy)
}
_COMMON_EXTRA.update(_EVAL_EXTRA)
_DING_EXTRA = {
    "direction": "de-en",  # de-en (German source) or en-de
    "sentences_only": True,  # keep only sentence pairs (false: also words and phrases, ~390k pairs)
    "min_words": 4,  # sentence filter: at least this many German words
    "valid_size": 800,  # pairs held out for validation
    "test_size": 900,  # pairs held out for the test set
    "train_size": 0,  # cap on training pairs (0: all the remaining pairs)
    "split_seed": 0,  # seed of the fixed split (independent of run.seed, so the test set never moves)
}
_PARALLEL_EXTRA = {
    "train_src": "", "train_tgt": "",  # aligned plain-text files (one segment per line), training split
    "valid_src": "", "valid_tgt": "",  # aligned plain-text files, validation split
    "test_src": "", "test_tgt": "",  # aligned plain-text files, test split (optional)
    "train": "", "valid": "", "test": "",  # one .tsv or .jsonl file per split (instead of *_src/*_tgt)
    "src_col": 0, "tgt_col": 1,  # TSV: column index of the source and of the target
    "src_key": "src", "tgt_key": "tgt",  # JSONL: keys of source and target (or use a translation object)
    "hf_dir": "",  # a datasets.save_to_disk directory (DatasetDict) with a `translation` column
    "src_lang": "", "tgt_lang": "",  # language codes inside `translation` (hf_dir and JSONL)
    "train_split": "train", "valid_split": "validation", "test_split": "test",  # hf_dir split names
}
_SYNTH_EXTRA = {
    "num_train": 2000,  # synthetic training sequences
    "num_valid": 200,  # synthetic validation sequences
    "num_test": 200,  # synthetic test sequences
    "min_len": 2,  # shortest sequence (symbols)
    "max_len": 10,  # longest sequence (symbols; must be <= data.max_len)
    "data_seed": 0,  # seed of the generated sequences (independent of run.seed)
}


def _extra_options(cfg, defaults: dict) -> dict:
    """``cfg.data.extra`` merged over ``defaults``; unknown keys and wrong types raise ConfigError."""
    out = dict(defaults)
    for key, value in (cfg.data.extra or {}).items():
        full = f"data.extra.{key}"
        if key not in defaults:
            raise ConfigError(full, value, f"a known key for data.name={cfg.data.name}: " + ", ".join(defaults))
        want = type(defaults[key])
        if want is bool:
            ok = isinstance(value, bool)
        elif want is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, want)
        if not ok:
            raise ConfigError(full, value, {bool: "true/false", int: "an integer", str: "a string"}[want])
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------------
# Ding dictionary (trans-de-en): `German alt1 | alt2 :: English alt1 | alt2`
# ------------------------------------------------------------------------------------------------

_ANNOTATION = re.compile(r"\{[^}]*\}|\[[^\]]*\]")  # {m}, {adj}, [ugs.], [prov.] ...
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,!?;:])")


def _clean_ding(text: str) -> str:
    text = _ANNOTATION.sub(" ", text)
    text = _SPACES.sub(" ", text)
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text).strip()


def parse_ding_line(line: str) -> list[tuple[str, str]]:
    """Aligned (German, English) sub-entries of one Ding line, annotations removed.

    Args:
        line: one line of the dictionary, e.g. ``"Haus {n} | Häuser {pl} :: house | houses"``.

    Returns:
        ``[("Haus", "house"), ("Häuser", "houses")]``; an empty list for comments (``#``), lines
        without `` :: `` and lines whose two sides have a different number of `` | `` alternatives
        (their alignment is unknown).
    """
    if line.startswith("#") or " :: " not in line:
        return []
    de, en = line.rstrip("\r\n").split(" :: ", 1)
    de_alts, en_alts = de.split(" | "), en.split(" | ")
    if len(de_alts) != len(en_alts):
        return []
    return [(_clean_ding(d), _clean_ding(e)) for d, e in zip(de_alts, en_alts)]


def _is_sentence(de: str, en: str, min_words: int) -> bool:
    # A synonym list (`;`) is not one sentence; a sentence ends with . ? or ! on both sides.
    return (";" not in de and ";" not in en and len(de.split()) >= min_words
            and de[-1:] in ".?!" and en[-1:] in ".?!")


def read_ding(path: str = DING_DEFAULT_PATH, *, sentences_only: bool = True,
              min_words: int = 4) -> list[tuple[str, str]]:
    """Read (German, English) pairs from a Ding dictionary file, de-duplicated, in file order.

    Args:
        path: the dictionary file (``/usr/share/trans/de-en`` from ``apt-get install trans-de-en``).
        sentences_only: keep only sentence pairs: no ``;`` synonym list on either side, at least
            ``min_words`` German words, both sides end with ``.``, ``?`` or ``!``. When false every
            aligned sub-entry is kept, reduced to its first synonym on each side.
        min_words: minimum number of German words of a sentence.

    Returns:
        list of (German, English) string pairs; each distinct pair once (first occurrence).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Ding dictionary not found at {path}; install it with "
                                f"`{_DING_INSTALL}` or set data.root to a copy of the file")
    seen: set[tuple[str, str]] = set()
    out: list[tuple[str, str]] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            # Cheap pre-filter: a sentence line has sentence punctuation somewhere.
            if sentences_only and not ("." in line or "?" in line or "!" in line):
                continue
            for de, en in parse_ding_line(line):
                if sentences_only:
                    if not _is_sentence(de, en, min_words):
                        continue
                else:
                    de, en = de.split(";")[0].strip(), en.split(";")[0].strip()
                if not de or not en or (de, en) in seen:
                    continue
                seen.add((de, en))
                out.append((de, en))
    return out


def split_pairs(pairs: Sequence[Any], *, valid_size: int, test_size: int, train_size: int = 0,
                seed: int = 0) -> dict[str, list]:
    """A fixed seeded train/valid/test split.

    The pairs are shuffled with ``random.Random(seed)``; the first ``test_size`` form the test set,
    the next ``valid_size`` the validation set, and the rest (capped at ``train_size`` when > 0) the
    training set. Taking test first keeps the test set fixed when the other sizes change.

    Args:
        pairs: the items to split.
        valid_size, test_size: sizes of the held-out sets.
        train_size: cap on the training set (0: all the rest).
        seed: shuffle seed.

    Returns:
        ``{"train": [...], "valid": [...], "test": [...]}``.
    """
    if valid_size + test_size >= len(pairs):
        raise ConfigError("data.extra.valid_size", valid_size,
                          f"valid_size + test_size ({valid_size} + {test_size}) below the {len(pairs)} pairs")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    test, valid, train = (order[:test_size], order[test_size:test_size + valid_size],
                          order[test_size + valid_size:])
    if train_size > 0:
        train = train[:train_size]
    return {name: [pairs[i] for i in idx] for name, idx in (("train", train), ("valid", valid), ("test", test))}


# ------------------------------------------------------------------------------------------------
# Parallel text readers
# ------------------------------------------------------------------------------------------------


def _read_lines(path: str, key: str) -> list[str]:
    if not os.path.isfile(path):
        raise ConfigError(key, path, "an existing text file")
    with open(path, encoding="utf-8") as fh:
        return [line.rstrip("\r\n") for line in fh]


def _pairs_from_record(rec: dict, src_key: str, tgt_key: str, src_lang: str, tgt_lang: str, where: str):
    if isinstance(rec.get("translation"), dict):
        tr = rec["translation"]
        if src_lang not in tr or tgt_lang not in tr:
            raise ConfigError("data.extra.src_lang", src_lang,
                              f"language codes present in the translation column of {where} "
                              f"({', '.join(map(str, tr))}); set data.extra.src_lang and tgt_lang")
        return tr[src_lang], tr[tgt_lang]
    if src_key not in rec or tgt_key not in rec:
        raise ConfigError("data.extra.src_key", src_key,
                          f"keys present in the records of {where} ({', '.join(map(str, rec))}); "
                          "set data.extra.src_key and tgt_key, or give a translation object")
    return rec[src_key], rec[tgt_key]


def read_parallel(opts: dict, split: str, root: str = "") -> tuple[list[str], list[str]] | None:
    """Source and target segments of one split of a ``parallel_text`` data set.

    Args:
        opts: the ``data.extra`` options (see ``_PARALLEL_EXTRA``): plain ``<split>_src`` and
            ``<split>_tgt`` files, or one ``<split>`` file ending in ``.tsv`` or ``.jsonl``, or
            ``hf_dir`` (a ``datasets.save_to_disk`` directory).
        split: "train", "valid" or "test".
        root: directory that relative paths are resolved against ('' = working directory).

    Returns:
        (sources, targets), aligned; None when the split is not configured.
    """

    def resolve(p: str) -> str:
        return p if not p or os.path.isabs(p) or not root else os.path.join(root, p)

    if opts["hf_dir"]:
        return _read_hf(resolve(opts["hf_dir"]), opts, split)
    src_file, tgt_file, one = (resolve(opts[f"{split}_src"]), resolve(opts[f"{split}_tgt"]),
                               resolve(opts[split]))
    if src_file or tgt_file:
        if not (src_file and tgt_file):
            missing = f"{split}_tgt" if src_file else f"{split}_src"
            raise ConfigError(f"data.extra.{missing}", "", f"a file aligned with data.extra.{split}_"
                              + ("src" if src_file else "tgt"))
        src = _read_lines(src_file, f"data.extra.{split}_src")
        tgt = _read_lines(tgt_file, f"data.extra.{split}_tgt")
        if len(src) != len(tgt):
            raise ConfigError(f"data.extra.{split}_tgt", tgt_file,
                              f"a file with as many lines as {src_file} ({len(src)}), found {len(tgt)}")
        return src, tgt
    if not one:
        return None
    if one.endswith(".tsv"):
        src, tgt = [], []
        hi = max(opts["src_col"], opts["tgt_col"])
        for n, line in enumerate(_read_lines(one, f"data.extra.{split}"), 1):
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) <= hi:
                raise ConfigError(f"data.extra.{split}", one, f"a TSV whose lines have at least {hi + 1} "
                                  f"tab-separated columns (line {n} has {len(cols)})")
            src.append(cols[opts["src_col"]])
            tgt.append(cols[opts["tgt_col"]])
        return src, tgt
    if one.endswith(".jsonl"):
        src, tgt = [], []
        for n, line in enumerate(_read_lines(one, f"data.extra.{split}"), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"data.extra.{split}", one, f"JSON lines (line {n}: {err.msg})") from None
            s, t = _pairs_from_record(rec, opts["src_key"], opts["tgt_key"], opts["src_lang"],
                                      opts["tgt_lang"], f"{one}:{n}")
            src.append(s)
            tgt.append(t)
        return src, tgt
    raise ConfigError(f"data.extra.{split}", one, "a file ending in .tsv or .jsonl (or use "
                      f"{split}_src/{split}_tgt for plain text)")


def _read_hf(path: str, opts: dict, split: str) -> tuple[list[str], list[str]] | None:
    from datasets import DatasetDict, load_from_disk

    if not os.path.isdir(path):
        raise ConfigError("data.extra.hf_dir", path, "a directory written by datasets' save_to_disk")
    ds = load_from_disk(path)
    name = opts[f"{split}_split"]
    if not isinstance(ds, DatasetDict):
        raise ConfigError("data.extra.hf_dir", path, "a DatasetDict with train/validation splits")
    if name not in ds:
        if split == "test":
            return None
        raise ConfigError(f"data.extra.{split}_split", name, "one of the splits in "
                          f"{path}: " + ", ".join(ds.keys()))
    part = ds[name]
    if "translation" not in part.column_names:
        raise ConfigError("data.extra.hf_dir", path, "a data set with a `translation` column "
                          f"(found {', '.join(part.column_names)})")
    src, tgt = [], []
    for rec in part["translation"]:
        s, t = _pairs_from_record({"translation": rec}, "", "", opts["src_lang"], opts["tgt_lang"],
                                  f"{path}[{name}]")
        src.append(s)
        tgt.append(t)
    return src, tgt


# ------------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------------


class SymbolTokenizer:
    """The synthetic tasks' vocabulary: a text is space-separated decimal symbol ids (>= 4).

    Args:
        vocab_size: ids 0..3 are pad/bos/eos/unk, symbols are 4..vocab_size-1.
    """

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.path = ""

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text (unknown or out-of-range symbols become unk)."""
        out = []
        for text in texts:
            ids = []
            for tok in text.split():
                i = int(tok) if tok.isdigit() else UNK_ID
                ids.append(i if 4 <= i < self.vocab_size else UNK_ID)
            out.append(ids)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Text of one id list (special ids dropped)."""
        return " ".join(str(int(i)) for i in ids if int(i) >= 4)


class SpmTokenizer:
    """A sentencepiece model with pad 0, bos 1, eos 2, unk 3.

    Args:
        model_proto: the serialized model (bytes).
        path: where it is stored (reported in ``info["spm_path"]``).
    """

    def __init__(self, model_proto: bytes, path: str = ""):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(model_proto)
        self.path = path
        self.vocab_size = int(self.sp.get_piece_size())
        got = (self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id())
        if got != (PAD_ID, BOS_ID, EOS_ID, UNK_ID):
            raise ConfigError("data.extra.spm_model", path or "<model>",
                              f"a sentencepiece model with pad/bos/eos/unk ids 0/1/2/3 (it has {got})")

    @classmethod
    def load(cls, path: str) -> "SpmTokenizer":
        """Read a ``.model`` file."""
        with open(path, "rb") as fh:
            return cls(fh.read(), path)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Piece ids of each text (no bos/eos)."""
        return self.sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        """Detokenized text of one id list (pad/bos/eos dropped)."""
        return self.sp.decode([int(i) for i in ids if int(i) > EOS_ID])


def train_sentencepiece(texts: Sequence[str], vocab_size: int, *, max_sentences: int = 2_000_000,
                        seed: int = 0) -> bytes:
    """Train a unigram sentencepiece model with ids pad 0, bos 1, eos 2, unk 3.

    Args:
        texts: training sentences (source and target together for a joint vocabulary).
        vocab_size: requested vocabulary size; a smaller one is produced when the text is too small
            to support it (``hard_vocab_limit=False``), so read the size back from the model.
        max_sentences: train on a seeded sample of at most this many sentences.
        seed: seed of that sample.

    Returns:
        the serialized model (write it to ``*.model``).
    """
    import sentencepiece as spm

    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("train_sentencepiece: no non-empty training sentences")
    if len(texts) > max_sentences:
        texts = random.Random(seed).sample(texts, max_sentences)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, model_type="unigram", vocab_size=vocab_size,
        hard_vocab_limit=False, character_coverage=1.0, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        unk_id=UNK_ID, pad_piece="<pad>", input_sentence_size=0, num_threads=1, minloglevel=2)
    return buf.getvalue()


def _dist_ready(world_size: int) -> bool:
    return (world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() == world_size)


def _shared_spm(cfg, opts: dict, train_texts: Sequence[str], *, rank: int, world_size: int,
                run_dir: str) -> SpmTokenizer:
    """Rank 0 trains (or reuses) ``run_dir/spm.model``; every rank gets the same model.

    With a process group the model bytes are broadcast (works without a shared file system);
    without one the other ranks poll for the file (written atomically) for ``spm_wait_s`` seconds.
    """
    if opts["spm_model"]:
        if not os.path.isfile(opts["spm_model"]):
            raise ConfigError("data.extra.spm_model", opts["spm_model"], "an existing sentencepiece .model file")
        return SpmTokenizer.load(opts["spm_model"])
    path = os.path.join(run_dir, "spm.model")
    meta_path = os.path.join(run_dir, "spm.json")
    proto = None
    if rank == 0:
        if os.path.isfile(path):
            if os.path.isfile(meta_path):
                with open(meta_path, encoding="utf-8") as fh:
                    meta = json.load(fh)
                if meta.get("requested_vocab_size") != cfg.data.vocab_size:
                    raise ConfigError("data.vocab_size", cfg.data.vocab_size,
                                      f"the size {meta.get('requested_vocab_size')} that {path} was trained "
                                      "with (delete it, or use a new run.name, to train a new one)")
            with open(path, "rb") as fh:
                proto = fh.read()
        else:
            t0 = time.time()
            proto = train_sentencepiece(train_texts, cfg.data.vocab_size,
                                        max_sentences=opts["spm_max_sentences"], seed=cfg.run.seed)
            os.makedirs(run_dir, exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "wb") as fh:
                fh.write(proto)
            with open(meta_path, "w", encoding="utf-8") as fh:
                json.dump({"requested_vocab_size": cfg.data.vocab_size, "train_sentences": len(train_texts),
                           "seconds": round(time.time() - t0, 2)}, fh)
            os.replace(tmp, path)  # atomic: a polling rank never reads half a file
    if _dist_ready(world_size):
        from ..distributed import broadcast_object

        proto = broadcast_object(proto, src=0)
    elif rank != 0:
        deadline = time.time() + opts["spm_wait_s"]
        while not os.path.isfile(path):
            if time.time() > deadline:
                raise TimeoutError(f"rank {rank}: {path} did not appear within {opts['spm_wait_s']} s "
                                   "(did rank 0 fail? raise data.extra.spm_wait_s for big corpora)")
            time.sleep(0.2)
        with open(path, "rb") as fh:
            proto = fh.read()
    return SpmTokenizer(proto, path)


# ------------------------------------------------------------------------------------------------
# Encoded splits and the token-bucketed loader
# ------------------------------------------------------------------------------------------------


def _pack(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


@dataclass
class TranslationSplit:
    """One split: raw text (for references) and piece ids stored flat (memory-light for big corpora).

    ``src(i)`` / ``tgt(i)`` are the piece ids of pair i without bos/eos.
    """

    name: str
    src_text: list[str]
    tgt_text: list[str]
    src_flat: np.ndarray
    src_off: np.ndarray
    tgt_flat: np.ndarray
    tgt_off: np.ndarray

    def __len__(self) -> int:
        return len(self.src_text)

    def src(self, i: int) -> np.ndarray:
        return self.src_flat[self.src_off[i]:self.src_off[i + 1]]

    def tgt(self, i: int) -> np.ndarray:
        return self.tgt_flat[self.tgt_off[i]:self.tgt_off[i + 1]]

    @property
    def src_lens(self) -> np.ndarray:  # pieces, without eos
        return np.diff(self.src_off)

    @property
    def tgt_lens(self) -> np.ndarray:  # pieces, without bos/eos
        return np.diff(self.tgt_off)


def _encode_split(name: str, src: list[str], tgt: list[str], tok, max_len: int, *, drop_long: bool,
                  chunk: int = 100_000) -> tuple[TranslationSplit, dict]:
    """Encode a split; drop empty pairs; drop (train) or truncate (eval) pairs over max_len pieces."""
    keep_src, keep_tgt, src_ids, tgt_ids = [], [], [], []
    empty = long = 0
    for lo in range(0, len(src), chunk):
        s_txt, t_txt = src[lo:lo + chunk], tgt[lo:lo + chunk]
        for s, t, si, ti in zip(s_txt, t_txt, tok.encode(s_txt), tok.encode(t_txt)):
            if not si or not ti:
                empty += 1
                continue
            if len(si) > max_len or len(ti) > max_len:
                long += 1
                if drop_long:
                    continue
                si, ti = si[:max_len], ti[:max_len]
            keep_src.append(s)
            keep_tgt.append(t)
            src_ids.append(si)
            tgt_ids.append(ti)
    sf, so = _pack(src_ids)
    tf, to = _pack(tgt_ids)
    stats = {f"{name}_pairs": len(keep_src), f"{name}_dropped_empty": empty,
             f"{name}_{'dropped' if drop_long else 'truncated'}_long": long}
    return TranslationSplit(name, keep_src, keep_tgt, sf, so, tf, to), stats


class TokenBatchLoader:
    """Token-bucketed global batches, each sliced across ranks; resumable per (epoch, batch).

    Args:
        split: the encoded split.
        max_tokens: padded source + target tokens allowed per GLOBAL batch
            (``len(batch) * (max src len + max tgt len)``, counting eos/bos).
        rank, world_size: this process and the number of processes.
        device: where the batch tensors go.
        seed: with the epoch, seeds the shuffle (identical on all ranks).
        shuffle: shuffle pairs among equal lengths and the order of batches (training); when false
            the batches follow length order and are the same every epoch (validation).
        max_sentences: cap on pairs per global batch (0: none).
        drop_last_short: drop a final group of fewer than ``world_size`` long pairs that cannot be
            merged (training); when false they join the previous batch even if it then exceeds
            ``max_tokens`` (evaluation must see every pair).
    """

    def __init__(self, split: TranslationSplit, *, max_tokens: int, rank: int, world_size: int, device,
                 seed: int = 0, shuffle: bool = True, max_sentences: int = 0, drop_last_short: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.split, self.max_tokens, self.rank, self.world_size = split, max_tokens, rank, world_size
        self.device, self.seed, self.shuffle = device, seed, shuffle
        self.max_sentences, self.drop_last_short = max_sentences, drop_last_short
        self.src_len = split.src_lens + 1  # + eos
        self.tgt_len = split.tgt_lens + 1  # + bos (tgt_in) / eos (tgt_out)
        if len(split) < world_size:
            raise ConfigError("run.num_processes", world_size,
                              f"at most {len(split)} processes: the {split.name} split has {len(split)} pairs")
        need = world_size * int(self.src_len.max() + self.tgt_len.max())
        if need > max_tokens:
            raise ConfigError("data.max_tokens", max_tokens,
                              f"an integer >= {need} so that every one of the {world_size} processes gets "
                              f"at least one of the longest {split.name} pairs (or lower data.max_len)")
        if 0 < max_sentences < world_size:
            raise ConfigError("data.extra.max_sentences", max_sentences, f"0 or >= the {world_size} processes")
        self._num_batches = len(self.global_batches(0))

    def __len__(self) -> int:
        return self._num_batches

    def _cost(self, idx: Sequence[int]) -> int:
        return len(idx) * int(self.src_len[idx].max() + self.tgt_len[idx].max())

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """The global batches of ``epoch`` as arrays of pair indices (identical on every rank).

        Args:
            epoch: epoch index (with ``seed``, it seeds the shuffle).

        Returns:
            list of index arrays, each sorted by length, each of at least ``world_size`` pairs and
            at most ``max_tokens`` padded tokens (see ``drop_last_short`` for the one exception).
        """
        n = len(self.split)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(n)
        else:
            rng, perm = None, np.arange(n)
        # Stable sort by (source, target) length: the length sequence (hence the packing and the number
        # of batches) is the same every epoch; only which pair fills which slot changes.
        order = perm[np.lexsort((self.tgt_len[perm], self.src_len[perm]))]
        batches: list[list[int]] = []
        cur: list[int] = []
        max_s = max_t = 0
        for i in order.tolist():
            s, t = max(max_s, int(self.src_len[i])), max(max_t, int(self.tgt_len[i]))
            full = (len(cur) + 1) * (s + t) > self.max_tokens or (
                self.max_sentences and len(cur) >= self.max_sentences)
            if cur and full:
                batches.append(cur)
                cur, s, t = [], int(self.src_len[i]), int(self.tgt_len[i])
            cur.append(i)
            max_s, max_t = s, t
        if cur:
            batches.append(cur)
        w = self.world_size
        if len(batches[-1]) < w:
            # Every rank needs a non-empty slice. Fold the short tail into the previous batch, or
            # borrow shorter pairs from it, or (training) drop it.
            tail = batches.pop()
            prev = batches.pop() if batches else []
            merged = prev + tail
            if prev and self._cost(merged) <= self.max_tokens and (
                    not self.max_sentences or len(merged) <= self.max_sentences):
                batches.append(merged)
            elif len(merged) >= 2 * w:
                batches += [merged[: len(merged) - w], merged[len(merged) - w:]]
            elif self.drop_last_short and prev:
                batches.append(prev)
            else:
                batches.append(merged)
        out = [np.asarray(b, dtype=np.int64) for b in batches]
        if rng is not None:
            out = [out[j] for j in rng.permutation(len(out))]
        return out

    def rank_slice(self, batch: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of a global batch (sizes differ by at most one)."""
        n, w, r = len(batch), self.world_size, self.rank
        lo = r * (n // w) + min(r, n % w)
        return batch[lo: lo + n // w + (1 if r < n % w else 0)]

    def collate(self, idx: np.ndarray, global_ntokens: int) -> dict:
        """Padded tensors for pair indices ``idx`` (see the module docstring for the keys)."""
        b = len(idx)
        S, T = int(self.src_len[idx].max()), int(self.tgt_len[idx].max())
        src = np.full((b, S), PAD_ID, dtype=np.int64)
        tgt_in = np.full((b, T), PAD_ID, dtype=np.int64)
        tgt_out = np.full((b, T), PAD_ID, dtype=np.int64)
        for row, i in enumerate(idx.tolist()):
            s, t = self.split.src(i), self.split.tgt(i)
            src[row, : len(s)] = s
            src[row, len(s)] = EOS_ID
            tgt_in[row, 0] = BOS_ID
            tgt_in[row, 1: len(t) + 1] = t
            tgt_out[row, : len(t)] = t
            tgt_out[row, len(t)] = EOS_ID
        dev = self.device
        return {
            "src": torch.from_numpy(src).to(dev, non_blocking=True),
            "tgt_in": torch.from_numpy(tgt_in).to(dev, non_blocking=True),
            "tgt_out": torch.from_numpy(tgt_out).to(dev, non_blocking=True),
            "ntokens": int(self.tgt_len[idx].sum()),
            "global_ntokens": int(global_ntokens),
            "nsentences": b,
        }

    def iter_from(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """This rank's batches of ``epoch`` from global batch index ``start`` on.

        Args:
            epoch: epoch index.
            start: number of batches to skip (already seen before a resume).

        Returns:
            an iterator of batch dicts on ``device``.
        """
        for batch in self.global_batches(epoch)[start:]:
            yield self.collate(self.rank_slice(batch), int(self.tgt_len[batch].sum()))

    def __iter__(self) -> Iterator[dict]:
        return self.iter_from(0)


# ------------------------------------------------------------------------------------------------
# Bundles and builders
# ------------------------------------------------------------------------------------------------


@dataclass
class TranslationBundle(DataBundle):
    """A :class:`DataBundle` that also carries what decoding and scoring need."""

    splits: dict = field(default_factory=dict)  # "train"/"val"/"test" -> TranslationSplit
    tokenizer: Any = None  # SpmTokenizer or SymbolTokenizer (decode ids to text)
    device: Any = None  # where batches (and decoder inputs) go
    rank: int = 0  # this process
    world_size: int = 1  # number of processes


def _make_bundle(cfg, raw: dict[str, tuple[list[str], list[str]]], tok, *, rank: int, world_size: int,
                 device, run_dir: str, opts: dict, info: dict) -> TranslationBundle:
    d = cfg.data
    src, tgt = raw["train"]
    if d.train_subset:
        src, tgt = src[: d.train_subset], tgt[: d.train_subset]
    raw = dict(raw, train=(src, tgt))
    if d.val_subset:
        raw["valid"] = tuple(x[: d.val_subset] for x in raw["valid"])
    if tok is None:
        tok = _shared_spm(cfg, opts, list(src) + list(tgt), rank=rank, world_size=world_size, run_dir=run_dir)
    splits, stats = {}, {}
    for name, key, drop in (("train", "train", True), ("val", "valid", False), ("test", "test", False)):
        if raw.get(key) is None:
            continue
        splits[name], st = _encode_split(name, list(raw[key][0]), list(raw[key][1]), tok, d.max_len,
                                         drop_long=drop)
        stats.update(st)
    if len(splits["train"]) == 0:
        raise ConfigError("data.max_len", d.max_len, "a length that keeps some training pairs (all were "
                          "dropped as empty or too long)")
    loader_kw = dict(max_tokens=d.max_tokens, rank=rank, world_size=world_size, device=device,
                     seed=cfg.run.seed, max_sentences=opts.get("max_sentences", 0))
    train = TokenBatchLoader(splits["train"], shuffle=True, drop_last_short=True, **loader_kw)
    val = TokenBatchLoader(splits["val"], shuffle=False, drop_last_short=False, **loader_kw)
    info = dict(info, vocab_size=tok.vocab_size, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
                spm_path=tok.path, max_len=d.max_len, max_seq_len=d.max_len + 1,
                eval_splits=sorted(splits), train_batches=len(train), val_batches=len(val), **stats)
    return TranslationBundle(task="translation", train=train, val=val, info=info, splits=splits, tokenizer=tok,
                             device=device, rank=rank, world_size=world_size)


def ding_path(cfg) -> str:
    """Where the Ding file is: ``data.root`` (the file or a directory holding ``de-en``), else
    ``$DIST_SPARSE_DATA/de-en``, else ``/usr/share/trans/de-en``."""
    root = cfg.data.root or (os.path.join(os.environ["DIST_SPARSE_DATA"], "de-en")
                             if os.environ.get("DIST_SPARSE_DATA") else DING_DEFAULT_PATH)
    path = os.path.join(root, "de-en") if os.path.isdir(root) else root
    if not os.path.isfile(path):
        key = "data.root" if cfg.data.root else ("$DIST_SPARSE_DATA" if os.environ.get("DIST_SPARSE_DATA")
                                                 else "data.root (default)")
        raise ConfigError(key, path, f"the Ding dictionary file; install it with `{_DING_INSTALL}` "
                          f"(it lands in {DING_DEFAULT_PATH}) or point data.root at a copy")
    return path


@register_dataset("ding_de_en", task="translation")
def build_ding_de_en(cfg, *, rank: int, world_size: int, device, run_dir: str) -> TranslationBundle:
    """German-English sentence pairs from the Ding dictionary, fixed seeded split (docs/translation.md).

    Args:
        cfg: the full config (``data.extra`` keys: see ``_DING_EXTRA`` and ``_COMMON_EXTRA``).
        rank, world_size: this process and the number of processes.
        device: where batches go.
        run_dir: the run directory (``spm.model`` is trained into it).

    Returns:
        a :class:`TranslationBundle` with splits train, val and test.
    """
    opts = _extra_options(cfg, {**_DING_EXTRA, **_COMMON_EXTRA})
    if opts["direction"] not in ("de-en", "en-de"):
        raise ConfigError("data.extra.direction", opts["direction"], "de-en or en-de")
    path = ding_path(cfg)
    pairs = read_ding(path, sentences_only=opts["sentences_only"], min_words=opts["min_words"])
    parts = split_pairs(pairs, valid_size=opts["valid_size"], test_size=opts["test_size"],
                        train_size=opts["train_size"], seed=opts["split_seed"])
    flip = opts["direction"] == "en-de"
    raw = {k: ([p[1 if flip else 0] for p in v], [p[0 if flip else 1] for p in v]) for k, v in parts.items()}
    src_lang, tgt_lang = opts["direction"].split("-")
    info = {"data_path": path, "src_lang": src_lang, "tgt_lang": tgt_lang, "corpus_pairs": len(pairs)}
    return _make_bundle(cfg, raw, None, rank=rank, world_size=world_size, device=device, run_dir=run_dir,
                        opts=opts, info=info)


@register_dataset("parallel_text", task="translation")
def build_parallel_text(cfg, *, rank: int, world_size: int, device, run_dir: str) -> TranslationBundle:
    """Your own parallel corpus: plain aligned files, TSV, JSONL or a ``datasets`` directory.

    Args:
        cfg: the full config; ``data.extra`` names the files (see ``_PARALLEL_EXTRA``); relative
            paths are resolved against ``data.root``, else ``$DIST_SPARSE_DATA``.
        rank, world_size, device, run_dir: as for every builder.

    Returns:
        a :class:`TranslationBundle` with splits train, val and (when given) test.
    """
    opts = _extra_options(cfg, {**_PARALLEL_EXTRA, **_COMMON_EXTRA})
    root = cfg.data.root if os.path.isdir(cfg.data.root or "") else os.environ.get("DIST_SPARSE_DATA", "")
    raw = {split: read_parallel(opts, split, root) for split in ("train", "valid", "test")}
    for split, key in (("train", "train_src"), ("valid", "valid_src")):
        if raw[split] is None:
            raise ConfigError(f"data.extra.{key}", "", f"the {split} data: data.extra.{split}_src + "
                              f"{split}_tgt, data.extra.{split} (.tsv/.jsonl) or data.extra.hf_dir")
    info = {"src_lang": opts["src_lang"], "tgt_lang": opts["tgt_lang"]}
    return _make_bundle(cfg, raw, None, rank=rank, world_size=world_size, device=device, run_dir=run_dir,
                        opts=opts, info=info)


def synthetic_pairs(task: str, n: int, *, vocab_size: int, min_len: int, max_len: int,
                    seed: int) -> tuple[list[str], list[str]]:
    """Seeded copy/reverse pairs as symbol texts.

    Args:
        task: "copy" (target = source) or "reverse" (target = reversed source).
        n: number of pairs.
        vocab_size: symbols are 4..vocab_size-1.
        min_len, max_len: sequence length range (inclusive).
        seed: generator seed.

    Returns:
        (sources, targets) as space-separated symbol ids.
    """
    rng = random.Random(seed)
    src, tgt = [], []
    for _ in range(n):
        seq = [rng.randrange(4, vocab_size) for _ in range(rng.randint(min_len, max_len))]
        out = seq if task == "copy" else seq[::-1]
        src.append(" ".join(map(str, seq)))
        tgt.append(" ".join(map(str, out)))
    return src, tgt


def _build_synthetic(task: str, cfg, *, rank: int, world_size: int, device, run_dir: str) -> TranslationBundle:
    opts = _extra_options(cfg, {**_SYNTH_EXTRA, "max_sentences": _COMMON_EXTRA["max_sentences"], **_EVAL_EXTRA})
    if not 1 <= opts["min_len"] <= opts["max_len"] <= cfg.data.max_len:
        raise ConfigError("data.extra.max_len", opts["max_len"],
                          f"min_len ({opts['min_len']}) <= max_len <= data.max_len ({cfg.data.max_len})")
    for key in ("num_train", "num_valid"):
        if opts[key] < 1:
            raise ConfigError(f"data.extra.{key}", opts[key], "an integer >= 1")
    kw = dict(vocab_size=cfg.data.vocab_size, min_len=opts["min_len"], max_len=opts["max_len"])
    # Distinct seeds per split, derived from one data seed.
    raw = {split: synthetic_pairs(task, opts[f"num_{split}"], seed=opts["data_seed"] * 3 + j, **kw)
           for j, split in enumerate(("train", "valid", "test")) if opts[f"num_{split}"] > 0}
    info = {"src_lang": "sym", "tgt_lang": "sym", "synthetic_task": task}
    return _make_bundle(cfg, raw, SymbolTokenizer(cfg.data.vocab_size), rank=rank, world_size=world_size,
                        device=device, run_dir=run_dir, opts=opts, info=info)


@register_dataset("copy", task="translation")
def build_copy(cfg, *, rank: int, world_size: int, device, run_dir: str) -> TranslationBundle:
    """Synthetic copy task (target = source); ``data.extra`` keys in ``_SYNTH_EXTRA``."""
    return _build_synthetic("copy", cfg, rank=rank, world_size=world_size, device=device, run_dir=run_dir)


@register_dataset("reverse", task="translation")
def build_reverse(cfg, *, rank: int, world_size: int, device, run_dir: str) -> TranslationBundle:
    """Synthetic reverse task (target = reversed source); ``data.extra`` keys in ``_SYNTH_EXTRA``."""
    return _build_synthetic("reverse", cfg, rank=rank, world_size=world_size, device=device, run_dir=run_dir)


# ------------------------------------------------------------------------------------------------
# Evaluation: decode, gather, detokenize, score
# ------------------------------------------------------------------------------------------------


def _strip_specials(ids: Sequence[int]) -> list[int]:
    out = []
    for i in ids:
        i = int(i)
        if i == EOS_ID:
            break
        if i not in (PAD_ID, BOS_ID):
            out.append(i)
    return out


@torch.no_grad()
def evaluate_translation(model, bundle: TranslationBundle, split: str = "val", beam_size: int = 4,
                         max_len_a: float = 1.2, max_len_b: int = 10, out_path: str | None = None,
                         limit: int | None = None, batch_size: int = 64, length_penalty: float = 0.6) -> dict:
    """Decode a split, gather the hypotheses from all ranks and score them with sacrebleu.

    Every rank must call this (it gathers). Sentences are sorted by source length, cut into batches
    of ``batch_size`` and the batches are dealt round-robin to the ranks; the model is unwrapped
    from DDP/DeepSpeed first and put in eval mode (its mode is restored afterwards). Under FSDP,
    call it on a model whose full parameters are present on every rank.

    Args:
        model: exposes ``greedy(src, max_len)`` and ``beam_search(src, beam_size, max_len,
            length_penalty)``, both returning lists of token-id lists without BOS/EOS.
        bundle: the :class:`TranslationBundle` from the data builder.
        split: "val" or "test" (``bundle.splits``).
        beam_size: 1 decodes greedily.
        max_len_a, max_len_b: hypotheses are at most ``int(a * S + b)`` tokens, EOS included, with
            ``S`` the padded source length of the batch (pieces + eos); clamped to the model's
            ``max_len`` attribute (its position table) when it has one.
        out_path: when given, rank 0 writes one detokenized hypothesis per line there.
        limit: decode only the first ``limit`` pairs of the split.
        batch_size: sentences per decoding batch (per rank).
        length_penalty: passed to ``beam_search`` (GNMT alpha of the transformer; 0.6 as in GNMT).

    Returns:
        dict (the same on every rank) with ``bleu``, ``chrf``, ``bleu_signature``,
        ``chrf_signature``, ``bleu_precisions``, ``bleu_bp``, ``sys_len``, ``ref_len``,
        ``num_segments``, ``split``, ``beam_size`` and ``decode_seconds``.
    """
    from ..metrics.bleu import corpus_scores

    if split not in bundle.splits:
        raise ValueError(f"evaluate_translation: split {split!r} not in the bundle; known: "
                         + ", ".join(sorted(bundle.splits)))
    if beam_size < 1:
        raise ValueError(f"evaluate_translation: beam_size = {beam_size}; expected an integer >= 1")
    if bundle.world_size > 1 and not _dist_ready(bundle.world_size):
        raise RuntimeError("evaluate_translation: the bundle has world_size > 1 but no torch.distributed "
                           f"process group of size {bundle.world_size} is initialized")
    data: TranslationSplit = bundle.splits[split]
    n = len(data) if limit is None else min(int(limit), len(data))
    try:
        from accelerate.utils import extract_model_from_parallel

        net = extract_model_from_parallel(model)
    except ImportError:  # plain PyTorch: DDP keeps the model in .module
        net = getattr(model, "module", model)
    was_training = net.training
    net.eval()
    cap = getattr(net, "max_len", None)  # the transformer's position-table size bounds max_len
    device = bundle.device
    # Longest sources first: the slowest batches start early and padding stays small.
    src_lens = data.src_lens[:n]
    order = np.argsort(-src_lens, kind="stable")
    chunks = [order[i: i + batch_size] for i in range(0, n, batch_size)]
    mine: list[tuple[int, list[int]]] = []
    t0 = time.time()
    for chunk in chunks[bundle.rank:: bundle.world_size]:
        S = int(src_lens[chunk].max()) + 1
        src = np.full((len(chunk), S), PAD_ID, dtype=np.int64)
        for row, i in enumerate(chunk.tolist()):
            ids = data.src(i)
            src[row, : len(ids)] = ids
            src[row, len(ids)] = EOS_ID
        src_t = torch.from_numpy(src).to(device)
        max_len = int(max_len_a * S + max_len_b)
        if isinstance(cap, int) and cap > 0:
            max_len = min(max_len, cap)
        if beam_size == 1:
            hyps = net.greedy(src_t, max_len)
        else:
            hyps = net.beam_search(src_t, beam_size, max_len, length_penalty)
        mine.extend((int(i), _strip_specials(h)) for i, h in zip(chunk.tolist(), hyps))
    seconds = time.time() - t0
    if was_training:
        net.train()
    if bundle.world_size > 1:
        parts: list = [None] * bundle.world_size
        # (NCCL moves the pickles through the current CUDA device, which the trainer has set.)
        torch.distributed.all_gather_object(parts, (mine, seconds))
        mine = [pair for part, _ in parts for pair in part]
        seconds = max(s for _, s in parts)
    by_index = dict(mine)
    if len(by_index) != n:
        raise RuntimeError(f"evaluate_translation: gathered {len(by_index)} hypotheses for {n} sentences")
    hyps_text = [bundle.tokenizer.decode(by_index[i]) for i in range(n)]
    scores = corpus_scores(hyps_text, data.tgt_text[:n])
    if out_path and bundle.rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w", encoding="utf-8") as fh:
            fh.writelines(h.replace("\n", " ") + "\n" for h in hyps_text)
    scores.update(split=split, beam_size=beam_size, decode_seconds=round(seconds, 3))
    return scores
