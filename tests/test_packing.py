"""Packing: document-level held-out split, EOS-joined windows, memory-mapped token files, the cache."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from cltk.data import packing
from cltk.data.corpora import load_documents
from cltk.data.packing import PackedDomain, PackingError, cache_key, pack_domain, packed_fingerprint
from cltk.data.tokenizer import load_tokenizer, train_tokenizer
from cltk.data.windows import TokenWindows

WORDS = ["the", "of", "and", "to", "in", "that", "is", "was", "he", "for", "it", "with", "as"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = load_documents({"builtin": "stdlib"}, max_chars=200_000, seed=1, domain="code")
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts + [" ".join(WORDS) * 50], 1024, out)
    return load_tokenizer(out)


def marked_docs(n: int, seed: int = 0) -> list[str]:
    """Documents that each start with a unique marker, so a decoded window tells whose it is."""
    rng = random.Random(seed)
    return [f"DOC{i:03d} " + " ".join(rng.choices(WORDS, k=rng.randint(20, 120))) for i in range(n)]


def rows(ds) -> np.ndarray:
    return np.asarray(ds.with_format("numpy")["input_ids"])


def encoded(tok, doc: str) -> list[int]:
    return tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_windows_are_eos_joined_documents_with_whole_documents_held_out(tok, tmp_path):
    docs = marked_docs(120)
    p = pack_domain("prose", docs, tok, 32, eval_sequences=6, cache_dir=tmp_path)
    train, evals = rows(p.train), rows(p.eval)
    assert train.shape[1] == evals.shape[1] == 32 and evals.shape[0] == 6
    assert p.train.seq_len == 32
    # The train split is a map of the token file, not an array in memory.
    assert isinstance(p.train._parts[0].tokens, np.memmap)
    assert p.train._parts[0].tokens.dtype == np.uint16  # vocabulary 1024 fits 16 bits

    def markers(windows: np.ndarray) -> list[int]:
        return [int(m) for m in re.findall(r"DOC(\d{3})", tok.decode(windows.ravel()))]

    eval_docs, train_docs = markers(evals), markers(train)
    assert eval_docs and not set(eval_docs) & set(train_docs)
    held = packing.read_manifest(next(tmp_path.iterdir()))["sources"][0]["held_out"]
    assert eval_docs == held[: len(eval_docs)]  # the manifest records the held-out documents
    eval_docs = held
    # Eval is the held-out documents, EOS-joined, cut to eval_sequences windows.
    stream = [t for i in eval_docs for t in encoded(tok, docs[i])]
    assert evals.ravel().tolist() == stream[: evals.size]
    # Train is every other document in corpus order, the remainder dropped.
    rest = [i for i in range(len(docs)) if i not in set(eval_docs)]
    stream = [t for i in rest for t in encoded(tok, docs[i])]
    assert train.shape[0] == len(stream) // 32
    assert train.ravel().tolist() == stream[: train.size]


def test_split_is_seeded(tok, tmp_path):
    docs = marked_docs(120)
    a = pack_domain("prose", docs, tok, 32, eval_sequences=4, cache_dir=tmp_path / "a", seed=1)
    b = pack_domain("prose", docs, tok, 32, eval_sequences=4, cache_dir=tmp_path / "b", seed=1)
    c = pack_domain("prose", docs, tok, 32, eval_sequences=4, cache_dir=tmp_path / "c", seed=2)
    assert packed_fingerprint(a) == packed_fingerprint(b) != packed_fingerprint(c)
    assert rows(a.eval).tolist() != rows(c.eval).tolist()


def test_second_call_loads_the_cache_without_tokenising(tok, tmp_path, monkeypatch):
    docs = marked_docs(60)
    first = pack_domain("prose", docs, tok, 16, eval_sequences=3, cache_dir=tmp_path)
    cached = [p.name for p in tmp_path.iterdir()]
    assert len(cached) == 1 and cached[0].startswith("prose-")

    def refuse(*args, **kwargs):
        raise AssertionError("tokenised on a cache hit")

    monkeypatch.setattr(type(tok), "__call__", refuse)
    again = pack_domain("prose", list(docs), tok, 16, eval_sequences=3, cache_dir=tmp_path)
    assert packed_fingerprint(again) == packed_fingerprint(first)
    # Any input that changes the ids misses the cache (and so must tokenise).
    for change in ({"seq_len": 17}, {"eval_sequences": 2}, {"seed": 9}, {"docs": docs[:-1]}):
        args = {"docs": docs, "seq_len": 16, "eval_sequences": 3, "seed": 0, **change}
        with pytest.raises(AssertionError, match="tokenised on a cache hit"):
            pack_domain(
                "prose", args.pop("docs"), tok, args.pop("seq_len"), cache_dir=tmp_path, **args
            )


def test_cache_key_covers_every_input():
    base = (["a b", "c"], "fp", 16, 3, 0)
    keys = {cache_key(*base)}
    for i, other in enumerate((["a b", "c "], "fp2", 17, 4, 1)):
        changed = list(base)
        changed[i] = other
        keys.add(cache_key(*changed))
    keys.add(cache_key(["a", "b c"], "fp", 16, 3, 0))  # same characters, other document cut
    assert len(keys) == 7 and cache_key(*base) == cache_key(*base)


def test_a_crash_mid_write_leaves_no_cache(tok, tmp_path):
    docs = marked_docs(60)

    def crashing():
        yield from docs[:30]
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        packing.write_packed(tmp_path / "prose-x", "prose", [packing.SourceSpec(crashing())], tok,
                             16, 3, 0, {"key": "x"})
    assert list(tmp_path.iterdir()) == []  # no final dir, no temp dir left behind
    p = pack_domain("prose", docs, tok, 16, eval_sequences=3, cache_dir=tmp_path)
    assert len(p.eval) == 3


def test_a_killed_writer_temp_dir_is_never_trusted_and_is_cleaned(tok, tmp_path):
    docs = marked_docs(60)
    key = cache_key(docs, packing.tokenizer_fingerprint(tok), 16, 3, 0)
    # What a SIGKILLed prepare leaves: a temp dir holding token files but no manifest, whose pid is gone.
    dead = tmp_path / f".prose-{key}.tmp-{packing.socket.gethostname()}-999999999-abcdef"
    dead.mkdir()
    (dead / "s0.tokens").write_bytes(b"\0" * 64)
    p = pack_domain("prose", docs, tok, 16, eval_sequences=3, cache_dir=tmp_path)
    assert sorted(x.name for x in tmp_path.iterdir()) == [f"prose-{key}"] and len(p.eval) == 3


def test_losing_a_rename_race_is_harmless(tok, tmp_path):
    docs = marked_docs(40)
    final = tmp_path / "prose-0123456789abcdef"
    meta = {"key": "0123456789abcdef"}
    for _ in range(2):  # the second writer's rename loses
        packing.write_packed(final, "prose", [packing.SourceSpec(docs)], tok, 16, 2, 0, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.name]
    loaded = packing.load_packed(final, "prose", "0123456789abcdef")
    assert rows(loaded.eval).shape == (2, 16)


def test_a_truncated_cache_file_is_refused(tok, tmp_path):
    p = pack_domain("prose", marked_docs(40), tok, 16, eval_sequences=2, cache_dir=tmp_path)
    final = next(tmp_path.iterdir())
    with open(final / "s0.tokens", "r+b") as f:
        f.truncate(100)
    del p
    with pytest.raises(PackingError, match=r"s0\.tokens holds 100 bytes.*delete"):
        packing.load_packed(final, "prose")


def test_too_little_text_says_how_much_is_needed(tok, tmp_path):
    docs = marked_docs(3)
    total = sum(len(encoded(tok, d)) for d in docs)
    with pytest.raises(PackingError) as err:
        pack_domain("tiny", docs, tok, 64, eval_sequences=50, cache_dir=tmp_path)
    msg = str(err.value)
    assert "domain 'tiny'" in msg and f"{total:,} tokens" in msg and f"{51 * 64:,}" in msg
    # Enough tokens overall, but one document: holding it out leaves no train text.
    one = [" ".join(WORDS * 20)]
    with pytest.raises(PackingError, match=r"after holding out 1 whole documents.*0 train tokens"):
        pack_domain("one", one, tok, 16, eval_sequences=2, cache_dir=tmp_path)
    with pytest.raises(PackingError, match="domain 'none'.*0 tokens in 0 documents"):
        pack_domain("none", ["", ""], tok, 16, eval_sequences=1, cache_dir=tmp_path)


def test_bad_arguments_are_explained(tok, tmp_path):
    with pytest.raises(PackingError, match="cache dir"):
        pack_domain("a/b", ["x"], tok, 16, eval_sequences=1, cache_dir=tmp_path)
    with pytest.raises(PackingError, match="seq_len must be an integer >= 2"):
        pack_domain("a", ["x"], tok, 1, eval_sequences=1, cache_dir=tmp_path)
    with pytest.raises(PackingError, match="eval_sequences"):
        pack_domain("a", ["x"], tok, 16, eval_sequences=-1, cache_dir=tmp_path)
    no_eos = load_tokenizer(tok.name_or_path)
    no_eos.eos_token = None
    with pytest.raises(PackingError, match="no EOS token"):
        pack_domain("a", ["x"], no_eos, 16, eval_sequences=1, cache_dir=tmp_path)


def test_zero_eval_sequences_keeps_everything_for_training(tok, tmp_path):
    docs = marked_docs(30)
    p = pack_domain("prose", docs, tok, 16, eval_sequences=0, cache_dir=tmp_path)
    stream = [t for d in docs for t in encoded(tok, d)]
    assert len(p.eval) == 0 and len(p.train) == len(stream) // 16


def test_packed_fingerprint_tracks_every_token():
    train = np.arange(16, dtype=np.int32).reshape(4, 4)

    def domain(tr: np.ndarray, ev: np.ndarray) -> PackedDomain:
        return PackedDomain("d", TokenWindows.from_array(tr), TokenWindows.from_array(ev))

    fp = packed_fingerprint(domain(train, train[:1]))
    assert fp == packed_fingerprint(domain(train.copy(), train[:1].copy()))
    bumped = train.copy()
    bumped[2, 3] += 1
    assert packed_fingerprint(domain(bumped, train[:1])) != fp
    assert packed_fingerprint(domain(train[1:], train[:1])) != fp  # a row moved out of train
    assert packed_fingerprint(domain(train[:3], train[3:])) != packed_fingerprint(
        domain(train[:2], train[2:])
    )


@pytest.mark.parametrize("builtin", ["kjv", "stdlib"])
def test_real_corpus_packs_to_readable_text(tok, tmp_path, builtin):
    try:
        docs = load_documents({"builtin": builtin}, max_chars=60_000, seed=0, domain=builtin)
    except ValueError as e:  # the builtin's package is not installed here
        pytest.skip(str(e))
    p = pack_domain(builtin, docs, tok, 64, eval_sequences=4, cache_dir=tmp_path)
    text = tok.decode(rows(p.eval)[0])
    assert len(p.train) > 100 and len(text) > 64  # real text packs to several chars per token


def test_token_windows_answer_the_dataset_reads_cltk_uses():
    rows_in = np.arange(5 * 4).reshape(5, 4)
    w = TokenWindows.from_array(rows_in).with_format("numpy")  # the loop, DAS, soft targets
    assert len(w) == 5 and w[2]["input_ids"].tolist() == [8, 9, 10, 11]
    assert w[[3, 1]]["input_ids"].tolist() == [rows_in[3].tolist(), rows_in[1].tolist()]
    col = w["input_ids"]  # evaluation and routing
    assert len(col) == 5 and len(col[0]) == 4 and col[-1].tolist() == rows_in[-1].tolist()
    assert np.asarray(col).tolist() == rows_in.tolist() and w[1:3]["input_ids"].shape == (2, 4)
    assert w[0]["input_ids"].dtype == np.int64
    with pytest.raises(IndexError):
        w.row(5)
    with pytest.raises(KeyError):
        w["text"]
