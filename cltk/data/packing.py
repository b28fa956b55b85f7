"""Tokenise a domain's documents and pack them into fixed-length sequences, cached on disk.

Each document is tokenised with EOS appended; the documents are concatenated and cut into
``seq_len`` windows (the remainder is dropped), so a window may span a document boundary (the EOS
marks it). The held-out split takes whole documents, so no document is in both train and eval.

The result is saved under ``cache_dir/<name>-<key>/`` where the key hashes everything that decides
the token ids; a second call with the same inputs loads the cache without tokenising.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cltk.data.tokenizer import tokenizer_fingerprint
from cltk.errors import UserError

# Bump when the packed layout or the split rule changes: old caches then miss instead of lying.
PACK_FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_META = "meta.json"


class PackingError(UserError):
    """A domain cannot be packed; the message names the domain and what it needs."""


@dataclass
class PackedDomain:
    """A domain's packed sequences.

    Attributes:
        name: Domain name.
        train: Dataset with one column ``input_ids``: ``seq_len`` token ids per row, stored as
            int32 (``with_format("torch")`` yields int64 tensors).
        eval: Held-out rows in the same layout, from documents not in ``train``.
    """

    name: str
    train: datasets.Dataset
    eval: datasets.Dataset


def pack_domain(
    name: str,
    docs: Sequence[str],
    tokenizer: Any,
    seq_len: int,
    *,
    eval_sequences: int,
    cache_dir: str | Path,
    seed: int = 0,
) -> PackedDomain:
    """Tokenise, split and pack one domain, or load it from the cache.

    Args:
        name: Domain name (letters, digits, ``_.-``); names the cache directory.
        docs: The domain's documents (e.g. from ``load_documents``).
        tokenizer: A HF tokenizer with an EOS token.
        seq_len: Tokens per packed sequence.
        eval_sequences: Held-out sequences to keep (0 for none).
        cache_dir: Where packed domains are cached.
        seed: Seed of the choice of held-out documents.

    Returns:
        The packed domain; its datasets are memory-mapped from the cache.

    Raises:
        PackingError: A bad argument, a tokenizer without EOS, or too little text for one train
            sequence plus the requested eval sequences.
    """
    _check_args(name, docs, seq_len, eval_sequences)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise PackingError(f"domain {name!r}: the tokenizer has no EOS token; set eos_token on it")
    key = cache_key(docs, tokenizer_fingerprint(tokenizer), seq_len, eval_sequences, seed)
    final = Path(cache_dir) / f"{name}-{key}"
    if not (final / _META).is_file():
        train_ids, eval_ids, meta = _tokenise_and_pack(
            name, docs, tokenizer, eos, seq_len, eval_sequences, seed
        )
        _write_cache(final, train_ids, eval_ids, {**meta, "key": key, "name": name})
    return _load_cache(final, name, key)


def cache_key(
    docs: Sequence[str], tokenizer_fp: str, seq_len: int, eval_sequences: int, seed: int
) -> str:
    """Hash of everything that decides a packed domain's token ids (16 hex characters)."""
    h = hashlib.sha256()
    for doc in docs:
        raw = doc.encode("utf-8", errors="surrogatepass")
        h.update(len(raw).to_bytes(8, "little"))  # length-prefixed: ["ab","c"] != ["a","bc"]
        h.update(raw)
    params = json.dumps(
        {"docs": h.hexdigest(), "tokenizer": tokenizer_fp, "seq_len": seq_len,
         "eval_sequences": eval_sequences, "seed": seed, "format": PACK_FORMAT_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(params.encode()).hexdigest()[:16]


def packed_fingerprint(domain: PackedDomain) -> str:
    """Hash of the train and eval token ids (16 hex characters), e.g. to check ranks agree."""
    h = hashlib.sha256()
    for split in (domain.train, domain.eval):
        h.update(b"split")
        h.update(len(split).to_bytes(8, "little"))
        for batch in split.with_format("numpy", columns=["input_ids"]).iter(batch_size=8192):
            ids = np.ascontiguousarray(np.asarray(batch["input_ids"], dtype="<i8"))
            h.update(ids.tobytes())
    return h.hexdigest()[:16]


def _check_args(name: str, docs: Sequence[str], seq_len: int, eval_sequences: int) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise PackingError(
            f"domain name {name!r} must be letters, digits, '_', '.' or '-' (it names a cache dir)"
        )
    for label, value, low in (("seq_len", seq_len, 2), ("eval_sequences", eval_sequences, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise PackingError(f"domain {name!r}: {label} must be an integer >= {low}, got {value!r}")
    if isinstance(docs, str) or not all(isinstance(d, str) for d in docs):
        raise PackingError(f"domain {name!r}: docs must be a list of strings")


def _tokenise_and_pack(
    name: str,
    docs: Sequence[str],
    tokenizer: Any,
    eos: int,
    seq_len: int,
    eval_sequences: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Token id windows for train and eval, shapes ``[n, seq_len]``, plus stats for the cache."""

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        # No BOS/specials from the tokenizer: the only separator is the EOS appended here.
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [x + [eos] for x in ids]}

    texts = [d for d in docs if d]
    table = datasets.Dataset.from_dict({"text": texts or [""]}).map(
        encode, batched=True, batch_size=256, remove_columns=["text"],
        # A fresh fingerprint skips hashing the tokenizer (slow, and it warns when it cannot).
        new_fingerprint=f"cltk-encode-{uuid.uuid4().hex}",
        desc=f"tokenise {name}",
    )
    ids = table.data.column("ids")
    lengths = pc.list_value_length(ids).to_numpy().astype(np.int64)
    if not texts:  # the placeholder row above only keeps the column typed
        lengths[:] = 0
    total, need_eval = int(lengths.sum()), eval_sequences * seq_len
    if total < need_eval + seq_len:
        raise PackingError(
            f"domain {name!r}: {total:,} tokens in {len(texts)} documents, but {eval_sequences} "
            f"eval + 1 train sequence of {seq_len} tokens need {need_eval + seq_len:,}; add text "
            "(raise max_chars) or lower eval_sequences or seq_len"
        )
    # Held-out documents: whole documents in a seeded order until they fill the eval sequences.
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    eval_docs: list[int] = []
    eval_tokens = 0
    for i in order:
        if eval_tokens >= need_eval:
            break
        eval_docs.append(i)
        eval_tokens += int(lengths[i])
    held = set(eval_docs)
    train_docs = [i for i in range(len(texts)) if i not in held]
    train_tokens = int(lengths[train_docs].sum()) if train_docs else 0
    if train_tokens < seq_len:
        raise PackingError(
            f"domain {name!r}: after holding out {len(eval_docs)} whole documents "
            f"({eval_tokens:,} tokens) for {eval_sequences} eval sequences, {train_tokens:,} "
            f"train tokens remain, fewer than one sequence of {seq_len}; add text, or lower "
            "eval_sequences or seq_len"
        )
    train = _windows(ids, train_docs, seq_len)
    evals = _windows(ids, eval_docs, seq_len)[:eval_sequences]
    meta = {"documents": len(texts), "tokens": total, "train_documents": len(train_docs),
            "eval_documents": len(eval_docs), "train_sequences": len(train),
            "eval_sequences": len(evals), "seq_len": seq_len, "seed": seed,
            "format": PACK_FORMAT_VERSION}
    return train, evals, meta


def _windows(ids: pa.ChunkedArray, docs: list[int], seq_len: int) -> np.ndarray:
    """Concatenate the chosen documents' ids in the given order and cut ``[n, seq_len]`` windows."""
    if not docs:
        return np.zeros((0, seq_len), dtype=np.int32)
    flat = pc.list_flatten(ids.take(pa.array(docs, type=pa.int64()))).to_numpy()
    n = len(flat) // seq_len
    return flat[: n * seq_len].astype(np.int32).reshape(n, seq_len)


def _features(seq_len: int) -> datasets.Features:
    return datasets.Features(
        {"input_ids": datasets.Sequence(datasets.Value("int32"), length=seq_len)}
    )


def _write_cache(
    final: Path, train: np.ndarray, evals: np.ndarray, meta: dict[str, Any]
) -> None:
    """Save to a private temp dir, then rename it into place in one step.

    A crash leaves only a temp dir (never a half cache at ``final``). When ranks race, each writes
    its own temp dir; the first rename wins and a later one fails because ``final`` exists, which
    is fine: both hold the same data.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        features = _features(train.shape[1])
        for split, rows in (("train", train), ("eval", evals)):
            ds = datasets.Dataset.from_dict({"input_ids": rows}, features=features)
            # An empty split needs one explicit shard: with zero shards it cannot be loaded back.
            ds.save_to_disk(str(tmp / split), num_shards=1 if len(ds) == 0 else None)
        (tmp / _META).write_text(json.dumps(meta, indent=2, sort_keys=True))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / _META).is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cache(final: Path, name: str, key: str) -> PackedDomain:
    meta = json.loads((final / _META).read_text())
    if meta.get("key") != key:
        raise PackingError(
            f"domain {name!r}: cache {final} was written for key {meta.get('key')!r}, not {key!r}; "
            "delete that directory"
        )
    return PackedDomain(
        name=name,
        train=datasets.load_from_disk(str(final / "train")),
        eval=datasets.load_from_disk(str(final / "eval")),
    )
