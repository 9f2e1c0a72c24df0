"""Translation data (dist_sparse.data.translation): Ding parser, splits, sentencepiece, parallel-text
formats, token-bucketed rank-sliced batches, and evaluate_translation (1 and 2 gloo processes)."""
import json
import os
import socket

import numpy as np
import pytest
import torch

from dist_sparse.config import Config, ConfigError, DataConfig, RunConfig
from dist_sparse.data import build_data, dataset_names
from dist_sparse.data.translation import (BOS_ID, DING_DEFAULT_PATH, EOS_ID, PAD_ID, UNK_ID, SpmTokenizer,
                                          TokenBatchLoader, TranslationSplit, evaluate_translation,
                                          parse_ding_line, read_ding, split_pairs, train_sentencepiece)
from dist_sparse.metrics.bleu import corpus_scores

FIX = os.path.join(os.path.dirname(__file__), "..", "fixtures")
DING_FIX = os.path.join(FIX, "ding_sample.txt")


def _lines(name):
    with open(os.path.join(FIX, name), encoding="utf-8") as fh:
        return [line.rstrip("\n") for line in fh]


DE, EN = _lines("parallel_small.de"), _lines("parallel_small.en")


def make_cfg(name, run_root, *, seed=0, **data):
    """A Config without registry validation (the model registry may still be empty)."""
    return Config(run=RunConfig(seed=seed, output_dir=str(run_root), name="t"), data=DataConfig(name=name, **data))


def build(cfg, rank=0, world_size=1, run_dir=None):
    return build_data(cfg, rank=rank, world_size=world_size, device=torch.device("cpu"),
                      run_dir=run_dir or cfg.run_dir)


def copy_cfg(tmp_path, task="copy", **data):
    data.setdefault("extra", {"num_train": 300, "num_valid": 41, "num_test": 23, "min_len": 1, "max_len": 20})
    data.setdefault("vocab_size", 20)
    data.setdefault("max_tokens", 200)
    return make_cfg(task, tmp_path, **data)


# ------------------------------------------------------------------------------------------------
# Ding parser and split
# ------------------------------------------------------------------------------------------------


def test_registered_names():
    assert {"ding_de_en", "parallel_text", "copy", "reverse"} <= set(dataset_names())


def test_parse_ding_line():
    assert parse_ding_line("Haus {n} | Häuser {pl} :: house | houses\n") == [("Haus", "house"), ("Häuser", "houses")]
    assert parse_ding_line("Wir gehen jetzt ins Kino {n}. [ugs.] :: We go. [coll.]") == [
        ("Wir gehen jetzt ins Kino.", "We go.")]
    assert parse_ding_line("# Version :: devel") == []
    assert parse_ding_line("no separator here") == []
    assert parse_ding_line("a | b | c :: x | y") == []  # misaligned alternatives are skipped


def test_read_ding_fixture_sentences():
    assert read_ding(DING_FIX) == [
        ("Das Haus ist sehr alt.", "The house is very old."),
        ("Er kommt morgen nach Hause.", "He is coming home tomorrow."),
        ("Sie kommt heute nicht.", "She is not coming today."),
        ("Wo ist der Bahnhof?", "Where is the station?"),
        ("Das ist ja unglaublich!", "That is incredible!"),
        ("Wir gehen jetzt ins Kino.", "We are going to the cinema now."),
    ]
    assert len(read_ding(DING_FIX, min_words=5)) == 3


def test_read_ding_fixture_phrases():
    pairs = read_ding(DING_FIX, sentences_only=False)
    assert len(pairs) == 14  # every aligned sub-entry once; the misaligned line and the duplicate are gone
    assert ("Ich weiß es nicht", "I don't know") in pairs  # first synonym of a `;` list
    assert ("gelaufen", "run") in pairs and ("Zu kurz.", "Too short.") in pairs


