"""SPG on real DeepSpeed engines: 2 ranks under ZeRO 1, 2 and 3 against single-process references, and a
tiny ``cltk train`` run that saves the importance per stage and trains the next stage under it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.multirank import run_ranks

pytestmark = pytest.mark.multirank
SCRIPT = Path(__file__).parent / "scripts" / "spg_zero.py"


def test_spg_importance_and_masked_steps_under_zero_1_2_3_on_two_ranks(tmp_path):
    """One launch, three ZeRO stages in turn (see the script): the importance merged from both ranks'
    partitions equals the single-process whole-tensor reference, and every element of the next engine's
    masked step moved (1 - importance) times as far as the free step."""
    out = tmp_path / "spg.json"
    run_ranks([SCRIPT, "--out", out], timeout=600)
    data = json.loads(out.read_text())
    assert data["world"] == 2
    by_stage = {r["stage"]: r for r in data["results"]}
    assert sorted(by_stage) == [1, 2, 3]
    for stage, r in by_stage.items():
        print(f"ZeRO {stage}: {r}")
        assert r["layout"] == ("zero3" if stage == 3 else "zero1/2")
        assert r["params"] == 35  # every trainable tensor has importance
        assert r["imp_err"] < 1e-5, r
        assert r["imp_min"] < 0.01 and r["imp_max"] > 0.99  # the blend is tested over [0, 1]
        # Adam's first step moves every weight about lr: the miss is float rounding, not a share of it
        assert r["free_max"] > 0.5 and r["move_err"] < 1e-4, r
        # sharded: each rank blends about half the ~23.6k elements (ZeRO 3 pads the odd-sized biases)
        assert 11_500 < r["masked_numel_rank"] < 12_500, r


# The whole loop (2 ranks, with EWC, kill and resume): tests/test_method_state_resume.py
