"""LR schedules: shapes against hand-computed values, and spans across stages."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from cltk.config import ConfigError
from cltk.schedules import decay_curve, lr_multiplier, stage_lr_lambda
from cltk.validate import load_config
from tests.tiny_run import write_tiny_run


def train_cfg(**kw):
    base = dict(
        warmup_steps=2, schedule="cosine", min_lr_ratio=0.1, decay_share=0.25,
        decay_shape="linear", lr_span="stage",
    )
    return SimpleNamespace(**{**base, **kw})


def test_cosine_and_linear_warm_up_then_reach_the_floor_on_the_last_step():
    for shape in ("cosine", "linear"):
        lrs = [lr_multiplier(s, 10, 2, shape, 0.1) for s in range(10)]
        assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
        assert lrs[-1] == pytest.approx(0.1)
        assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    # halfway through the decay: cosine and linear both at the midpoint
    assert lr_multiplier(6, 11, 2, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_multiplier(6, 11, 2, "linear", 0.0) == pytest.approx(0.5)


def test_wsd_holds_the_peak_until_the_last_share_then_decays():
    total, share = 20, 0.25  # 5 decay steps (15..19, the last at the floor) after step 14
    lrs = [lr_multiplier(s, total, 2, "wsd", 0.1, share, "linear") for s in range(total)]
    assert lrs[2:15] == [1.0] * 13
    assert lrs[15:] == pytest.approx([0.1 + 0.9 * (1 - k / 5) for k in range(1, 6)])
    sq = [lr_multiplier(s, total, 2, "wsd", 0.0, share, "1-sqrt") for s in range(14, 20)]
    assert sq == pytest.approx([1 - math.sqrt(k / 5) for k in range(6)])
    assert decay_curve(0.5, "cosine") == pytest.approx(0.5)


def test_stage_span_rewarms_every_stage_and_run_span_continues():
    steps = [6, 4, 5]
    per_stage = train_cfg(lr_span="stage")
    firsts = [stage_lr_lambda(per_stage, steps, i)(0) for i in range(3)]
    assert firsts == pytest.approx([1 / 3] * 3)
    whole = train_cfg(lr_span="run")
    run = [stage_lr_lambda(whole, steps, i)(s) for i in range(3) for s in range(steps[i])]
    assert run == pytest.approx([lr_multiplier(s, 15, 2, "cosine", 0.1) for s in range(15)])
    assert run[6] < run[5] < 1.0  # stage 1 starts where stage 0 ended: no re-warm
    assert run[-1] == pytest.approx(0.1)
    # constant with a final cooldown: wsd over the run decays in the last stage only
    cool = train_cfg(lr_span="run", schedule="wsd", decay_share=0.2)
    lrs = [stage_lr_lambda(cool, steps, i)(s) for i in range(3) for s in range(steps[i])]
    assert lrs[2:12] == [1.0] * 10 and lrs[-1] == pytest.approx(0.1)


def test_bad_schedule_settings_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="train.decay_share"):
        load_config(write_tiny_run(tmp_path, train={"decay_share": 0.0}))
    with pytest.raises(ConfigError, match="train.lr_span"):
        load_config(write_tiny_run(tmp_path, train={"lr_span": "epoch"}))