def test_split_pairs_fixed_and_disjoint():
    items = list(range(100))
    a = split_pairs(items, valid_size=10, test_size=15, seed=0)
    assert [len(a[k]) for k in ("train", "valid", "test")] == [75, 10, 15]
    assert sorted(a["train"] + a["valid"] + a["test"]) == items
    assert a == split_pairs(items, valid_size=10, test_size=15, seed=0)
    b = split_pairs(items, valid_size=20, test_size=15, train_size=30, seed=0)
    assert b["test"] == a["test"] and len(b["train"]) == 30  # the test set does not move
    assert split_pairs(items, valid_size=10, test_size=15, seed=1)["test"] != a["test"]
    with pytest.raises(ConfigError, match="valid_size"):
        split_pairs(items, valid_size=50, test_size=50)


def _write_ding_file(path):
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("# Version :: test\n")
        for de, en in zip(DE, EN):
            fh.write(f"{de} :: {en}\n")


def test_ding_builder_on_a_ding_format_file(tmp_path):
    path = tmp_path / "de-en"
    _write_ding_file(path)
    extra = {"valid_size": 5, "test_size": 6, "min_words": 4}
    cfg = make_cfg("ding_de_en", tmp_path / "runs", root=str(tmp_path), vocab_size=120, max_tokens=400, extra=extra)
    b = build(cfg)
    expected = {p for p in zip(DE, EN) if len(p[0].split()) >= 4}
    assert b.info["corpus_pairs"] == len(expected) == 39  # only "Wir trinken Wasser." is too short
    sets = {k: set(zip(s.src_text, s.tgt_text)) for k, s in b.splits.items()}
    assert [len(sets[k]) for k in ("train", "val", "test")] == [28, 5, 6]
    assert sets["train"] | sets["val"] | sets["test"] == expected
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert b.info["spm_path"] == os.path.join(cfg.run_dir, "spm.model") and os.path.isfile(b.info["spm_path"])
    assert (b.info["pad_id"], b.info["bos_id"], b.info["eos_id"], b.info["unk_id"]) == (0, 1, 2, 3)
    assert b.info["src_lang"] == "de" and b.task == "translation"
    # en-de flips the direction of the same split
    cfg2 = make_cfg("ding_de_en", tmp_path / "runs2", root=str(path), vocab_size=120, max_tokens=400,
                    extra=dict(extra, direction="en-de"))
    b2 = build(cfg2)
    assert set(zip(b2.splits["test"].tgt_text, b2.splits["test"].src_text)) == sets["test"]


def test_missing_ding_names_the_install_command(tmp_path, monkeypatch):
    cfg = make_cfg("ding_de_en", tmp_path, root=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"apt-get install -y trans-de-en"):
        build(cfg)
    monkeypatch.setenv("DIST_SPARSE_DATA", str(tmp_path))
    with pytest.raises(ConfigError, match=r"\$DIST_SPARSE_DATA.*apt-get install -y trans-de-en"):
        build(make_cfg("ding_de_en", tmp_path))


def test_unknown_extra_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data.extra.valid_siz .*valid_size"):
        build(make_cfg("ding_de_en", tmp_path, root=DING_FIX, extra={"valid_siz": 3}))
    with pytest.raises(ConfigError, match=r"data.extra.num_train = 'x'.*an integer"):
        build(copy_cfg(tmp_path, extra={"num_train": "x"}))


@pytest.mark.skipif(not os.path.isfile(DING_DEFAULT_PATH), reason="trans-de-en is not installed")
def test_real_ding_file_counts_and_split():
    pairs = read_ding(DING_DEFAULT_PATH)
    assert len(pairs) == 17736  # trans-de-en 1.9-6 (Debian bookworm), documented in docs/translation.md
    parts = split_pairs(pairs, valid_size=800, test_size=900, seed=0)
    assert [len(parts[k]) for k in ("train", "valid", "test")] == [16036, 800, 900]
    sets = {k: set(v) for k, v in parts.items()}
    assert sum(len(s) for s in sets.values()) == len(set(pairs)) == len(pairs)
    assert not (sets["train"] & sets["test"]) and not (sets["valid"] & sets["test"])
    assert split_pairs(pairs, valid_size=800, test_size=900, seed=0)["test"] == parts["test"]


