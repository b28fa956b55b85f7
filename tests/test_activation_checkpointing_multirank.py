"""A 2-rank ZeRO-3 run with activation checkpointing, killed mid-stage and resumed, ends exactly where an
uninterrupted run without checkpointing ends (real deepspeed launches, CPU, gloo)."""

from __future__ import annotations

import json

import pytest

from tests.multirank import train_killed, train_ranks
from tests.test_train_multirank import SETTINGS, audit, report
from tests.tiny_run import write_tiny_run

pytestmark = pytest.mark.multirank


def test_zero3_with_checkpointing_resumes_like_an_uninterrupted_run_without_it(tmp_path):
    cache = tmp_path / "cache"
    ref = write_tiny_run(tmp_path / "ref", zero_stage=3, cache_dir=cache, train=SETTINGS)
    train_ranks(ref)
    cut = write_tiny_run(tmp_path / "cut", zero_stage=3, cache_dir=cache,
                         train={**SETTINGS, "activation_checkpointing": True})
    killed, _ = train_killed(cut, "1:3:1")
    assert "activation checkpointing on 2 layers" in killed.stdout, killed.stdout[-3000:]
    resumed = train_ranks(cut, "--resume")
    assert "resumed from checkpoint s01-step000002" in resumed.stdout
    for ra, rb in zip(report(ref)["perplexity"], report(cut)["perplexity"]):
        assert ra == pytest.approx(rb, rel=1e-6, abs=1e-6)
    for r in (0, 1):
        assert audit(cut, r) == audit(ref, r)
    for stage in sorted((cut.parent / "out" / "stages").iterdir()):
        record = json.loads((stage / "stage.json").read_text())
        assert record["activation_checkpointing"] is True
        assert record["optimizer"] == "torch AdamW for-loop"  # CPU: not fused
        assert record["attn_implementation"] == "sdpa"
