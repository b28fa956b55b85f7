"""merge: and ema: through the whole loop on 2 ranks (ZeRO 2), killed mid-stage and resumed: the
resumed run ends with the same exports and perplexities as the uninterrupted one (EMA: its average,
laid out like each rank's partitions, travels in the checkpoint; merge: the weights each stage
started from are rebuilt from the previous export before the checkpoint loads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.multirank import train_killed, train_ranks
from tests.tiny_run import write_tiny_run

pytestmark = pytest.mark.multirank

# 6 steps per stage, a checkpoint after step 4, the kill after step 5 of the second stage
SECTIONS = dict(
    train={"checkpoint_every": 4, "lr": 1e-2},
    eval={"start": False},
    merge={"mode": "mean"},
    ema={"decay": 0.8, "every": 2},
)


def _export(out: Path, stage: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / "stages" / stage / "model.safetensors"))


def test_merge_and_ema_resume_exactly_after_a_kill(tmp_path):
    cache = tmp_path / "cache"
    ref = write_tiny_run(tmp_path / "ref", cache_dir=cache, **SECTIONS)
    run = train_ranks(ref)
    log = run.stdout + run.stderr
    assert "ema: stage 00-code: exported the average of 3 update(s)" in log
    assert "merge: stage 00-code: exported (1 - 1) * its start + 1 * its result" in log
    assert "merge: stage 01-bible: exported (1 - 0.5) * its start + 0.5 * its result" in log
    cut = write_tiny_run(tmp_path / "cut", cache_dir=cache, **SECTIONS)
    _, latest = train_killed(cut, "1:5")
    assert latest == "s01-step000004"
    out_ref, out_cut = ref.parent / "out", cut.parent / "out"
    halves = []
    for r in (0, 1):  # the checkpoint holds each rank's half of the average
        mid = torch.load(out_cut / "checkpoints" / latest / f"methods_rank{r}.pt", weights_only=True)
        assert {"average.0", "layout"} <= set(mid["ema"]) and not mid.get("merge")
        halves.append(mid["ema"]["average.0"])
    assert not torch.equal(halves[0], halves[1])
    train_ranks(cut, "--resume")
    a = json.loads((out_ref / "forgetting.json").read_text())["perplexity"]
    b = json.loads((out_cut / "forgetting.json").read_text())["perplexity"]
    for ra, rb in zip(a, b):
        assert ra == pytest.approx(rb, rel=1e-6, abs=1e-6)
    stages = sorted(p.name for p in (out_ref / "stages").iterdir())
    for stage in stages:
        ea, eb = _export(out_ref, stage), _export(out_cut, stage)
        for name, t in ea.items():
            torch.testing.assert_close(eb[name], t, rtol=1e-6, atol=1e-7, msg=name)