# ------------------------------------------------------------------------------------------------
# Sentencepiece
# ------------------------------------------------------------------------------------------------


def test_sentencepiece_round_trip():
    tok = SpmTokenizer(train_sentencepiece(DE + EN, 120))
    assert 20 < tok.vocab_size <= 120
    assert (tok.sp.pad_id(), tok.sp.bos_id(), tok.sp.eos_id(), tok.sp.unk_id()) == (PAD_ID, BOS_ID, EOS_ID, UNK_ID)
    ids = tok.encode(DE + EN)
    assert all(min(s) > UNK_ID for s in ids)  # pieces never use the special ids; every char was seen
    assert [tok.decode(s) for s in ids] == DE + EN
    unseen = "Der Hund trinkt Wasser im Park."  # new sentence, known characters
    assert tok.decode(tok.encode([unseen])[0]) == unseen
    assert tok.decode([BOS_ID] + tok.encode([unseen])[0] + [EOS_ID, PAD_ID]) == unseen
    assert UNK_ID in tok.encode(["Ж"])[0]


def _parallel_cfg(tmp_path, extra, **kw):
    kw.setdefault("vocab_size", 120)
    kw.setdefault("max_tokens", 400)
    return make_cfg("parallel_text", tmp_path / "runs", extra=extra, **kw)


def _plain_files(tmp_path):
    for split, lo, hi in (("train", 0, 30), ("valid", 30, 35), ("test", 35, 40)):
        (tmp_path / f"{split}.de").write_text("\n".join(DE[lo:hi]) + "\n", encoding="utf-8")
        (tmp_path / f"{split}.en").write_text("\n".join(EN[lo:hi]) + "\n", encoding="utf-8")
    return {f"{s}_{side}": f"{s}.{lang}" for s in ("train", "valid", "test")
            for side, lang in (("src", "de"), ("tgt", "en"))}


def test_spm_is_reused_and_other_ranks_wait_for_it(tmp_path):
    extra = _plain_files(tmp_path)
    cfg = _parallel_cfg(tmp_path, extra, root=str(tmp_path))
    b0 = build(cfg)
    path = b0.info["spm_path"]
    stamp = os.stat(path).st_mtime_ns
    b0_again = build(cfg)  # resume: reused, not retrained
    assert os.stat(path).st_mtime_ns == stamp and b0_again.info["vocab_size"] == b0.info["vocab_size"]
    # rank 1 without a process group reads the file rank 0 wrote
    b1 = build(cfg, rank=1, world_size=2)
    assert b1.tokenizer.encode(DE[:3]) == b0.tokenizer.encode(DE[:3])
    # ... and gives up with a clear error when it never appears
    cfg_wait = _parallel_cfg(tmp_path, dict(extra, spm_wait_s=1), root=str(tmp_path))
    with pytest.raises(TimeoutError, match="spm_wait_s"):
        build(cfg_wait, rank=1, world_size=2, run_dir=str(tmp_path / "empty_run"))
    with pytest.raises(ConfigError, match="data.vocab_size = 99"):
        build(_parallel_cfg(tmp_path, extra, root=str(tmp_path), vocab_size=99))


# ------------------------------------------------------------------------------------------------
# parallel_text formats
# ------------------------------------------------------------------------------------------------


def _texts(bundle):
    return {k: (s.src_text, s.tgt_text) for k, s in bundle.splits.items()}


