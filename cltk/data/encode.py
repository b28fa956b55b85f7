"""Tokenise a stream of documents into a flat token file and a document index, in one pass.

A reader thread pulls documents (file reads, splitting, hashing) and hands batches of about
``BATCH_CHARS`` characters to the main thread, which encodes each batch with the tokenizer's own batch
call: a fast tokenizer spreads it over all cores (Rust threads, the GIL released), so reading the next
batch overlaps encoding this one. Only one or two batches are ever in memory.
"""

from __future__ import annotations

import hashlib
import itertools
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

BATCH_CHARS = 2_000_000
_DONE = object()


def token_dtype(tokenizer: Any) -> np.dtype:
    """uint16 when every id fits (vocabularies up to 65,536), else uint32: half the disk and page cache."""
    return np.dtype(np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32)


@dataclass
class Encoded:
    """What one pass wrote: token and document counts and the SHA-256 of the documents' text."""

    tokens: int
    documents: int
    sha256: str


def _batches(docs: Iterable[str], digest: Any) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for doc in docs:
        if not doc:  # an empty document would be a lone EOS
            continue
        raw = doc.encode("utf-8", errors="surrogatepass")
        digest.update(len(raw).to_bytes(8, "little"))  # length-prefixed: ["ab","c"] != ["a","bc"]
        digest.update(raw)
        batch.append(doc)
        size += len(doc)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _prefetch(batches: Iterator[list[str]]) -> Iterator[list[str]]:
    """``batches`` produced by a background thread, at most two ahead; its exceptions re-raised here."""
    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def produce() -> None:
        try:
            for b in batches:
                while not stop.is_set():
                    try:
                        q.put(b, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            q.put(e)

    t = threading.Thread(target=produce, name="cltk-read", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join()


def encode_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of ``texts`` with no specials (the only separator is the EOS the packer appends)."""
    return tokenizer(
        texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False
    )["input_ids"]


def encode_stream(
    docs: Iterable[str], tokenizer: Any, eos: int, tokens_out: BinaryIO, index_out: BinaryIO
) -> Encoded:
    """Append each document's ids plus EOS to ``tokens_out`` and its end offset to ``index_out``.

    ``tokens_out`` receives ``token_dtype(tokenizer)`` values; ``index_out`` int64 offsets (the caller
    writes the leading 0). Returns the counts and the text's SHA-256.
    """
    dtype = token_dtype(tokenizer)
    limit = np.iinfo(dtype).max
    digest = hashlib.sha256()
    tokens = documents = 0
    for batch in _prefetch(_batches(docs, digest)):
        ids = encode_ids(tokenizer, batch)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1
        ends = np.cumsum(lengths)
        out = np.empty(int(ends[-1]), dtype=np.int64)
        is_eos = np.zeros(len(out), dtype=bool)
        is_eos[ends - 1] = True
        out[is_eos] = eos
        out[~is_eos] = np.fromiter(
            itertools.chain.from_iterable(ids), dtype=np.int64, count=len(out) - len(ids)
        )
        if len(out) and (out.min() < 0 or out.max() > limit):
            raise ValueError(f"token id outside {dtype} (vocabulary of {len(tokenizer)})")
        tokens_out.write(out.astype(dtype).tobytes())
        index_out.write((ends + tokens).astype(np.int64).tobytes())
        tokens += len(out)
        documents += len(ids)
    return Encoded(tokens, documents, digest.hexdigest())


def open_tokens(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    """A read-only map of a token file of ``count`` values (an empty array for an empty file)."""
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))
