"""Read a source piece by piece: units that are listed without reading, then read one at a time.

A **unit** is the piece of a source read on its own: a file, a 1 MiB line-aligned range of a big file, a
man page, a range of dataset rows. Listing a source's units only stats files, so a corpus is never held in
memory whole, its files can be fingerprinted by (path, size, mtime) before any read, and a ``max_chars``
sample reads units in a seeded order only until the budget is spent.

Errors name the file and line: not UTF-8 or a NUL byte (a binary file), a JSONL line that is not JSON or
lacks the field, an unreadable file.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cltk.errors import UserError

CHUNK_BYTES = 1 << 20


class CorpusError(UserError):
    """A domain's source cannot be loaded; the message names the domain, the file and line, and the fix."""


def fail(domain: str, message: str) -> CorpusError:
    return CorpusError(f"domain {domain!r}: {message}")


@dataclass(frozen=True)
class Unit:
    """A piece of a source: ``read()`` returns its texts; ``paths`` are the files its content comes from."""

    label: str
    paths: tuple[Path, ...]
    read: Callable[[], Iterable[str]]


def expand(patterns: Any, domain: str, what: str) -> list[Path]:
    """Expand a path, a glob or a list of them into sorted files; every pattern must match."""
    items = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
    files: list[Path] = []
    for item in items:
        item = os.path.expanduser(os.fspath(item))
        if os.path.isdir(item):
            raise fail(
                domain,
                f"{what} path {item!r} is a directory; give files or a glob like '{item}/**/*.txt'",
            )
        matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        if not matches:
            raise fail(domain, f"{what} {item!r} matches no file (cwd {os.getcwd()})")
        files.extend(Path(p) for p in matches)
    return list(dict.fromkeys(files))  # a file matched by two patterns is read once


def file_stats(paths: Iterable[Path]) -> list[list[Any]]:
    """``[path, size, mtime_ns]`` of each distinct file: a source's cheap identity."""
    out = []
    for p in sorted({str(p) for p in paths}):
        try:
            st = os.stat(p)
        except OSError as e:
            raise CorpusError(f"cannot stat source file {p}: {e.strerror}") from e
        out.append([p, st.st_size, st.st_mtime_ns])
    return out


def _size(path: Path, domain: str) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise fail(domain, f"cannot read {path}: {e.strerror}") from e


def line_at(path: Path, offset: int) -> int:
    """1-based number of the line holding byte ``offset`` (counted only when an error is reported)."""
    line, done = 1, 0
    with path.open("rb") as f:
        while done < offset:
            block = f.read(min(CHUNK_BYTES, offset - done))
            if not block:
                break
            line += block.count(b"\n")
            done += len(block)
    return line


def read_range(path: Path, start: int, end: int, domain: str) -> tuple[int, bytes]:
    """The lines of ``path`` that start in bytes ``[start, end)``: (offset of the first, their bytes)."""
    try:
        with path.open("rb") as f:
            if start > 0:
                f.seek(start - 1)
                f.readline()  # the rest of a line that began before `start` belongs to the unit before
            pos = f.tell()
            if pos >= end:
                return pos, b""
            data = f.read(end - pos)
            if data and not data.endswith(b"\n"):
                data += f.readline()  # finish the last line, which began before `end`
    except OSError as e:
        raise fail(domain, f"cannot read {path}: {e.strerror}") from e
    return pos, data


