"""A fixed-size reservoir of earlier stages' sequences, kept on disk with the run (``replay.memory``).

After each stage, reservoir sampling (Vitter's algorithm R, seeded by the run's seed and the stage)
runs over the sequences that stage trained as its own data, so the reservoir is at every point a
uniform sample of at most ``N`` of all sequences the stages so far trained. Stage ``i`` replays from
the reservoir as it stood after stage ``i - 1``.

On disk, ``OUT/replay/memory-s<i>/`` is the reservoir after stage ``i``::

    tokens.npy   int32 [n, seq_len]  the sequences' token ids (n <= N)
    items.npy    int64 [n, 3]        where each came from: (stage, domain index, sequence index)
    meta.json    written last: N, seq_len, seed, sequences seen, and one record per absorbed stage

A directory is written under a temporary name and renamed into place whole, so it is complete or
absent. A stage whose end is run again (a resume from its ``-end`` checkpoint) finds its reservoir
on disk and keeps it when the records match. Disk: ``N x seq_len x 4`` bytes of tokens plus
``24 N`` bytes of provenance, twice for a moment at each stage end (the previous reservoir is
removed when the next stage starts).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1
META = "meta.json"
_STAGE = re.compile(r"^\.?memory-s(\d+)")
_COPY_ROWS = 16384  # rows copied at a time from the previous reservoir (bounded memory)


def reservoir_slots(
    seen: int, m: int, capacity: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Where ``m`` new stream items land in a reservoir of ``capacity`` that has seen ``seen`` items.

    Algorithm R: the item at stream position ``g`` fills slot ``g`` while ``g < capacity``; after that
    it replaces a uniform slot ``j`` of ``[0, g]`` when ``j < capacity``. A later item that replaces
    an earlier one of the same call wins.

    Returns:
        ``(slots, picks)``: int64 arrays of equal length, slot ``slots[k]`` now holds new item
        ``picks[k]``; each slot appears at most once; sorted by slot.
    """
    if capacity <= 0 or m <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    g = seen + np.arange(m, dtype=np.int64)
    slot = g.copy()
    late = g >= capacity
    slot[late] = rng.integers(0, g[late] + 1)
    keep = np.flatnonzero(slot < capacity)
    slot = slot[keep]
    # the last item to land in a slot wins: the first occurrence in the reversed order
    uniq, first_rev = np.unique(slot[::-1], return_index=True)
    picks = keep[::-1][first_rev]
    return uniq.astype(np.int64), picks.astype(np.int64)


def items_sha256(items: list[tuple[int, int]]) -> str:
    return hashlib.sha256(np.asarray(items, dtype="<i8").tobytes()).hexdigest()


@dataclass
class Memory:
    """A reservoir as read from disk: ``tokens`` [n, T] (memory-mapped), ``items`` [n, 3], ``meta``."""

    path: Path
    tokens: np.ndarray
    items: np.ndarray
    meta: dict[str, Any]

    def __len__(self) -> int:
        return int(self.meta["size"])


def memory_dir(root: Path, stage: int) -> Path:
    """The reservoir after stage ``stage``."""
    return Path(root) / f"memory-s{stage:02d}"


def load(root: Path, stage: int) -> Memory | None:
    """The reservoir after ``stage``, or None when it is not on disk (whole)."""
    path = memory_dir(root, stage)
    if not (path / META).is_file():
        return None
    meta = json.loads((path / META).read_text())
    tokens = np.load(path / "tokens.npy", mmap_mode="r")
    items = np.load(path / "items.npy")
    if tokens.shape != (meta["size"], meta["seq_len"]) or len(items) != meta["size"]:
        raise ValueError(f"{path}: tokens {tokens.shape} / items {items.shape} do not match {META}")
    return Memory(path, tokens, items, meta)


def stage_record(stage: int, name: str, items: list[tuple[int, int]]) -> dict[str, Any]:
    return {"stage": stage, "name": name, "sequences": len(items), "items_sha256": items_sha256(items)}


def matches(
    memory: Memory, prev: Memory | None, capacity: int, seq_len: int, seed: int,
    record: dict[str, Any],
) -> bool:
    """Whether ``memory`` is what absorbing the stage of ``record`` into ``prev`` with these settings
    gives (the same settings, the same stages before, the same sequences of this stage)."""
    m = memory.meta
    before = prev.meta["stages"] if prev is not None else []
    return (m["capacity"], m["seq_len"], m["seed"], m["stages"]) == (
        capacity, seq_len, seed, before + [record])


def absorb(
    root: Path,
    prev: Memory | None,
    stage: int,
    name: str,
    items: list[tuple[int, int]],
    read_rows: Callable[[list[tuple[int, int]]], np.ndarray],
    capacity: int,
    seq_len: int,
    seed: int,
) -> Memory:
    """Write the reservoir after ``stage``: ``prev`` (the one after the stage before; None for the
    first) updated with the stage's trained sequences ``items`` (``(domain, index)``, in the order
    trained). ``read_rows(items)`` gives their ``[k, seq_len]`` token ids. Returns it, as read back.

    Only the sequences that enter the reservoir are read; the previous reservoir is copied in
    chunks, so memory stays at a chunk whatever ``capacity``.
    """
    seen = int(prev.meta["seen"]) if prev is not None else 0
    size_prev = len(prev) if prev is not None else 0
    rng = np.random.default_rng([seed, 0x5E5E, stage])
    slots, picks = reservoir_slots(seen, len(items), capacity, rng)
    size = min(capacity, seen + len(items))
    final = memory_dir(root, stage)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        tokens = np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=np.int32,
                                           shape=(size, seq_len))
        prov = np.zeros((size, 3), dtype=np.int64)
        for a in range(0, size_prev, _COPY_ROWS):
            b = min(a + _COPY_ROWS, size_prev)
            tokens[a:b] = prev.tokens[a:b]
            prov[a:b] = prev.items[a:b]
        for a in range(0, len(slots), _COPY_ROWS):
            s, p = slots[a : a + _COPY_ROWS], picks[a : a + _COPY_ROWS]
            chosen = [items[int(k)] for k in p]
            tokens[s] = read_rows(chosen).astype(np.int32)
            prov[s] = [(stage, d, i) for d, i in chosen]
        tokens.flush()
        del tokens
        np.save(tmp / "items.npy", prov)
        meta = {
            "format": FORMAT, "capacity": capacity, "seq_len": seq_len, "seed": seed,
            "seen": seen + len(items), "size": size,
            "stages": (prev.meta["stages"] if prev is not None else [])
            + [stage_record(stage, name, items)],
        }
        (tmp / META).write_text(json.dumps(meta, indent=1))
        if final.exists():  # a stale reservoir for this stage (other data or settings): replaced
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = load(root, stage)
    assert out is not None
    return out


def remove_before(root: Path, stage: int) -> list[str]:
    """Remove the reservoirs after stages before ``stage`` (and dead temp dirs); returns their names."""
    removed = []
    for p in sorted(Path(root).glob("memory-s*")) + sorted(Path(root).glob(".memory-s*.tmp-*")):
        found = _STAGE.match(p.name)
        if found and int(found.group(1)) < stage:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed
