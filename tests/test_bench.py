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
from cltk.bench.arms import ARMS, TIERS, overrides
from cltk.validate import load_config

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
    """Each arm's overrides load on each tier's config (the bench would otherwise fail mid-way)."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=4, max_position_embeddings=256).save_pretrained(tmp_path)
    for tier in TIERS.values():
        for arm in tier.arms:
            sets = overrides(arm, tier)
            if tier.base:  # the arms continue the base's export (any model directory loads here)
                sets = [f"model.init_from={tmp_path}", f"tokenizer.path={tmp_path}", *sets]
            load_config(ROOT / "examples" / "bench" / tier.config, overrides=sets, world_size=1)
    assert set(TIERS["small"].arms) == set(ARMS)


TINY = ["--set", "data.seq_len=32", "--set", "data.eval_sequences=4", "--set", "eval.batch_size=4"]
TINY_BASE = [x for kv in ("model.config.hidden_size=32", "model.config.intermediate_size=64",
                          "model.config.num_hidden_layers=2", "model.config.num_attention_heads=4",
                          "model.config.num_key_value_heads=2", "tokenizer.train.vocab_size=400",
                          "train.max_steps_per_stage=3", "data.seq_len=32", "data.eval_sequences=4")
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
    # the arms continued the base: their row 0 is the base's export on the general domain
    base = json.loads((out / "base-s1" / "forgetting.json").read_text())
    naive = json.loads((out / "naive-s1" / "forgetting.json").read_text())
    assert naive["start"][0] == pytest.approx(base["perplexity"][0][0], rel=1e-4)
    assert naive["eval_only_domains"] == ["general"]
    md = (tmp_path / "docs" / "bench.md").read_text()
    assert "| **naive** |" in md and "| **joint** |" in md and "+0.0%" in md
    assert "--arms naive joint" in md and "torch " in md
    figures = tmp_path / "docs" / "figures" / "bench"  # named after the page
    assert {p.name for p in figures.iterdir()} == {"summary.png", "naive.png", "joint.png"}