def test_parallel_text_formats_agree(tmp_path):
    want = {"train": (DE[:30], EN[:30]), "val": (DE[30:35], EN[30:35]), "test": (DE[35:], EN[35:])}
    plain = build(_parallel_cfg(tmp_path, _plain_files(tmp_path), root=str(tmp_path)))
    assert _texts(plain) == want

    tsv, jsonl, jsonl_tr = {}, {}, {}
    for split, lo, hi in (("train", 0, 30), ("valid", 30, 35), ("test", 35, 40)):
        p = tmp_path / f"{split}.tsv"
        p.write_text("".join(f"{i}\t{e}\t{d}\n" for i, (d, e) in enumerate(zip(DE[lo:hi], EN[lo:hi]))), "utf-8")
        tsv[split] = str(p)
        p = tmp_path / f"{split}.jsonl"
        p.write_text("".join(json.dumps({"de": d, "en": e}) + "\n" for d, e in zip(DE[lo:hi], EN[lo:hi])), "utf-8")
        jsonl[split] = str(p)
        p = tmp_path / f"{split}_tr.jsonl"
        p.write_text("".join(json.dumps({"translation": {"de": d, "en": e}}) + "\n"
                             for d, e in zip(DE[lo:hi], EN[lo:hi])), "utf-8")
        jsonl_tr[split] = str(p)
    # TSV with chosen columns (absolute paths, spm model shared from the first build)
    spm = plain.info["spm_path"]
    got = build(_parallel_cfg(tmp_path / "a", dict(tsv, src_col=2, tgt_col=1, spm_model=spm)))
    assert _texts(got) == want
    got = build(_parallel_cfg(tmp_path / "b", dict(jsonl, src_key="de", tgt_key="en", spm_model=spm)))
    assert _texts(got) == want
    got = build(_parallel_cfg(tmp_path / "c", dict(jsonl_tr, src_lang="de", tgt_lang="en", spm_model=spm)))
    assert _texts(got) == want
    assert got.tokenizer.encode(DE[:2]) == plain.tokenizer.encode(DE[:2])


def test_parallel_text_from_datasets_dir(tmp_path):
    datasets = pytest.importorskip("datasets")

    def part(lo, hi):
        return datasets.Dataset.from_dict({"translation": [{"de": d, "en": e} for d, e in zip(DE[lo:hi], EN[lo:hi])]})

    datasets.DatasetDict({"train": part(0, 30), "validation": part(30, 35)}).save_to_disk(str(tmp_path / "hf"))
    b = build(_parallel_cfg(tmp_path, {"hf_dir": str(tmp_path / "hf"), "src_lang": "en", "tgt_lang": "de"}))
    assert _texts(b) == {"train": (EN[:30], DE[:30]), "val": (EN[30:35], DE[30:35])}
    with pytest.raises(ConfigError, match="data.extra.src_lang = 'fr'.*de, en"):
        build(_parallel_cfg(tmp_path, {"hf_dir": str(tmp_path / "hf"), "src_lang": "fr", "tgt_lang": "de"}))


