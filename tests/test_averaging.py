"""merge: and ema: (docs/merge.md, docs/ema.md): their settings, and their arithmetic on real ranks
under ZeRO 1, 2 and 3 against exports merged by hand and a plain-torch EMA. Kill and resume through
the whole loop: tests/test_averaging_resume.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cltk.config import ConfigError
from cltk.methods.merge import MergeConfig
from cltk.validate import load_config
from tests.multirank import run_ranks
from tests.tiny_run import write_tiny_run

SCRIPT = Path(__file__).parent / "scripts" / "averaging_zero.py"


def test_merge_weights_fixed_and_running_mean():
    assert [MergeConfig(alpha=0.3).weight(i) for i in range(3)] == [0.3, 0.3, 0.3]
    assert [MergeConfig(mode="mean").weight(i) for i in range(3)] == [1.0, 0.5, 1 / 3]
    assert [MergeConfig(mode="mean", count_start=True).weight(i) for i in range(2)] == [0.5, 1 / 3]
    # the running mean: m_i = m_{i-1} + (x_i - m_{i-1}) / i is the mean of x_1..x_i
    xs, m = [4.0, 1.0, 7.0], 0.0
    for i, x in enumerate(xs):
        a = MergeConfig(mode="mean").weight(i)
        m = (1 - a) * m + a * x
    assert m == pytest.approx(sum(xs) / 3)


@pytest.mark.parametrize(
    "sections, ds, key, words",
    [
        ({"merge": {"alpha": 0.0}}, None, "merge.alpha", "(0, 1]"),
        ({"merge": {"alpha": 1.5}}, None, "merge.alpha", "(0, 1]"),
        ({"merge": {"mode": "mean", "alpha": 0.3}}, None, "merge.alpha", "leave alpha out"),
        ({"merge": {"mode": "median"}}, None, "merge.mode", "'fixed', 'mean'"),
        ({"ema": {"decay": 1.0}}, None, "ema.decay", "[0, 1)"),
        ({"ema": {"every": 0}}, None, "ema.every", ">= 1"),
        ({"merge": {}, "lora": {"r": 4}}, None, "merge", "adapter per domain"),
        ({"ema": {}, "lora": {"r": 4}}, None, "ema", "frozen base"),
        ({"ema": {}}, {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}, "ema",
         "ZeRO stage 1, 2 or 3"),
    ],
)
def test_bad_settings_are_refused_at_load_naming_the_key(tmp_path, sections, ds, key, words):
    cfg = write_tiny_run(tmp_path, **sections)
    if ds is not None:
        (tmp_path / "ds.json").write_text(json.dumps(ds))
    with pytest.raises(ConfigError) as e:
        load_config(cfg, world_size=1)
    assert str(e.value).startswith(f"{key}:") and words in str(e.value)


def test_good_settings_load(tmp_path):
    run = write_tiny_run(tmp_path, merge={"mode": "mean"}, ema={"decay": 0.95, "every": 2})
    cfg = load_config(run, world_size=1)
    assert cfg.sections["merge"].weight(1) == 0.5 and cfg.sections["ema"].every == 2


@pytest.mark.multirank
def test_two_ranks_under_zero_1_2_3(tmp_path):
    out = tmp_path / "averaging.json"
    run_ranks([SCRIPT, "--out", out, "--stages", "1", "2", "3"], world_size=2, timeout=600,
              env={"PYTHONPATH": str(SCRIPT.parents[2])})
    report = json.loads(out.read_text())
    assert report["world"] == 2 and [r["stage"] for r in report["results"]] == [1, 2, 3]
    for r in report["results"]:
        print(r)
        assert r["layout"] == ("zero3" if r["stage"] == 3 else "zero1/2"), r
        assert r["trained_rel_err"] < 5e-5 and r["moved"] > 1e-2, r  # trained like plain AdamW
        # merged: the hand interpolation of the two exports, to fp32 rounding, everywhere it lives
        for key in ("export", "master", "model", "forward"):
            assert r[f"merge_{key}_rel_err"] < 1e-6, (key, r)
        assert r["merge_model_equal_on_ranks"] and r["ema_model_equal_on_ranks"], r
        # EMA: the plain-torch EMA of the same steps (2 updates), not the last weights
        assert r["ema_updates"] == 2 and r["ema_vs_trained"] > 1e-2, r
        assert r["ema_export_rel_err"] < 5e-5 and r["ema_master_rel_err"] < 5e-5, r
        # memory: each rank holds half of the two copies (plus ZeRO's padding)
        assert r["state_bytes_rank"] < 2 * 4 * r["trainable"] * 0.55, r
