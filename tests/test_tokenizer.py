"""Tokenizer training, loading and fingerprints, on real corpus text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from cltk.data.corpora import load_documents
from cltk.data.tokenizer import (
    MIN_VOCAB_SIZE,
    TokenizerError,
    load_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)

# Text the corpora will never have taught the tokenizer, to prove byte fallback.
UNSEEN = "naïve café – 中文字符 🙂🚀 \u0000\t\r\n   indented\n\tλx: x²"


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """~1.5 MB of real text: Python stdlib code (always installed)."""
    return load_documents({"builtin": "stdlib"}, max_chars=1_500_000, seed=0, domain="code")


@pytest.fixture(scope="module")
def trained(texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    start = time.perf_counter()
    tok = train_tokenizer(texts, 4096, out)
    return tok, out, time.perf_counter() - start


def test_trains_fast_to_the_requested_size_and_loads_offline(trained, monkeypatch):
    tok, out, seconds = trained
    assert seconds < 30, f"training 1.5 MB at vocab 4096 took {seconds:.1f} s"
    assert len(tok) == 4096
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = AutoTokenizer.from_pretrained(str(out))
    assert len(loaded) == 4096
    assert loaded.eos_token == "</s>" and loaded.pad_token_id == loaded.eos_token_id
    assert loaded.bos_token == "<s>" and loaded.unk_token == "<unk>"
    assert loaded.convert_ids_to_tokens(list(range(3, 6))) == ["<0x00>", "<0x01>", "<0x02>"]
    assert loaded.convert_ids_to_tokens(258) == "<0xFF>"


def test_any_text_round_trips_through_byte_fallback(trained):
    _, out, _ = trained
    loaded = load_tokenizer(out)
    for text in (UNSEEN, "def f(x):\n        return {'a': [1, 2]}\n", "The LORD is my shepherd"):
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert loaded.unk_token_id not in ids
        assert loaded.decode(ids) == text
    emoji = loaded.convert_ids_to_tokens(loaded("🙂", add_special_tokens=False)["input_ids"])
    assert emoji == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]


def test_learned_pieces_compress_the_training_domain(trained, texts):
    tok, _, _ = trained
    sample = "".join(texts[:20])
    ids = tok(sample, add_special_tokens=False)["input_ids"]
    assert len(sample) / len(ids) > 2.5  # a byte-level tokenizer would give ~1 char per token
    assert "▁return" in tok.get_vocab() and "▁self" in tok.get_vocab()


def test_text_spelling_special_tokens_never_becomes_them(trained):
    tok, out, _ = trained
    for t in (tok, load_tokenizer(out)):
        ids = t("a </s> b <s> <unk>", add_special_tokens=False)["input_ids"]
        assert not {t.eos_token_id, t.bos_token_id, t.unk_token_id} & set(ids)


def test_training_is_deterministic_across_processes(texts, tmp_path):
    """Another process (another str-hash seed, another Rust HashMap seed) trains the same file."""
    (tmp_path / "texts.json").write_text(json.dumps(texts[:150]))
    script = textwrap.dedent("""
        import json, sys
        from cltk.data.tokenizer import train_tokenizer
        train_tokenizer(json.load(open(sys.argv[1])), 1024, sys.argv[2])
    """)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "texts.json"), str(tmp_path / "there")],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        check=True,
        timeout=180,
    )
    train_tokenizer(texts[:150], 1024, tmp_path / "here")
    assert (tmp_path / "here" / "tokenizer.json").read_bytes() == (
        tmp_path / "there" / "tokenizer.json"
    ).read_bytes()
    assert (tmp_path / "here" / "tokenizer_config.json").read_bytes() == (
        tmp_path / "there" / "tokenizer_config.json"
    ).read_bytes()


def test_fingerprint_is_stable_and_sensitive(trained, texts, tmp_path):
    tok, out, _ = trained
    fp = tokenizer_fingerprint(tok)
    assert len(fp) == 16 and fp == tokenizer_fingerprint(load_tokenizer(out))
    smaller = train_tokenizer(texts[:100], 1024, tmp_path / "a")
    other_text = train_tokenizer([t.upper() for t in texts[:100]], 1024, tmp_path / "b")
    fps = {fp, tokenizer_fingerprint(smaller), tokenizer_fingerprint(other_text)}
    assert len(fps) == 3
    changed = load_tokenizer(out)
    changed.eos_token = "<s>"  # same vocabulary, different special tokens
    assert tokenizer_fingerprint(changed) != fp


def test_max_chars_trains_on_a_seeded_sample(tmp_path):
    # Each text teaches one unique word, e.g. "wacq" (letters only: the pre-tokenizer splits digits).
    texts = [f"wa{chr(97 + i)}q " * 300 for i in range(26)]
    per_text = len(texts[0])

    def learned_words(seed: int) -> set[str]:
        tok = train_tokenizer(texts, 512, tmp_path / f"s{seed}", seed=seed, max_chars=5 * per_text)
        return {
            w
            for w in (t.strip("▁") for t in tok.get_vocab())
            if len(w) == 4 and w.startswith("wa") and w.endswith("q")
        }

    first = learned_words(1)
    assert len(first) == 5 and first == learned_words(1)
    assert first != learned_words(2)


def test_bad_arguments_are_explained(tmp_path):
    with pytest.raises(TokenizerError, match=f">= {MIN_VOCAB_SIZE}"):
        train_tokenizer(["some text"], 100, tmp_path / "x")
    with pytest.raises(TokenizerError, match="no text"):
        train_tokenizer(["", ""], 1024, tmp_path / "x")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "weights.bin").write_bytes(b"0")
    with pytest.raises(TokenizerError, match="not a tokenizer directory"):
        load_tokenizer(tmp_path / "empty")


def test_load_tokenizer_sets_pad_to_eos(trained, tmp_path):
    tok, _, _ = trained
    no_pad = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="</s>")
    no_pad.save_pretrained(str(tmp_path / "np"))
    assert AutoTokenizer.from_pretrained(str(tmp_path / "np")).pad_token is None
    loaded = load_tokenizer(tmp_path / "np")
    assert loaded.pad_token == "</s>" and loaded.pad_token_id == loaded.eos_token_id
