"""Fixed-length token windows read straight from memory-mapped token files.

A packed domain's train split is, per source, the source's token file with the held-out documents cut out,
read as consecutive ``seq_len`` windows; its eval split is a small file of held-out windows. Nothing is
copied into memory: a row is read from the map when asked for, so a rank's memory does not grow with the
corpus (the pages it touches are the OS's file cache, shared by every rank on the node).

``TokenWindows`` answers the few ``datasets.Dataset`` reads the rest of cltk uses (``len``, ``ds[i]``,
``ds[list]``, ``ds["input_ids"][i]``, ``with_format``), so the loop, evaluation and methods read it as
they read a Dataset.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

COLUMN = "input_ids"


@dataclass(frozen=True)
class Part:
    """One source's tokens as windows: ``tokens`` with only the ``[start, stop)`` ranges in ``keep`` read.

    ``keep`` is ``[k, 2]`` int64 token offsets, sorted and disjoint; the kept tokens, in order, are cut
    into ``windows`` windows of ``seq_len`` (the remainder is dropped).
    """

    tokens: np.ndarray
    keep: np.ndarray
    windows: int

    @property
    def _stream_starts(self) -> np.ndarray:
        lengths = self.keep[:, 1] - self.keep[:, 0]
        return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


class TokenWindows(Sequence):
    """``len(self)`` windows of ``seq_len`` tokens over one or more parts (sub-sources), in order.

    Rows come back as int64 arrays. ``sources`` gives each part's ``[start, stop)`` row range and
    ``weights`` its share, so a sampler can draw from the parts of a mixture in proportion.
    """

    def __init__(self, parts: list[Part], seq_len: int, weights: list[float] | None = None):
        self.seq_len = seq_len
        self.weights = list(weights) if weights is not None else [1.0] * len(parts)
        self._parts = parts
        self._starts = [p._stream_starts for p in parts]
        bounds = np.cumsum([0] + [p.windows for p in parts])
        self.sources: list[tuple[int, int]] = [
            (int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])
        ]
        self._bounds = bounds

    @classmethod
    def from_array(cls, rows: np.ndarray) -> TokenWindows:
        """Windows over an in-memory ``[n, seq_len]`` array (tests, benchmarks)."""
        rows = np.asarray(rows)
        flat = rows.reshape(-1)
        part = Part(flat, np.array([[0, flat.size]], dtype=np.int64), rows.shape[0])
        return cls([part], rows.shape[1])

    def __len__(self) -> int:
        return int(self._bounds[-1])

    def row(self, i: int) -> np.ndarray:
        """Window ``i`` as ``[seq_len]`` int64."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"window {i} out of range for {n} windows")
        i %= n
        j = int(np.searchsorted(self._bounds, i, side="right")) - 1
        part, starts = self._parts[j], self._starts[j]
        t = (i - int(self._bounds[j])) * self.seq_len  # offset in the part's kept-token stream
        k = int(np.searchsorted(starts, t, side="right")) - 1
        out = np.empty(self.seq_len, dtype=np.int64)
        filled = 0
        while filled < self.seq_len:  # a window may span the gap left by a held-out document
            a, b = part.keep[k]
            pos = int(a) + (t + filled - int(starts[k]))
            take = min(self.seq_len - filled, int(b) - pos)
            out[filled : filled + take] = part.tokens[pos : pos + take]
            filled += take
            k += 1
        return out

    def rows(self, index) -> np.ndarray:
        """Windows ``index`` (ints, a slice or an array of them) as ``[n, seq_len]`` int64."""
        if isinstance(index, slice):
            index = range(*index.indices(len(self)))
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        out = np.empty((len(idx), self.seq_len), dtype=np.int64)
        for r, i in enumerate(idx):
            out[r] = self.row(int(i))
        return out

    # --- the datasets.Dataset reads cltk uses ---------------------------------------------------------
    def __getitem__(self, key):
        if isinstance(key, str):
            if key != COLUMN:
                raise KeyError(f"token windows have one column {COLUMN!r}, not {key!r}")
            return _Column(self)
        if isinstance(key, (int, np.integer)):
            return {COLUMN: self.row(int(key))}
        return {COLUMN: self.rows(key)}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(self)):
            yield {COLUMN: self.row(i)}

    def with_format(self, *args, **kwargs) -> TokenWindows:
        """Rows are numpy already (``datasets.Dataset.with_format`` compatibility)."""
        return self


class _Column(Sequence):
    """``windows["input_ids"]``: the rows, read lazily."""

    def __init__(self, windows: TokenWindows):
        self._w = windows

    def __len__(self) -> int:
        return len(self._w)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self._w.row(int(key))
        return self._w.rows(key)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        rows = self._w.rows(range(len(self._w)))
        return rows if dtype is None else rows.astype(dtype)


def apportion(weights: Sequence[float], total: int) -> list[int]:
    """Integers summing to ``total`` in proportion to ``weights`` (largest remainders; ties go to the
    earlier part): how a mixture shares out a batch, a budget or the eval windows."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    out = np.floor(exact).astype(np.int64)
    rest = exact - out
    for i in sorted(range(len(w)), key=lambda i: (-rest[i], i))[: total - int(out.sum())]:
        out[i] += 1
    return out.tolist()
