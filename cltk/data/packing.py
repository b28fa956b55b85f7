"""Tokenise a domain into memory-mapped token files and read it as fixed-length windows.

Each document is tokenised with EOS appended; a source's documents are written end to end to a flat
token file (uint16 or uint32), with a document index of their end offsets. The held-out split takes
whole documents (a seeded choice), so no document is in both train and eval: eval is those documents
EOS-joined and cut into ``eval_sequences`` windows (a small file of its own); train is every other
document, in corpus order, read from the token file around the held-out ones and cut into ``seq_len``
windows (the remainder dropped). A window may span a document boundary (the EOS marks it).

A domain may mix several sources with weights: each source gets its own token file and its own train
windows (``TokenWindows.sources``), so a sampler can draw them in proportion; eval windows are shared out
by weight.

The result lives under ``cache_dir/<name>-<key>/``: ``s<j>.tokens``, ``s<j>.docs``, ``eval.tokens`` and
``manifest.json``, all written to a temp dir that is renamed into place, the manifest last: a directory
with a manifest is complete, and nothing else is ever trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cltk.data.encode import encode_stream, open_tokens, token_dtype
from cltk.data.tokenizer import tokenizer_fingerprint
from cltk.data.windows import Part, TokenWindows, apportion
from cltk.errors import UserError

# Bump when the packed layout or the split rule changes: old caches then miss instead of lying.
PACK_FORMAT_VERSION = 2
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MANIFEST = "manifest.json"


class PackingError(UserError):
    """A domain cannot be packed; the message names the domain and what it needs."""


@dataclass
class PackedDomain:
    """A domain's packed sequences.

    Attributes:
        name: Domain name.
        train: ``TokenWindows``: ``len()``, ``train[i]["input_ids"]`` (``seq_len`` int64 ids), read
            from memory-mapped files; ``train.sources`` are the row ranges of a mixture's parts.
        eval: Held-out windows in the same layout, from documents not in ``train``.
    """

    name: str
    train: Any
    eval: Any


@dataclass(frozen=True)
class SourceSpec:
    """One part of a domain to pack: its documents (an iterable read once), weight and label."""

    docs: Iterable[str]
    weight: float = 1.0
    label: str = "docs"


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
    """Tokenise, split and pack one domain held as a list of documents, or load it from the cache.

    (Runs stream their sources instead: ``cltk.data.prepare``.)

    Args:
        name: Domain name (letters, digits, ``_.-``); names the cache directory.
        docs: The domain's documents (e.g. from ``load_documents``).
        tokenizer: A HF tokenizer with an EOS token.
        seq_len: Tokens per packed sequence.
        eval_sequences: Held-out sequences to keep (0 for none).
        cache_dir: Where packed domains are cached.
        seed: Seed of the choice of held-out documents.

    Raises:
        PackingError: A bad argument, a tokenizer without EOS, or too little text for one train
            sequence plus the requested eval sequences.
    """
    check_args(name, seq_len, eval_sequences)
    if isinstance(docs, str) or not all(isinstance(d, str) for d in docs):
        raise PackingError(f"domain {name!r}: docs must be a list of strings")
    key = cache_key(docs, tokenizer_fingerprint(tokenizer), seq_len, eval_sequences, seed)
    final = Path(cache_dir) / f"{name}-{key}"
    if not (final / MANIFEST).is_file():
        write_packed(final, name, [SourceSpec(docs)], tokenizer, seq_len, eval_sequences, seed,
                     {"key": key})
    return load_packed(final, name, key)


def cache_key(
    docs: Sequence[str], tokenizer_fp: str, seq_len: int, eval_sequences: int, seed: int
) -> str:
    """Hash of everything that decides a packed list of documents' token ids (16 hex characters)."""
    h = hashlib.sha256()
    for doc in docs:
        raw = doc.encode("utf-8", errors="surrogatepass")
        h.update(len(raw).to_bytes(8, "little"))  # length-prefixed: ["ab","c"] != ["a","bc"]
        h.update(raw)
    return settings_key({"docs": h.hexdigest(), "tokenizer": tokenizer_fp, "seq_len": seq_len,
                         "eval_sequences": eval_sequences, "seed": seed})


def settings_key(settings: dict[str, Any]) -> str:
    """16 hex characters of SHA-256 over ``settings`` (JSON) and the format version."""
    blob = json.dumps({**settings, "format": PACK_FORMAT_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def packed_fingerprint(domain: PackedDomain) -> str:
    """Hash of the train and eval token ids (16 hex characters), e.g. to check ranks agree."""
    h = hashlib.sha256()
    for split in (domain.train, domain.eval):
        split = split.with_format("numpy")
        h.update(b"split")
        h.update(len(split).to_bytes(8, "little"))
        for a in range(0, len(split), 8192):
            rows = split[a : min(a + 8192, len(split))]["input_ids"]
            h.update(np.ascontiguousarray(np.asarray(rows, dtype="<i8")).tobytes())
    return h.hexdigest()[:16]


def check_args(name: str, seq_len: int, eval_sequences: int) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise PackingError(
            f"domain name {name!r} must be letters, digits, '_', '.' or '-' (it names a cache dir)"
        )
    for label, value, low in (("seq_len", seq_len, 2), ("eval_sequences", eval_sequences, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise PackingError(f"domain {name!r}: {label} must be an integer >= {low}, got {value!r}")


# --- writing ----------------------------------------------------------------------------------


def write_packed(
    final: Path,
    name: str,
    sources: list[SourceSpec],
    tokenizer: Any,
    seq_len: int,
    eval_sequences: int,
    seed: int,
    meta: dict[str, Any],
    before_commit: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Stream every source through the tokenizer into ``final`` (see the module docstring).

    ``before_commit`` runs just before the rename (e.g. to check the sources did not change meanwhile);
    an error there leaves nothing behind.

    Writes to a private temp dir renamed into place: a crash leaves only a temp dir (removed here, or
    by the next prepare on this host), never a half cache at ``final``. When two writers race, the
    first rename wins and the other's data (the same) is dropped.

    Returns:
        The manifest.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise PackingError(f"domain {name!r}: the tokenizer has no EOS token; set eos_token on it")
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(final)
    tmp = final.parent / f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        dtype = token_dtype(tokenizer)
        parts = []
        for j, spec in enumerate(sources):
            with open(tmp / f"s{j}.tokens", "wb") as tok_f, open(tmp / f"s{j}.docs", "wb") as idx_f:
                idx_f.write(np.zeros(1, np.int64).tobytes())
                enc = encode_stream(spec.docs, tokenizer, eos, tok_f, idx_f)
            parts.append({"label": spec.label, "weight": spec.weight, "tokens": enc.tokens,
                          "documents": enc.documents, "content_sha256": enc.sha256})
        shares = apportion([s.weight for s in sources], eval_sequences)
        with open(tmp / "eval.tokens", "wb") as eval_f:
            for j, (part, share) in enumerate(zip(parts, shares)):
                part.update(_split(tmp, j, part, dtype, share, seq_len, seed, name, eval_f))
        manifest = {
            **meta, "name": name, "format": PACK_FORMAT_VERSION, "dtype": dtype.name,
            "seq_len": seq_len, "seed": seed, "eval_sequences": eval_sequences,
            "tokenizer": tokenizer_fingerprint(tokenizer), "sources": parts,
            "train_sequences": sum(p["train_sequences"] for p in parts),
            "tokens": sum(p["tokens"] for p in parts),
            "documents": sum(p["documents"] for p in parts),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if before_commit is not None:
            before_commit()
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST).is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _split(
    tmp: Path, j: int, part: dict, dtype: np.dtype, eval_windows: int, seq_len: int, seed: int,
    name: str, eval_f: Any,
) -> dict[str, Any]:
    """Hold out whole documents of source ``j`` for ``eval_windows`` windows; append them to
    ``eval_f``. Returns what the manifest records: the kept token ranges and the counts."""
    label = f"domain {name!r}" + (f" source {part['label']!r}" if j or part["label"] != "docs" else "")
    total, n_docs = part["tokens"], part["documents"]
    need = eval_windows * seq_len
    if total < need + seq_len:
        raise PackingError(
            f"{label}: {total:,} tokens in {n_docs} documents, but {eval_windows} eval + 1 train "
            f"sequence of {seq_len} tokens need {need + seq_len:,}; add text (raise max_chars) or "
            "lower eval_sequences or seq_len"
        )
    ends = np.memmap(tmp / f"s{j}.docs", dtype=np.int64, mode="r", shape=(n_docs + 1,))
    tokens = open_tokens(tmp / f"s{j}.tokens", dtype, total)
    held = _hold_out(ends, need, np.random.default_rng([seed, j, 0xE7A1]))
    held_tokens = 0
    written = 0
    for d in held:  # the held-out documents in their seeded order, EOS-joined, cut to `need` tokens
        a, b = int(ends[d]), int(ends[d + 1])
        held_tokens += b - a
        take = min(b - a, need - written)
        if take > 0:
            eval_f.write(np.asarray(tokens[a : a + take]).tobytes())
            written += take
    train_tokens = total - held_tokens
    if train_tokens < seq_len:
        raise PackingError(
            f"{label}: after holding out {len(held)} whole documents ({held_tokens:,} tokens) for "
            f"{eval_windows} eval sequences, {train_tokens:,} train tokens remain, fewer than one "
            f"sequence of {seq_len}; add text, or lower eval_sequences or seq_len"
        )
    keep, at = [], 0
    for d in sorted(held):
        a, b = int(ends[d]), int(ends[d + 1])
        if a > at:
            keep.append([at, a])
        at = b
    if total > at:
        keep.append([at, total])
    del ends, tokens
    return {"keep": keep, "train_sequences": train_tokens // seq_len, "eval_sequences": eval_windows,
            "train_documents": n_docs - len(held), "eval_documents": len(held), "held_out": held}


def _hold_out(ends: np.ndarray, need: int, rng: np.random.Generator) -> list[int]:
    """Documents in a seeded random order until they hold ``need`` tokens (the caller checked that the
    source has that many). Draws ids one batch at a time: no permutation of every document."""
    n = len(ends) - 1
    chosen: list[int] = []
    seen: set[int] = set()
    tokens = 0
    if n <= 65536:
        candidates = iter(rng.permutation(n).tolist())
    else:
        candidates = (int(i) for _ in iter(int, 1) for i in rng.integers(0, n, 1024))
    while tokens < need:
        d = next(candidates)
        if d in seen:
            continue
        seen.add(d)
        chosen.append(d)
        tokens += int(ends[d + 1] - ends[d])
    return chosen


def _remove_dead_temps(final: Path) -> None:
    """Remove temp dirs that a killed writer on this host left for ``final`` (its pid is gone)."""
    host = socket.gethostname()
    for tmp in final.parent.glob(f".{final.name}.tmp-{host}-*"):
        pid = tmp.name[len(f".{final.name}.tmp-{host}-"):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --- reading ----------------------------------------------------------------------------------


def read_manifest(final: Path) -> dict[str, Any] | None:
    """The manifest of a complete packed directory, or None."""
    path = final / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def load_packed(final: Path, name: str, key: str | None = None) -> PackedDomain:
    """Map a packed directory's token files (nothing is read into memory).

    Raises:
        PackingError: the directory was written for another key, or a token file's size is not what
            the manifest says (a truncated or replaced cache file).
    """
    manifest = read_manifest(final)
    if manifest is None:
        raise PackingError(f"domain {name!r}: {final} is not a complete packed domain (no {MANIFEST})")
    if key is not None and manifest.get("key") != key:
        raise PackingError(
            f"domain {name!r}: cache {final} was written for key {manifest.get('key')!r}, not "
            f"{key!r}; delete that directory"
        )
    dtype, seq_len = np.dtype(manifest["dtype"]), manifest["seq_len"]

    def tokens(file: str, count: int) -> np.ndarray:
        path = final / file
        size = path.stat().st_size if path.is_file() else -1
        if size != count * dtype.itemsize:
            raise PackingError(
                f"domain {name!r}: {path} holds {size} bytes, the manifest says "
                f"{count * dtype.itemsize}; the cache is damaged: delete {final} and prepare again"
            )
        return open_tokens(path, dtype, count)

    train_parts = []
    for j, s in enumerate(manifest["sources"]):
        keep = np.asarray(s["keep"], dtype=np.int64).reshape(-1, 2)
        train_parts.append(Part(tokens(f"s{j}.tokens", s["tokens"]), keep, s["train_sequences"]))
    n_eval = sum(s["eval_sequences"] for s in manifest["sources"])
    ev = tokens("eval.tokens", n_eval * seq_len)
    eval_part = Part(ev, np.array([[0, ev.size]], dtype=np.int64), n_eval)
    return PackedDomain(
        name=name,
        train=TokenWindows(train_parts, seq_len, [s["weight"] for s in manifest["sources"]]),
        eval=TokenWindows([eval_part], seq_len),
    )
