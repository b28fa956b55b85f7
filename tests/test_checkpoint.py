"""Atomic checkpoints: a crash mid-write leaves the last good checkpoint and ``latest`` as they were."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cltk import checkpoint


class FakeEngine:
    """Writes files like DeepSpeed's save_checkpoint; optionally dies half-way."""

    def __init__(self, fail: bool = False):
        self.fail = fail

    def save_checkpoint(self, root, tag, client_state, save_latest):
        assert save_latest is False and "universal_checkpoint_info" in client_state
        d = Path(root) / tag
        d.mkdir(parents=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"model")
        if self.fail:
            raise RuntimeError("disk full")
        (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"optim")


def state(step):
    return {"stage": 0, "step": step, "order": step}


def test_save_then_crash_mid_write_keeps_the_last_good_checkpoint(tmp_path):
    checkpoint.save(FakeEngine(), tmp_path, "s00-step000002", state(2), keep=2)
    assert checkpoint.latest_tag(tmp_path) == "s00-step000002"
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save(FakeEngine(fail=True), tmp_path, "s00-step000004", state(4), keep=2)
    assert checkpoint.latest_tag(tmp_path) == "s00-step000002"
    good = tmp_path / "s00-step000002"
    assert sorted(p.name for p in good.iterdir()) == sorted(
        [
            "mp_rank_00_model_states.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "rng_rank0.pt",
            checkpoint.STATE_FILE,
        ]
    )
    assert not (tmp_path / "s00-step000004").exists()
    # the next save clears the half-written leftover and completes
    checkpoint.save(FakeEngine(), tmp_path, "s00-step000004", state(4), keep=2)
    assert checkpoint.latest_tag(tmp_path) == "s00-step000004"
    assert not (tmp_path / ".tmp-s00-step000004").exists()


def test_pruning_keeps_the_newest_and_latest_must_be_complete(tmp_path):
    for step in (2, 4, 6):
        checkpoint.save(FakeEngine(), tmp_path, f"s00-step{step:06d}", state(step), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [
        "s00-step000004",
        "s00-step000006",
    ]
    assert (
        json.loads((tmp_path / "s00-step000006" / checkpoint.STATE_FILE).read_text())["step"] == 6
    )
    (tmp_path / "latest").write_text("s00-step000002")
    with pytest.raises(RuntimeError, match="missing or incomplete"):
        checkpoint.latest_tag(tmp_path)


def test_rng_round_trip():
    import random

    import torch

    s = checkpoint.rng_state()
    a = (random.random(), torch.rand(3))
    checkpoint.set_rng_state(s)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_keep_counts_stage_end_checkpoints_too(tmp_path):
    """``train.keep_checkpoints`` bounds the disk: an old stage-end checkpoint goes like any other (a later
    stage starts from the previous stage's export, which is kept, never from its checkpoint)."""
    tags = ["s00-end", "s01-step000002", "s01-end", "s02-end"]
    for order, tag in enumerate(tags):
        checkpoint.save(FakeEngine(), tmp_path, tag, {"stage": 0, "step": 1, "order": order}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["s01-end", "s02-end"]
    assert checkpoint.latest_tag(tmp_path) == "s02-end"