def decode(path: Path, pos: int, data: bytes, domain: str) -> str:
    """``data`` (read from ``path`` at ``pos``) as text; a NUL byte or bad UTF-8 names the line."""
    nul = data.find(b"\0")
    if nul >= 0:
        line = line_at(path, pos + nul)
        raise fail(
            domain, f"{path} is not UTF-8 text: line {line} holds a NUL byte (a binary file?); "
            "leave it out of the source"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = line_at(path, pos + e.start)
        raise fail(
            domain, f"{path} is not UTF-8 text: line {line} ({e.reason}); convert it or leave it out"
        ) from e


def _ranges(size: int) -> list[tuple[int, int]]:
    return [(a, min(a + CHUNK_BYTES, size)) for a in range(0, max(size, 1), CHUNK_BYTES)]


def _range_units(
    patterns: Any, domain: str, kind: str, parse: Callable[[Path, int, str], Iterable[str]]
) -> list[Unit]:
    """Units of line-aligned 1 MiB ranges of every file of ``patterns``; a unit's documents are
    ``parse(path, pos, text)`` of its range (``pos``: the range's first byte)."""
    units = []
    for path in expand(patterns, domain, kind):
        for a, b in _ranges(_size(path, domain)):

            def read(path=path, a=a, b=b) -> Iterable[str]:
                pos, data = read_range(path, a, b, domain)
                return parse(path, pos, decode(path, pos, data, domain)) if data else []

            units.append(Unit(f"{path}:{a}-{b}", (path,), read))
    return units


def text_units(patterns: Any, domain: str) -> list[Unit]:
    """Units of a ``files`` source: each file, big ones as line-aligned 1 MiB ranges."""
    return _range_units(patterns, domain, "files", lambda path, pos, text: [text])


def jsonl_units(patterns: Any, field: str, domain: str) -> list[Unit]:
    """Units of a ``jsonl`` source: line-aligned 1 MiB ranges; one document per line's ``field``."""

    def parse(path: Path, pos: int, text: str) -> Iterator[str]:
        first: int | None = None  # line number of the range's first line, counted on error

        def where(k: int) -> str:
            nonlocal first
            first = line_at(path, pos) if first is None else first
            return f"{path}:{first + k}"

        for k, line in enumerate(text.split("\n")):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise fail(domain, f"{where(k)} is not valid JSON ({e.msg})") from e
            if not isinstance(record, dict) or field not in record:
                raise fail(
                    domain, f"{where(k)} has no field {field!r}; set 'field' to the text key"
                )
            if not isinstance(record[field], str):
                raise fail(domain, f"{where(k)} field {field!r} is not a string")
            yield record[field]

    return _range_units(patterns, domain, "jsonl", parse)


def hf_dataset_units(path: Any, split: str, field: str, domain: str, rows: int = 4096) -> list[Unit]:
    """Units of an ``hf_dataset`` source: ranges of rows of the (memory-mapped) Arrow table."""
    import datasets  # deferred: heavy, and only this source kind needs it

    path = os.path.expanduser(os.fspath(path))
    if not os.path.isdir(path):
        raise fail(domain, f"hf_dataset {path!r} is not a directory saved with save_to_disk")
    try:
        data = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise fail(domain, f"hf_dataset {path!r} is not a save_to_disk directory ({e})") from e
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise fail(domain, f"hf_dataset {path!r} has no split {split!r}; has {list(data)}")
        data = data[split]
    if field not in data.column_names:
        raise fail(
            domain, f"hf_dataset {path!r} has no column {field!r}; columns: {data.column_names}"
        )
    files = tuple(sorted(p for p in Path(path).rglob("*") if p.is_file()))
    column = data.select_columns([field])

    def read(a: int, b: int) -> list[str]:
        return [t for t in column[a:b][field] if isinstance(t, str)]

    return [
        Unit(f"{path}[{a}:{a + rows}]", files, lambda a=a: read(a, a + rows))
        for a in range(0, len(data), rows)
    ]


def iter_units(
    units: list[Unit], split: Callable[[str], list[str]], *, max_chars: int | None, seed: int
) -> Iterator[str]:
    """Non-blank documents of ``units``: all of them in order, or, with ``max_chars``, units in a seeded
    order until that many characters are taken (the last document is cut to fit; nothing after it is
    read)."""
    order: Iterable[int] = range(len(units))
    if max_chars is not None:
        order = np.random.default_rng([seed, 0x5A3]).permutation(len(units)).tolist()
    left = max_chars
    for i in order:
        for text in units[i].read():
            for doc in split(text):
                if not doc.strip():
                    continue
                if left is not None:
                    doc = doc[:left]
                    left -= len(doc)
                yield doc
                if left == 0:
                    return


def source_items(source: Mapping[str, Any]) -> list[tuple[float, Mapping[str, Any]]]:
    """``[(weight, sub-source)]``: the parts of a ``mix`` source, or ``[(1.0, source)]``."""
    if "mix" not in source:
        return [(1.0, source)]
    return [  # a part of weight 0 is never drawn: it is not read either
        (float(item["weight"]), {k: v for k, v in item.items() if k != "weight"})
        for item in source["mix"] if item["weight"] > 0
    ]
