"""DAS in a real 2-rank run: importance is saved per stage, accumulates by max, and protects units."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.multirank import run_ranks
from tests.tiny_run import write_tiny_run

pytestmark = pytest.mark.multirank


@pytest.mark.parametrize("zero", [2, 3])
def test_das_run_saves_accumulated_importance_and_slows_important_units(tmp_path, zero):
    from transformers import AutoModelForCausalLM

    from cltk.methods.das.masking import param_masks

    cfg = write_tiny_run(
        tmp_path,
        zero_stage=zero,
        das={"importance_samples": 16, "mask": "update"},
        train={"max_steps_per_stage": 8, "lr": 1e-2},
    )
    run_ranks(["cltk", "train", "--config", str(cfg)], module=True, timeout=900)
    stages = sorted((tmp_path / "out" / "stages").iterdir())
    imps = [load_file(str(d / "importance.safetensors")) for d in stages]
    for imp in imps:
        assert imp["heads"].shape == (2, 4) and imp["ffn"].shape == (2, 64)
        for t in imp.values():
            assert torch.isfinite(t).all() and t.min() >= 0 and t.max() <= 1
    for k in ("heads", "ffn"):  # accumulated by element-wise max
        assert (imps[1][k] >= imps[0][k]).all()
    # stage 1 trains under the importance saved by stage 0: important weights moved far less
    before = AutoModelForCausalLM.from_pretrained(str(stages[0]))
    after = AutoModelForCausalLM.from_pretrained(str(stages[1]))
    masks = param_masks(before, imps[0])
    moved = {"protected": [], "free": []}
    p_after = dict(after.named_parameters())
    for name, p in before.named_parameters():
        if name not in masks:
            continue
        m = masks[name].expand_as(p)
        d = (p_after[name] - p).abs()
        moved["protected"].append(d[m < 0.2])
        moved["free"].append(d[m > 0.8])
    protected = torch.cat(moved["protected"]).mean()
    free = torch.cat(moved["free"]).mean()
    assert protected < 0.35 * free, (protected, free)
