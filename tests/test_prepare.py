"""prepare: streamed once into memory-mapped files, a cheap cache key that catches changed sources,
mixtures inside a domain, and bad input named by file and line before any training."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest

from cltk.data import prepare as prep
from cltk.data import reading
from cltk.data.packing import read_manifest
from cltk.data.reading import CorpusError
from cltk.errors import UserError
from cltk.validate import load_config
from tests.tiny_run import write_tiny_run

WORDS = ["the", "of", "and", "to", "in", "that", "is", "was", "he", "for", "it", "with", "as"]


def _text(rng: random.Random, n: int) -> str:
    return "\n\n".join(" ".join(rng.choices(WORDS, k=rng.randint(20, 80))) for _ in range(n)) + "\n"


def _corpus(tmp_path):
    rng = random.Random(0)
    (tmp_path / "a").mkdir(parents=True)
    for i in range(4):
        (tmp_path / "a" / f"f{i}.txt").write_text(_text(rng, 40))
    with open(tmp_path / "b.jsonl", "w") as f:
        for i in range(150):
            f.write(json.dumps({"text": f"RECORD{i} " + _text(rng, 1)}) + "\n")


def _cfg(tmp_path, source=None, **domain):
    _corpus(tmp_path)
    src = source or {"mix": [{"files": str(tmp_path / "a" / "*.txt"), "weight": 0.7},
                             {"jsonl": str(tmp_path / "b.jsonl"), "weight": 0.3}]}
    path = write_tiny_run(
        tmp_path, domains=[{"name": "web", "source": src, **domain}],
        data={"seq_len": 16, "eval_sequences": 10},
        tokenizer={"train": {"vocab_size": 400, "max_chars_per_domain": 20000}},
    )
    return load_config(path, world_size=1)


def test_prepare_writes_memory_mapped_parts_and_hits_the_cache_without_reading(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    tok, domains = prep.prepare(cfg)
    web = domains["web"]
    m = read_manifest(next(cfg.cache_dir.glob("web-*")))
    # Two parts, each its own token file; eval windows shared out by weight (7 + 3).
    assert [s["eval_sequences"] for s in m["sources"]] == [7, 3] and len(web.eval) == 10
    assert web.train.sources == [(0, m["sources"][0]["train_sequences"]),
                                 (m["sources"][0]["train_sequences"], len(web.train))]
    assert web.train.weights == [0.7, 0.3]
    assert all(isinstance(p.tokens, np.memmap) for p in web.train._parts)
    assert m["files"] and all(len(s["content_sha256"]) == 64 for s in m["sources"])
    # The JSONL part's windows decode to its records, the files part's never do.
    a, b = web.train.sources
    assert "RECORD" in tok.decode(web.train.rows(range(*b)).ravel())
    assert "RECORD" not in tok.decode(web.train.rows(range(*a)).ravel())
    # A second prepare reads no source file at all (the key is stats only).
    monkeypatch.setattr(reading, "read_range", lambda *a, **k: pytest.fail("read on a cache hit"))
    again = prep.prepare(cfg)[1]["web"]
    assert np.array_equal(again.train.rows(range(5)), web.train.rows(range(5)))


def test_a_changed_or_truncated_source_is_prepared_again_and_refused_on_resume(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    prep.prepare(cfg)
    f = tmp_path / "b.jsonl"
    lines = f.read_bytes().splitlines(keepends=True)
    f.write_bytes(b"".join(lines[:-10]))  # truncated at a line end (mid-line is a JSON error)
    prep.prepare(cfg)
    err = capsys.readouterr().err
    assert f"{f} changed: size" in err and "(truncated?)" in err and "preparing it again" in err
    assert len(list(cfg.cache_dir.glob("web-*"))) == 2
    # A run that has trained on the data refuses to go on with other data, naming the file.
    (cfg.out / "checkpoints").mkdir(parents=True)
    with open(f, "a") as fh:
        fh.write(json.dumps({"text": "one more"}) + "\n")
    with pytest.raises(prep.StaleDataError, match=rf"domain 'web'.*{f} changed: size"):
        prep.prepare(cfg)


def test_a_file_that_changes_during_prepare_is_refused_and_nothing_is_kept(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    prep.prepare_tokenizer(cfg)
    real = reading.read_range

    def touching(path, *args):
        out = real(path, *args)
        with open(path, "a") as fh:  # another process appends while the pass reads
            fh.write("\n")
        return out

    monkeypatch.setattr(reading, "read_range", touching)
    with pytest.raises(CorpusError, match="changed while it was being prepared"):
        prep.prepare(cfg)
    assert not list(cfg.cache_dir.glob("web-*")) and not list(cfg.cache_dir.glob(".web-*"))


def test_max_chars_reads_only_the_units_it_uses(tmp_path, monkeypatch):
    rng = random.Random(1)
    big = tmp_path / "big.txt"
    big.write_text(_text(rng, 40_000))  # ~9 MB: nine 1 MiB units
    read = []
    real = reading.read_range
    monkeypatch.setattr(reading, "read_range", lambda p, a, b, d: read.append(a) or real(p, a, b, d))
    from cltk.data.corpora import load_documents

    docs = load_documents({"files": str(big)}, max_chars=300_000, seed=3)
    assert sum(map(len, docs)) == 300_000 and len(read) == 1  # one unit of ~1 MiB, not nine
    # A small sample still holds several documents, so whole ones can be held out for eval.
    for seed in range(5):
        small = load_documents({"builtin": "stdlib"}, max_chars=5000, seed=seed)
        assert sum(map(len, small)) == 5000 and len(small) >= 8


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda d: (d / "x.txt").write_bytes(b"ok\nfine\nbad \x00 byte\n"),
         r"x\.txt is not UTF-8 text: line 3 holds a NUL byte"),
        (lambda d: (d / "x.txt").write_bytes(b"ok\n\xff\xfe\n"), r"x\.txt is not UTF-8 text: line 2"),
        (lambda d: (d / "x.txt").write_text("  \n\n"), r"yielded no text"),
        (lambda d: (d / "x.jsonl").write_text('{"text": "a"}\n{"text": \n'),
         r"x\.jsonl:2 is not valid JSON"),
        (lambda d: (d / "x.jsonl").write_text('{"text": "a"}\n\n{"body": "b"}\n'),
         r"x\.jsonl:3 has no field 'text'"),
    ],
)
def test_bad_input_names_file_and_line_before_training(tmp_path, make, fragment):
    (tmp_path / "in").mkdir()
    make(tmp_path / "in")
    name = next((tmp_path / "in").iterdir()).name
    kind = "jsonl" if name.endswith(".jsonl") else "files"
    cfg = _cfg(tmp_path, source={kind: str(tmp_path / "in" / name)})
    with pytest.raises(UserError, match=fragment):
        prep.prepare(cfg)


def test_a_bad_line_deep_in_a_big_jsonl_names_its_line(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(60_000):  # ~2.5 MB: the bad line is in the third 1 MiB unit
            f.write(json.dumps({"text": f"record number {i} " + "w" * 20}) + "\n")
        f.write("{oops\n")
    from cltk.data.corpora import load_documents

    with pytest.raises(CorpusError, match=r"big\.jsonl:60001 is not valid JSON"):
        load_documents({"jsonl": str(path)}, domain="web")


@pytest.mark.parametrize(
    "mix, fragment",
    [
        ([{"builtin": "kjv", "weight": 0}, {"builtin": "stdlib", "weight": 0}], "sum to 0"),
        ([{"builtin": "kjv", "weight": -1}], r"mix\[0\]\.weight must be a number >= 0"),
        ([{"builtin": "kjv"}], r"mix\[0\]\.weight must be a number"),
        ([], "non-empty list"),
        ([{"builtin": "nope", "weight": 1}], r"domain 'web\.mix\[0\]'.*unknown builtin"),
    ],
)
def test_bad_mixtures_are_config_errors(tmp_path, mix, fragment):
    from cltk.config import ConfigError

    path = write_tiny_run(tmp_path, domains=[{"name": "web", "source": {"mix": mix}}])
    with pytest.raises(ConfigError, match=fragment):
        load_config(path, world_size=1)


def test_cltk_prepare_command(tmp_path, capsys):
    from cltk.cli import main

    cfg = _cfg(tmp_path)
    path = str(tmp_path / "run.yaml")
    assert main(["prepare", "--config", path]) == 0
    assert read_manifest(next(cfg.cache_dir.glob("web-*")))["train_sequences"] > 0
    (tmp_path / "a" / "f1.txt").write_bytes(b"\x00\x01binary")
    assert main(["prepare", "--config", path]) == 2
    assert "f1.txt is not UTF-8 text: line 1 holds a NUL byte" in capsys.readouterr().err


@pytest.mark.multirank
def test_two_ranks_prepare_once_and_train_a_mixture_in_proportion(tmp_path):
    """One 2-rank launch: a bad file fails on both ranks; rank 0 alone tokenises; both map the same
    data; a 0.75 / 0.25 mixture trains 6 + 2 of every global batch of 8, ranks disjoint."""
    from pathlib import Path

    from tests.multirank import run_ranks

    cfg = _cfg(tmp_path / "good")
    src = {"mix": [{"files": str(tmp_path / "good" / "a" / "*.txt"), "weight": 0.75},
                   {"jsonl": str(tmp_path / "good" / "b.jsonl"), "weight": 0.25}]}
    good = write_tiny_run(
        tmp_path / "good", domains=[{"name": "web", "source": src}],
        data={"seq_len": 16, "eval_sequences": 8},
        train={"max_steps_per_stage": 4, "log_sequence_ids": True},
        tokenizer={"train": {"vocab_size": 400, "max_chars_per_domain": 20000}},
    )
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    bad = write_tiny_run(tmp_path / "bad", domains=[{"name": "web", "source": {
        "jsonl": str(tmp_path / "bad" / "x.jsonl")}}])
    script = Path(__file__).parent / "scripts" / "data_ranks.py"
    run_ranks([script, good, bad, tmp_path], timeout=600)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert "CorpusError" in r["error"] and "x.jsonl:2 field 'text' is not a string" in r["error"]
    assert ranks[0]["encoded"] == 2 and ranks[1]["encoded"] == 0  # two parts, tokenised by rank 0
    assert ranks[0]["fingerprints"] == ranks[1]["fingerprints"]
    m = read_manifest(next(cfg.cache_dir.glob("web-*")))
    split = m["sources"][0]["train_sequences"]  # rows below it are part A (files)
    out = tmp_path / "good" / "out"
    audits = [[json.loads(x) for x in (out / "sequence_ids" / f"rank{r}.jsonl").read_text().splitlines()]
              for r in (0, 1)]
    assert len(audits[0]) == len(audits[1]) == 4
    for a, b in zip(*audits):
        ids = [tuple(x) for x in a["ids"] + b["ids"]]
        assert len(ids) == 8 and not {tuple(x) for x in a["ids"]} & {tuple(x) for x in b["ids"]}
        assert sum(i < split for _, i in ids) == 6 and sum(i >= split for _, i in ids) == 2
    assert json.loads((out / "forgetting.json").read_text())["perplexity"][0][0] > 1


def test_runs_sharing_a_cache_share_the_trained_tokenizer(tmp_path, monkeypatch):
    """BPE ties are broken by hash-map order per process, so the tokenizer is trained once per input
    and reused from the cache by any run on the same data (the same token ids, the same packing)."""
    first = _cfg(tmp_path / "one")
    second = load_config(write_tiny_run(
        tmp_path / "two", domains=[dataclasses.asdict(d) for d in first.domains],
        data={"seq_len": 16, "eval_sequences": 10, "cache_dir": str(first.cache_dir)},
        tokenizer={"train": {"vocab_size": 400, "max_chars_per_domain": 20000}},
    ), world_size=1)
    tok = prep.prepare_tokenizer(first)
    assert len(list(first.cache_dir.glob("tokenizer-*"))) == 1
    real = prep.train_tokenizer
    monkeypatch.setattr(prep, "train_tokenizer", lambda *a, **k: pytest.fail("trained again"))
    again = prep.prepare_tokenizer(second)
    assert second.out != first.out
    assert (second.out / "tokenizer" / "tokenizer.json").read_bytes() == (
        first.out / "tokenizer" / "tokenizer.json").read_bytes()
    assert again.encode("the of and") == tok.encode("the of and")
    # a different vocabulary is another entry, trained anew
    monkeypatch.setattr(prep, "train_tokenizer", real)
    second.tokenizer.train.vocab_size = 420
    (second.out / "tokenizer" / "tokenizer_config.json").unlink()
    prep.prepare_tokenizer(second)
    assert len(list(first.cache_dir.glob("tokenizer-*"))) == 2