def test_parallel_text_errors(tmp_path):
    extra = _plain_files(tmp_path)
    with pytest.raises(ConfigError, match="data.extra.valid_src"):
        build(_parallel_cfg(tmp_path, {k: v for k, v in extra.items() if not k.startswith("valid")},
                            root=str(tmp_path)))
    (tmp_path / "short.en").write_text("one line\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="data.extra.train_tgt .*as many lines"):
        build(_parallel_cfg(tmp_path, dict(extra, train_tgt="short.en"), root=str(tmp_path)))
    with pytest.raises(ConfigError, match="data.extra.train = .*.tsv or .jsonl"):
        build(_parallel_cfg(tmp_path, {"train": "x.csv", "valid": "y.tsv"}, root=str(tmp_path)))


# ------------------------------------------------------------------------------------------------
# Token-bucketed, rank-sliced batches
# ------------------------------------------------------------------------------------------------


def _cost(loader, batch):
    return len(batch) * int(loader.src_len[batch].max() + loader.tgt_len[batch].max())


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_bucketed_batches_invariants(tmp_path, world_size):
    cfg = copy_cfg(tmp_path)
    bundles = [build(cfg, rank=r, world_size=world_size) for r in range(world_size)]
    loaders = [b.train for b in bundles]
    n_batches = len(loaders[0])
    assert n_batches > 5 and all(len(ld) == n_batches for ld in loaders)
    for epoch in (0, 1):
        glob = loaders[0].global_batches(epoch)
        assert len(glob) == n_batches
        assert all(_cost(loaders[0], g) <= cfg.data.max_tokens for g in glob)
        seen = np.concatenate(glob)
        assert len(seen) == len(set(seen.tolist()))  # no pair twice in an epoch
        assert len(seen) > len(bundles[0].splits["train"]) - world_size  # at most a short tail dropped
        per_rank = [list(ld.iter_from(epoch)) for ld in loaders]
        assert all(len(p) == n_batches for p in per_rank)  # DDP needs the same count everywhere
        for k, g in enumerate(glob):
            slices = [ld.rank_slice(g) for ld in loaders]
            assert np.array_equal(np.concatenate(slices), g)  # union of rank slices == global batch
            assert all(len(s) >= 1 for s in slices)
            batches = [p[k] for p in per_rank]
            assert sum(b["ntokens"] for b in batches) == batches[0]["global_ntokens"]
            for b, s in zip(batches, slices):
                assert b["nsentences"] == len(s) == b["src"].shape[0]
                assert b["ntokens"] == int((b["tgt_out"] != PAD_ID).sum())
                assert (b["tgt_in"][:, 0] == BOS_ID).all()
                lens = (b["tgt_out"] != PAD_ID).sum(1)
                assert (b["tgt_out"][torch.arange(len(lens)), lens - 1] == EOS_ID).all()
                # decoder input is the label shifted right by one (bos in front)
                mask = b["tgt_out"][:, :-1] != EOS_ID
                assert torch.equal(b["tgt_in"][:, 1:][mask], b["tgt_out"][:, :-1][mask])
                assert torch.equal(b["src"], b["tgt_out"])  # copy task: label == source (+eos, padded)
                assert b["src"].dtype == torch.long
    # same global batches for any number of processes (same averaged gradient on 1 or N)
    assert all(np.array_equal(a, c) for a, c in zip(build(cfg).train.global_batches(0),
                                                      loaders[0].global_batches(0)))


def test_batches_deterministic_per_seed_and_epoch_and_resumable(tmp_path):
    a, b = build(copy_cfg(tmp_path)).train, build(copy_cfg(tmp_path)).train
    e0 = a.global_batches(0)
    assert all(np.array_equal(x, y) for x, y in zip(e0, b.global_batches(0)))
    assert not all(np.array_equal(x, y) for x, y in zip(e0, a.global_batches(1)))
    other_seed = build(make_cfg("copy", tmp_path, seed=1, **{k: v for k, v in vars(copy_cfg(tmp_path).data).items()
                                                            if k != "name"})).train
    assert not all(np.array_equal(x, y) for x, y in zip(e0, other_seed.global_batches(0)))
    full = list(a.iter_from(3))
    for k in (0, 1, 4, len(a) - 1, len(a)):
        tail = list(a.iter_from(3, k))
        assert len(tail) == len(a) - k
        assert all(torch.equal(x["src"], y["src"]) and torch.equal(x["tgt_out"], y["tgt_out"])
                   for x, y in zip(tail, full[k:]))


def test_val_loader_covers_every_pair_once_on_two_ranks(tmp_path):
    cfg = copy_cfg(tmp_path, task="reverse")
    v0, v1 = (build(cfg, rank=r, world_size=2).val for r in range(2))
    assert len(v0) == len(v1)
    glob = v0.global_batches(0)
    assert sorted(np.concatenate(glob).tolist()) == list(range(41))
    assert all(np.array_equal(x, y) for x, y in zip(glob, v0.global_batches(5)))  # no shuffle
    for b in v0.iter_from(0):  # reverse task: label is the reversed source
        for row in range(b["src"].shape[0]):
            s = [t for t in b["src"][row].tolist() if t > EOS_ID]
            t = [t for t in b["tgt_out"][row].tolist() if t > EOS_ID]
            assert t == s[::-1]


def _equal_length_split(n, length):
    ids = [[5] * length for _ in range(n)]
    flat = np.asarray(sum(ids, []), dtype=np.int32)
    off = np.arange(n + 1, dtype=np.int64) * length
    return TranslationSplit("x", ["5"] * n, ["5"] * n, flat, off, flat.copy(), off.copy())


def test_short_tail_is_rebalanced_or_dropped():
    split = _equal_length_split(7, 4)  # each pair costs (4+1)+(4+1) = 10 padded tokens
    ld = TokenBatchLoader(split, max_tokens=30, rank=0, world_size=2, device="cpu", shuffle=False)
    assert [len(b) for b in ld.global_batches(0)] == [3, 2, 2]  # 3+3+1: the lone pair borrows one
    ld = TokenBatchLoader(split, max_tokens=40, rank=0, world_size=2, device="cpu", shuffle=False)
    assert [len(b) for b in ld.global_batches(0)] == [4, 3]
    split = _equal_length_split(4, 4)
    kw = dict(max_tokens=30, rank=0, world_size=3, device="cpu", shuffle=False)
    assert [len(b) for b in TokenBatchLoader(split, drop_last_short=True, **kw).global_batches(0)] == [3]
    assert [len(b) for b in TokenBatchLoader(split, drop_last_short=False, **kw).global_batches(0)] == [4]


def test_max_tokens_too_small_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data.max_tokens = 60 .*>= 84"):
        build(copy_cfg(tmp_path, max_tokens=60), rank=0, world_size=2)  # 2 processes * (20 + eos + 20 + bos)


# ------------------------------------------------------------------------------------------------
# evaluate_translation
# ------------------------------------------------------------------------------------------------


class EchoModel(torch.nn.Module):
    """Stands in for the transformer: 'translates' by echoing (or reversing) the source pieces."""

    def __init__(self, reverse=False):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)
        self.reverse = reverse
        self.calls = []

    def _echo(self, src, max_len):
        out = []
        for row in src.tolist():
            ids = [t for t in row if t > EOS_ID][:max_len]
            out.append((ids[::-1] if self.reverse else ids) + [EOS_ID, 7, 7])  # junk after eos is cut
        return out

    def greedy(self, src, max_len):
        self.calls.append(("greedy", src.shape, max_len, self.training))
        return self._echo(src, max_len)

    def beam_search(self, src, beam_size, max_len, length_penalty):
        self.calls.append(("beam", src.shape, max_len, beam_size, length_penalty))
        return self._echo(src, max_len)


