"""Forgetting report on hand-made matrices; expected figures are worked out by hand below."""

from __future__ import annotations

import csv
import json

import pytest

from cltk.metrics import ForgettingReport, compare_reports, forgetting_report, format_table
from cltk.metrics_files import load_report, save_report

# Stages: s0 and s1 are two blocks of "code", s2 trains "bible", s3 trains "law".
# "web" is evaluation-only.
STAGES = ["s0", "s1", "s2", "s3"]
STAGE_DOMAINS = ["code", "code", "bible", "law"]
DOMAINS = ["code", "bible", "law", "web"]
MATRIX = [
    # code  bible  law   web
    [9.0, 30.0, 40.0, 20.0],  # after s0
    [8.0, 31.0, 41.0, 21.0],  # after s1: last code stage -> plasticity code = 8
    [8.5, 12.0, 39.0, 22.0],  # after s2: bible plasticity = 12
    [10.0, 13.5, 11.0, 25.0],  # after s3 (final): law plasticity = 11
]


def _full() -> ForgettingReport:
    return forgetting_report(MATRIX, STAGES, DOMAINS, STAGE_DOMAINS)


def test_figures_of_a_full_run():
    r = _full()
    assert r.final == {"code": 10.0, "bible": 13.5, "law": 11.0, "web": 25.0}
    # web is eval-only: out of the average, plasticity and forgetting
    assert r.eval_only_domains == ["web"]
    assert r.average_final_perplexity == pytest.approx((10.0 + 13.5 + 11.0) / 3)
    # plasticity from the LAST stage that trained the domain (s1 for code, not s0)
    assert r.plasticity == {"code": 8.0, "bible": 12.0, "law": 11.0}
    assert r.mean_plasticity == pytest.approx((8.0 + 12.0 + 11.0) / 3)
    # law is trained in the last stage: left out of forgetting
    assert r.forgetting == pytest.approx({"code": 2.0, "bible": 1.5})
    assert r.mean_forgetting == pytest.approx(1.75)
    assert r.relative_forgetting == pytest.approx({"code": 10.0 / 8.0 - 1, "bible": 13.5 / 12 - 1})
    assert r.mean_relative_forgetting == pytest.approx((0.25 + 0.125) / 2)
    assert r.completed_stages == 4 and not r.is_partial


def test_scattered_blocks_take_the_last_one():
    # code trained at s0 and again at s2: plasticity is measured after s2
    r = forgetting_report(
        [[5.0, 50.0], [7.0, 9.0], [4.0, 10.0], [4.5, 8.0]],
        ["a", "b", "c", "d"],
        ["code", "bible"],
        ["code", "bible", "code", "bible"],
    )
    assert r.plasticity == {"code": 4.0, "bible": 8.0}
    assert r.forgetting == pytest.approx({"code": 0.5})
    assert r.mean_forgetting == pytest.approx(0.5)


def test_partial_run_reports_on_completed_stages():
    r = forgetting_report(MATRIX[:3], STAGES, DOMAINS, STAGE_DOMAINS)
    assert r.is_partial and r.completed_stages == 3
    assert r.final == {"code": 8.5, "bible": 12.0, "law": 39.0, "web": 22.0}
    # law is planned (so not eval-only and in the average) but not reached: no plasticity yet
    assert r.average_final_perplexity == pytest.approx((8.5 + 12.0 + 39.0) / 3)
    assert r.plasticity == {"code": 8.0, "bible": 12.0}
    # bible was trained by the last completed stage: only code has forgetting
    assert r.forgetting == pytest.approx({"code": 0.5})
    one = forgetting_report(MATRIX[:1], STAGES, DOMAINS, STAGE_DOMAINS)
    assert one.plasticity == {"code": 9.0}
    assert one.forgetting == {} and one.mean_forgetting is None
    text = format_table(one)
    assert "partial run: 1 of 4 stages" in text and "mean forgetting: n/a" in text


