"""SPG on real DeepSpeed engines: 2 ranks under ZeRO 1, 2 and 3 against single-process references, and a
tiny ``cltk train`` run that saves the importance per stage and trains the next stage under it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.multirank import run_one, run_ranks
from tests.tiny_run import write_tiny_run

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


def test_train_run_saves_importance_per_stage_and_masks_the_next_stage(tmp_path):
    from transformers import AutoModelForCausalLM

    from cltk.methods.spg.sharded import load_full_importance

    cfg = write_tiny_run(
        tmp_path, zero_stage=2, spg={"importance_steps": 3},
        train={"max_steps_per_stage": 8, "lr": 1e-2},
    )
    proc = run_one(cfg, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "spg: code scored over its last 3 step(s)" in proc.stderr
    stages = sorted((tmp_path / "out" / "stages").iterdir())
    assert [d.name for d in stages] == ["00-code", "01-bible"]
    saved = torch.load(stages[0] / "methods_rank0.pt", weights_only=True)["spg"]
    assert "importance.0" in saved and not any(k.startswith("grad_sum") for k in saved)
    imp0, imp1 = load_full_importance(stages[0]), load_full_importance(stages[1])
    before = AutoModelForCausalLM.from_pretrained(str(stages[0]))
    after = dict(AutoModelForCausalLM.from_pretrained(str(stages[1])).named_parameters())
    params = dict(before.named_parameters())
    assert imp0.keys() == imp1.keys() == params.keys()
    for name, p in params.items():
        assert imp0[name].numel() == p.numel()
        assert 0 <= float(imp0[name].min()) and float(imp1[name].max()) <= 1
        assert bool((imp1[name] >= imp0[name]).all())  # accumulated by element-wise max
    assert any(not torch.equal(imp1[n], imp0[n]) for n in params)  # the second domain added some
    # stage 2 trained under stage 1's importance: important elements hardly moved
    moved = {"important": [], "free": []}
    for name, p in params.items():
        d = (after[name] - p).detach().abs().flatten()
        moved["important"].append(d[imp0[name] > 0.95])
        moved["free"].append(d[imp0[name] < 0.05])
    important = torch.cat(moved["important"]).mean()
    free = torch.cat(moved["free"]).mean()
    print(f"mean move: importance > 0.95 {important:.2e}, < 0.05 {free:.2e}")
    assert important < 0.15 * free, (important, free)