def test_evaluate_translation_scores_and_writes(tmp_path):
    b = build(copy_cfg(tmp_path))
    model = EchoModel()
    out = tmp_path / "hyp" / "val.txt"
    res = evaluate_translation(model, b, split="val", beam_size=1, out_path=str(out), batch_size=8)
    assert res["bleu"] == pytest.approx(100.0) and res["chrf"] == pytest.approx(100.0)
    assert res["num_segments"] == 41 and res["split"] == "val" and "tok:13a" in res["bleu_signature"]
    assert out.read_text(encoding="utf-8").splitlines() == b.splits["val"].tgt_text
    assert model.training and all(c[0] == "greedy" and c[3] is False for c in model.calls)
    assert len(model.calls) == 6  # ceil(41 / 8)
    # max_len = a * S + b with S the padded source length (pieces + eos)
    assert all(c[2] == int(1.2 * c[1][1] + 10) for c in model.calls)

    rev = EchoModel(reverse=True)
    res = evaluate_translation(rev, b, split="test", beam_size=3, limit=10, length_penalty=0.6)
    hyps = [" ".join(s.split()[::-1]) for s in b.splits["test"].src_text[:10]]
    want = corpus_scores(hyps, b.splits["test"].tgt_text[:10])
    assert res["bleu"] == pytest.approx(want["bleu"]) and res["bleu"] < 100 and res["num_segments"] == 10
    assert {c[0] for c in rev.calls} == {"beam"} and all(c[3:] == (3, 0.6) for c in rev.calls)
    with pytest.raises(ValueError, match="split 'dev'"):
        evaluate_translation(model, b, split="dev")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank, port, tmp, results):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # Sentencepiece: rank 1's run directory is separate (no shared file system): it gets the
        # model through the process group, not through the file.
        extra = {k: os.path.join(tmp, v) for k, v in _plain_files_names().items()}
        cfg = make_cfg("parallel_text", os.path.join(tmp, "runs"), vocab_size=120, max_tokens=400, extra=extra)
        run_dir = os.path.join(tmp, f"rank{rank}")
        b = build(cfg, rank=rank, world_size=2, run_dir=run_dir)
        enc = b.tokenizer.encode(DE[:5])
        copy_b = build(copy_cfg(tmp), rank=rank, world_size=2)
        res = evaluate_translation(EchoModel(reverse=True), copy_b, split="val", beam_size=1, batch_size=4,
                                   out_path=os.path.join(tmp, "hyp2.txt"))
        with open(os.path.join(tmp, f"result{rank}.json"), "w") as fh:
            json.dump({"enc": enc, "has_file": os.path.isfile(os.path.join(run_dir, "spm.model")),
                       "bleu": res["bleu"], "chrf": res["chrf"]}, fh)
    finally:
        torch.distributed.destroy_process_group()