def test_dict_roundtrip_and_files(tmp_path):
    r = _full()
    assert ForgettingReport.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    paths = save_report(r, tmp_path / "out")
    assert {p.name for p in paths.values()} == {
        "forgetting.json",
        "forgetting.csv",
        "forgetting.png",
    }
    assert load_report(tmp_path / "out") == r
    assert load_report(paths["json"]) == r
    with paths["csv"].open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["stage", "trains", *DOMAINS]
    assert [row[:2] for row in rows[1:]] == [[s, d] for s, d in zip(STAGES, STAGE_DOMAINS)]
    assert [[float(v) for v in row[2:]] for row in rows[1:]] == MATRIX
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a partial report saves too (fewer heatmap rows than stage names)
    partial = forgetting_report(MATRIX[:2], STAGES, DOMAINS, STAGE_DOMAINS)
    assert load_report(save_report(partial, tmp_path / "p")["json"]) == partial
    with pytest.raises(ValueError, match="no forgetting report"):
        load_report(tmp_path / "missing")


def test_format_table_shows_matrix_and_headline():
    text = format_table(_full())
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["after", "stage", "trains"]
    assert lines[0].split()[-4:] == DOMAINS
    row_s2 = next(line for line in lines if line.startswith("s2"))
    assert [float(v) for v in row_s2.split("|")[1].split()] == MATRIX[2]
    assert "average final perplexity: 11.50" in text
    assert "mean forgetting: +1.75 (+18.8%)" in text
    assert "mean plasticity: 10.33" in text
    assert "evaluation-only domains: web" in text


def test_compare_reports_markdown():
    a = _full()
    b = forgetting_report(
        [[9.0, 30.0], [9.5, 12.0]], ["x", "y"], ["code", "bible"], ["code", "bible"]
    )
    md = compare_reports({"finetune": a, "soft-target": b}).splitlines()
    assert md[0].startswith("| method | avg final ppl | forgetting |")
    assert md[2] == "| finetune | 11.50 | +1.75 | +18.8% | 10.33 |"
    # b: final (9.5 + 12) / 2 = 10.75, forgetting code 9.5 - 9 = 0.5 (+5.6%), plasticity 10.5
    assert md[3] == "| soft-target | 10.75 | +0.50 | +5.6% | 10.50 |"
    with pytest.raises(ValueError):
        compare_reports({})


@pytest.mark.parametrize(
    "args,match",
    [
        (([[1.0, 2.0]], ["a"], ["x"], ["x"]), "row 0"),
        (([[1.0]], ["a"], ["x"], ["y"]), "not in domain_names"),
        (([[1.0]], ["a", "a"], ["x"], ["x", "x"]), "stage_names must be unique"),
        (([[1.0]], ["a", "b"], ["x"], ["x"]), "stage_domains has 1"),
        (([[1.0], [1.0]], ["a"], ["x"], ["x"]), "2 rows but only 1"),
        (([], ["a"], ["x"], ["x"]), "no rows"),
        (([[float("nan")]], ["a"], ["x"], ["x"]), "perplexities are > 0"),
        (([[0.0]], ["a"], ["x"], ["x"]), "perplexities are > 0"),
    ],
)
def test_rejects_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        forgetting_report(*args)


def test_mean_forgetting_is_plus_bwt_on_perplexity():
    """docs/metrics.md: Lopez-Paz and Ranzato's BWT = mean over i < T of R[T][i] - R[i][i], applied to
    a perplexity matrix (one domain per stage), has the sign of cltk's mean forgetting: +BWT (a rise
    in perplexity is a loss). On accuracy-like figures, where higher is better, forgetting is -BWT."""
    ppl = [[5.0, 40.0, 30.0], [9.0, 6.0, 28.0], [10.0, 8.0, 4.0]]
    names = ["a", "b", "c"]
    r = forgetting_report(ppl, names, names, names)
    t = len(ppl) - 1
    bwt = sum(ppl[t][i] - ppl[i][i] for i in range(t)) / t
    assert bwt == pytest.approx(3.5) and r.mean_forgetting == pytest.approx(+bwt)
