"""SoftTargetMethod / DistillMethod: which stages use a teacher, which loss each path computes, and
the teacher's DeepSpeed config (one process, fake teachers; the real 2-rank runs are in
tests/test_soft_targets_multirank.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cltk.method import StageContext
from cltk.methods.distill.method import DistillMethod
from cltk.methods.kit.soft_losses import distillation_loss, soft_target_loss
from cltk.methods.kit.teacher import teacher_ds_config
from cltk.methods.soft_targets.method import SoftTargetMethod
from cltk.methods.soft_targets.teacher_cache import (
    CacheKeys,
    TeacherCache,
    data_key,
    finalize,
    write_shard,
)
from cltk.plan import Stage
from cltk.validate import load_config
from tests.tiny_run import write_tiny_run

V, T, B = 40, 10, 3


class FakeTeacher:
    """Log-probs that depend on the current token only (the same for any batch layout)."""

    def __init__(self, sharp: float = 3.0):
        g = torch.Generator().manual_seed(0)
        self.table = F.log_softmax(sharp * torch.randn(V, V, generator=g), -1)

    def logprobs(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids[:, :-1]]

    def logits(self, ids: torch.Tensor) -> torch.Tensor:  # unnormalised, as a real model's
        return self.logprobs(ids) + 5.0

    def close(self) -> None:
        pass


def _cfg(tmp_path: Path, **sections):
    return load_config(write_tiny_run(tmp_path, **sections))


def _ctx(cfg, index: int, block: int, prev: Path | None) -> StageContext:
    stage = Stage(
        index, "bible" if index >= 2 else "code", 1 if index >= 2 else 0, block, 2, np.arange(4)
    )
    return StageContext(cfg, stage, [stage], {}, None, Path("/nonexistent"), prev)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    logits = torch.randn(B, T - 1, V, generator=g, requires_grad=True)
    return {"input_ids": ids}, logits, ids[:, 1:]


def test_which_stages_train_against_a_teacher(tmp_path):
    prev = Path("/runs/x/stages/00-code-b0")
    m = SoftTargetMethod(_cfg(tmp_path / "a", blocks={"k": 2}))
    assert not m.uses_teacher(_ctx(m.cfg, 0, 0, None))  # M0: plain CE
    assert m.uses_teacher(_ctx(m.cfg, 1, 1, prev))
    assert m.uses_teacher(_ctx(m.cfg, 2, 0, prev))  # first block of the next domain, across domains
    m = SoftTargetMethod(_cfg(tmp_path / "b", blocks={"k": 2, "across_domains": False}))
    assert not m.uses_teacher(_ctx(m.cfg, 2, 0, prev)) and m.uses_teacher(_ctx(m.cfg, 3, 1, prev))
    m = SoftTargetMethod(_cfg(tmp_path / "c", blocks={"k": 2, "p": 1.0}))
    assert not m.uses_teacher(_ctx(m.cfg, 1, 1, prev))  # p = 1 is one-hot: no teacher is run
    m.on_engine_ready(_ctx(m.cfg, 1, 1, prev))  # builds nothing (the dir does not even exist)
    assert m.loss(_ctx(m.cfg, 1, 1, prev), *_batch()) is None
    with pytest.raises(ValueError, match="must not exceed p"):  # refused before any stage trains
        SoftTargetMethod(_cfg(tmp_path / "d", blocks={"k": 2, "p": 0.5, "one_hot_below": 0.6}))


def test_online_loss_is_soft_target_loss_and_offline_full_vocab_matches_it(tmp_path):
    cfg = _cfg(tmp_path, blocks={"k": 2, "p": 0.5, "one_hot_below": 0.01})
    m = SoftTargetMethod(cfg)
    ctx = _ctx(cfg, 1, 1, Path("/prev"))
    batch, logits, labels = _batch()
    teacher = FakeTeacher()
    m.teacher = teacher
    loss, metrics = m.loss(ctx, batch, logits, labels)
    lp = teacher.logprobs(batch["input_ids"])
    ref = soft_target_loss(logits, labels, lp, p=0.5, one_hot_below=0.01)
    assert torch.allclose(loss, ref, rtol=1e-6)
    q_y = lp.gather(-1, labels.unsqueeze(-1)).exp().mean()
    assert float(metrics["teacher_p_label"]) == pytest.approx(float(q_y))
    (g_online,) = torch.autograd.grad(loss, logits)
    # the offline cache (fp16 log-probs, k = vocab) gives the same loss and gradient
    ids = batch["input_ids"].numpy()
    for k, close in ((V, True), (3, False)):
        keys = CacheKeys("t" * 64, data_key(ids), k, T, V)
        d = tmp_path / f"cache{k}"
        write_shard(d, keys, ids, teacher.logprobs, 0, 1, 2)
        finalize(d, keys, 1)
        m.teacher, m.cache = None, TeacherCache(d, keys)
        off, off_metrics = m.loss(ctx, batch, logits, labels)
        p_off, p_on = float(off_metrics["teacher_p_label"]), float(metrics["teacher_p_label"])
        assert p_off == pytest.approx(p_on, rel=1e-6)
        assert torch.allclose(off, loss, rtol=1e-4) == close  # top-3 drops real teacher mass
        if close:
            (g_off,) = torch.autograd.grad(off, logits)
            assert torch.allclose(g_off, g_online, atol=1e-5)
    m.on_stage_end(ctx)
    assert m.loss(ctx, batch, logits, labels) is None and m.cache is None


def test_distillation_loss_from_the_second_stage(tmp_path):
    cfg = _cfg(tmp_path, distill={"alpha": 0.7, "beta": 0.3, "temperature": 2.0})
    m = DistillMethod(cfg)
    batch, logits, labels = _batch(1)
    m.on_engine_ready(_ctx(cfg, 0, 0, None))  # stage 0: no teacher, plain CE
    assert m.loss(_ctx(cfg, 0, 0, None), batch, logits, labels) is None
    m.teacher = FakeTeacher()
    loss, _ = m.loss(_ctx(cfg, 1, 0, Path("/prev")), batch, logits, labels)
    ref = distillation_loss(
        logits, labels, m.teacher.logprobs(batch["input_ids"]), alpha=0.7, beta=0.3, temperature=2.0
    )
    assert torch.allclose(loss, ref, rtol=1e-6)
    with pytest.raises(ValueError, match="distill section"):
        DistillMethod(_cfg(tmp_path / "none"))


class FakeEngine:
    def __init__(self, zero: int, bf16: bool):
        self.zero, self.bf16 = zero, bf16

    def zero_optimization_stage(self) -> int:
        return self.zero

    def bfloat16_enabled(self) -> bool:
        return self.bf16

    def fp16_enabled(self) -> bool:
        return False


def test_teacher_is_partitioned_only_under_zero3_and_follows_the_student_precision(tmp_path):
    cfg = _cfg(tmp_path, blocks={"k": 2})
    ds3 = {
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": "cpu"},
            "offload_param": {"device": "cpu"},
        },
        "bf16": {"enabled": "auto"},
    }
    (tmp_path / "ds3.json").write_text(json.dumps(ds3))
    cfg.deepspeed = "ds3.json"
    z3 = teacher_ds_config(cfg, FakeEngine(3, bf16=True))
    assert z3["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu"}}
    assert z3["bf16"] == {"enabled": True} and "gradient_clipping" not in z3
    z0 = teacher_ds_config(cfg, FakeEngine(2, bf16=False))
    assert z0["zero_optimization"] == {"stage": 0} and z0["bf16"] == {"enabled": False}
    assert z0["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size
