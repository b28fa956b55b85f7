"""``cltk bench``: the page's figures from known results (the joint gap and the step ratio read against the
same seed, means and half-spreads), and one real tiny bench that is killed in an arm and continued."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cltk.bench import page
from cltk.bench.arms import ARMS, TIERS
from cltk.bench.sources import check_general_apart, tier_files
from cltk.data.windows import apportion
from cltk.errors import UserError
from tests.kit import model_sets

ROOT = Path(__file__).resolve().parents[1]


def _result(final: float, forgetting: float | None, step_s: float, lost: float, rss: float) -> dict:
    rep = {"average_final_perplexity": final, "mean_forgetting": forgetting, "mean_plasticity": 10.0,
           "mean_relative_start_forgetting": lost, "domain_names": ["a", "b"], "start": [50.0, 60.0],
           "stage_names": ["a", "b"], "perplexity": [[10.0, 40.0], [final, 10.0]]}
    return {"report": rep, "step_s": step_s, "tokens_per_s": 1000.0 / step_s, "ranks": 2,
            "steps": 8, "peak_rss_mb": rss, "peak_device_mb": None, "parameters": 10**9,
            "precision": "fp32"}


def test_the_page_reads_every_arm_against_naive_and_joint_of_the_same_seed(tmp_path):
    results = {
        "naive": {1: _result(30.0, 20.0, 1.0, 0.5, 900), 2: _result(40.0, 30.0, 2.0, 0.7, 1000)},
        "joint": {1: _result(20.0, None, 1.0, 0.1, 900), 2: _result(25.0, None, 2.0, 0.3, 1000)},
        "replay": {1: _result(24.0, 4.0, 1.1, 0.2, 950), 2: _result(30.0, 6.0, 2.4, 0.4, 1050)},
    }
    rows = {r["arm"]: r for r in page.summary_rows(results, [1, 2])}
    # gap to joint per seed: 24/20 - 1 = 20%, 30/25 - 1 = 20%; step ratio 1.1 and 1.2 against naive
    assert rows["replay"]["gap"] == pytest.approx([20.0, 20.0])
    assert rows["replay"]["step"] == pytest.approx([1.1, 1.2])
    assert rows["naive"]["gap"] == pytest.approx([50.0, 60.0])
    assert rows["replay"]["per_rank"] == pytest.approx([1000 / 1.1 / 2, 1000 / 2.4 / 2])
    md = page.table(list(rows.values()))
    assert "| **replay** | 27.0 ± 3.0 | +5.0 ± 1.0 | 10.0 ± 0.0 | +30.0 ± 10.0% | +20.0 ± 0.0% |" in md
    # 6 x 1e9 parameters x 1000/1.1/2 tokens/s per rank (seed 1), x 1000/2.4/2 (seed 2)
    assert rows["replay"]["tflops"] == pytest.approx([6e-3 * 1000 / 1.1 / 2, 6e-3 * 1000 / 2.4 / 2])
    assert "| 1.15 ± 0.05x | 1000 ± 50 |" in md and "| **joint** |" in md
    assert "device" not in md and "MFU" not in md
    m = page.matrix(results["naive"], [1, 2])
    assert "| start | 50.0 ± 0.0 | 60.0 ± 0.0 |" in m and "| b | 35.0 ± 5.0 | 10.0 ± 0.0 |" in m
    page.summary_plot(list(rows.values()), tmp_path / "s.png", "t")
    assert (tmp_path / "s.png").stat().st_size > 5000


def test_every_arm_is_a_valid_config_of_its_tier(tmp_path):
    """Each arm's overrides load on each tier's config (the bench would otherwise fail mid-way): the
    check the bench itself runs before its first run (the base's model stands in for its export)."""
    from cltk.bench.run import BenchArgs, check_configs
    from cltk.errors import UserError

    for tier in TIERS.values():
        check_configs(BenchArgs(tier, tmp_path, [1], list(tier.arms)))
    assert set(TIERS["small"].arms) == set(ARMS)
    with pytest.raises(UserError, match="arm naive's config is refused before any run: train.lrr"):
        check_configs(BenchArgs(TIERS["small"], tmp_path, [1], ["naive"], sets=["train.lrr=1"]))


@pytest.mark.parametrize("name", sorted(n for n, t in TIERS.items() if t.scored != "[]"))
def test_general_replay_reads_no_file_of_what_it_knew_is_measured_on(name):
    """Each tier's general replay sources and its evaluation-only domains, resolved to the files they
    read, are disjoint; the in-distribution arm's list is not (so the check can fail), and the bench
    refuses general data that reads an evaluation-only domain's files under another name."""
    tier = TIERS[name]
    general, held = tier_files(tier)
    assert general and held
    read = set().union(*general.values())
    for domain, files in held.items():
        assert files and not read & files, domain
    check_general_apart(tier)
    with pytest.raises(UserError, match="shares .* file"):
        check_general_apart(tier, tier.scored)
    with pytest.raises(UserError, match="evaluation-only domain"):  # the same data, another name
        check_general_apart(tier, "[{name: py, source: {mix: [{builtin: pydoc, weight: 1}, "
                                  "{builtin: stdlib, weight: 1}]}}]")
    assert any("{scored}" in o for a in tier.arms for o in ARMS[a][0])  # the in-distribution arm


def _parts(cfg: dict, domain: str) -> list[tuple[dict, int, int]]:
    """``(source, max_chars, eval windows)`` of each part of a domain, as cltk packs them."""
    d = next(d for d in cfg["domains"] if d["name"] == domain)
    items = d["source"]["mix"]
    weights = [i["weight"] for i in items]
    return [({k: v for k, v in i.items() if k != "weight"}, b, e) for i, b, e in
            zip(items, apportion(weights, d["max_chars"]), apportion(weights, cfg["data"]["eval_sequences"]))]


def test_the_small_tier_scores_what_it_knew_on_documents_its_base_never_trained_on():
    """The evaluation-only parts are packed as the base packs the same parts (same index, budget and
    held-out windows, same seed and tokenizer), so their held-out documents are the base's."""
    import yaml

    base = yaml.safe_load((ROOT / "examples" / "bench" / "small_base.yaml").read_text())
    tier = yaml.safe_load((ROOT / "examples" / "bench" / "small.yaml").read_text())
    known = _parts(tier, "code-manpages")
    assert _parts(base, "general")[: len(known)] == known
    assert base["data"]["seq_len"] == tier["data"]["seq_len"]


TINY = ["--set", "data.seq_len=32", "--set", "data.eval_sequences=4", "--set", "eval.batch_size=4"]
TINY_BASE = [x for kv in (*model_sets(), "tokenizer.train.vocab_size=400",
                          "train.max_steps_per_stage=3", "data.seq_len=32", "data.eval_sequences=6")
             for x in ("--base-set", kv)]


def test_a_bench_killed_in_an_arm_continues_where_it_stopped(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "cltk", "bench", "--tier", "small", "--out", str(out), "--seeds", "1",
           "--arms", "naive", "joint", "--steps", "2", *TINY, *TINY_BASE,
           "--page", str(tmp_path / "docs" / "bench.md")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    killed = subprocess.run(cmd, env={**env, "CLTK_KILL_AT": "1:1"}, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == 2, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert "cltk: bench: naive seed 1 failed" in killed.stderr
    assert "[bench] base seed 1: done in" in killed.stdout  # the base has one stage: not killed
    assert not (out / "naive-s1" / "forgetting.json").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = done.stdout
    assert "[bench] base seed 1: done earlier, kept" in log
    # a progress line per arm and stage
    for line in ("naive seed 1: stage 00-shakespeare: perplexity", "naive seed 1: stage 02-licenses: "
                 "perplexity", "joint seed 1: stage 00-joint: perplexity"):
        assert f"[bench] {line}" in log, log[-3000:]
    # the arms continued the base, and what it knew is held out of the base's training: the evaluation-
    # only domain holds out the very documents the base held out of its code and man pages
    naive = json.loads((out / "naive-s1" / "forgetting.json").read_text())
    assert naive["eval_only_domains"] == ["code-manpages"]
    manifests = {m.parent.name.split("-")[0]: json.loads(m.read_text())
                 for m in (out / ".cache").glob("*/manifest.json")}
    base_parts, known = manifests["general"]["sources"], manifests["code"]["sources"]
    assert len(base_parts) == 3 and len(known) == 2
    for b, k in zip(base_parts, known):
        assert k["held_out"] and k["held_out"] == b["held_out"] and k["keep"] == b["keep"]
    md = (tmp_path / "docs" / "bench.md").read_text()
    assert "| **naive** |" in md and "| **joint** |" in md and "+0.0%" in md
    assert "--arms naive joint" in md and "torch " in md
    figures = tmp_path / "docs" / "figures" / "bench"  # named after the page
    assert {p.name for p in figures.iterdir()} == {"summary.png", "naive.png", "joint.png"}