def _plain_files_names():
    return {f"{s}_{side}": f"{s}.{lang}" for s in ("train", "valid", "test")
            for side, lang in (("src", "de"), ("tgt", "en"))}


@pytest.mark.multiproc
def test_two_gloo_ranks_share_spm_and_gather_hypotheses(tmp_path):
    _plain_files(tmp_path)
    torch.multiprocessing.spawn(_two_rank_worker, args=(_free_port(), str(tmp_path), None), nprocs=2, join=True)
    r0, r1 = (json.load(open(tmp_path / f"result{r}.json")) for r in range(2))
    assert r0["has_file"] and not r1["has_file"] and r0["enc"] == r1["enc"]
    single = evaluate_translation(EchoModel(reverse=True), build(copy_cfg(tmp_path)), split="val", beam_size=1,
                                  out_path=str(tmp_path / "hyp1.txt"))
    assert r0["bleu"] == r1["bleu"] == pytest.approx(single["bleu"]) and r0["chrf"] == pytest.approx(single["chrf"])
    assert (tmp_path / "hyp2.txt").read_text() == (tmp_path / "hyp1.txt").read_text()


def test_decode_length_is_clamped_to_the_model_max_len(tmp_path):
    model = EchoModel()
    model.max_len = 12  # the transformer's position-table size
    evaluate_translation(model, build(copy_cfg(tmp_path)), split="val", beam_size=1, max_len_a=2.0, max_len_b=5,
                        batch_size=4)
    assert max(c[2] for c in model.calls) == 12 and min(c[2] for c in model.calls) < 12


def test_evaluate_with_the_registered_transformer(tmp_path):
    from dist_sparse.models import create_model, model_names

    if "transformer_tiny" not in model_names():
        pytest.skip("dist_sparse.models.transformer is not there yet")
    b = build(copy_cfg(tmp_path))
    torch.manual_seed(0)
    info = b.info
    model = create_model("transformer_tiny", vocab_size=info["vocab_size"], pad_id=info["pad_id"],
                         bos_id=info["bos_id"], eos_id=info["eos_id"])
    batch = next(b.train.iter_from(0))
    assert model(batch["src"], batch["tgt_in"]).shape == (*batch["tgt_out"].shape, info["vocab_size"])
    out = tmp_path / "hyp.txt"
    for beam in (1, 2):
        res = evaluate_translation(model, b, split="test", beam_size=beam, limit=9, batch_size=4, out_path=str(out))
        assert 0.0 <= res["bleu"] <= 100.0 and res["num_segments"] == 9
        assert len(out.read_text().splitlines()) == 9
