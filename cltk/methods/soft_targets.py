"""Incremental soft-target blocks and distillation from the previous stage: two loss methods.

:class:`SoftTargetMethod` (``blocks.k > 1``): each domain's training data is split into ``k`` seeded
blocks, one stage each (``cltk.plan``). The first stage trains with plain cross-entropy; every later
stage ``i`` trains against soft targets from its teacher ``M_(i-1)``, the previous stage's export:
the teacher's distribution moved so the correct token holds at least ``blocks.p``
(:func:`cltk.losses.soft_target_loss`). With ``blocks.across_domains: false`` the first block of
every domain uses plain cross-entropy instead. ``blocks.teacher`` picks the online teacher
(:class:`cltk.teacher.OnlineTeacher`, run beside the student) or the offline top-k cache
(:mod:`cltk.teacher_cache`, one teacher pass before the stage trains).

:class:`DistillMethod` (``distill``): from the second stage on, the loss is
``alpha * T^2 * KL(teacher_T || student_T) + beta * CE`` against the previous stage's export
(:func:`cltk.losses.distillation_loss`), with the online teacher.

Both combine with replay: replay rows are part of the micro-batch, so the teacher scores them too
(and the offline cache holds them). The loss hook also reports ``teacher_p_label``, the teacher's
mean probability of the correct token, in ``metrics.csv`` (``extra``; rank 0's micro-batches).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from cltk import distributed as dist
from cltk.config import RunConfig
from cltk.losses import (
    IGNORE_INDEX,
    check_distillation_args,
    check_soft_target_args,
    distillation_loss,
    soft_target_loss,
    soft_target_loss_topk,
)
from cltk.methods.base import Method, StageContext
from cltk.tracking import log

__all__ = ["DistillMethod", "SoftTargetMethod", "audit_teacher", "cache_dir", "stage_rows"]


def stage_rows(ctx: StageContext) -> np.ndarray:
    """``[n, T]`` int32 token ids of every distinct sequence the stage's schedule trains (its block
    and any replay rows), in (domain, index) order."""
    sched = ctx.schedule
    items = sorted({it for step in range(len(sched)) for it in sched.global_step(step)})
    names = [d.name for d in ctx.cfg.domains]
    parts = []
    for di in sorted({d for d, _ in items}):
        idx = [i for d, i in items if d == di]
        arr = ctx.domains[names[di]].train.with_format("numpy")
        parts.append(np.asarray(arr[idx]["input_ids"], dtype=np.int32))
    return np.concatenate(parts)


def cache_dir(ctx: StageContext):
    """``OUT/teacher_cache/<stage dir name>``: outside the stage directory, which the stage's export
    replaces whole."""
    return ctx.cfg.out / "teacher_cache" / ctx.stage.dirname


def audit_teacher(ctx: StageContext, teacher: Any, when: str) -> None:
    """With ``train.log_sequence_ids`` (the audit log), record which weights the stage's teacher held
    at ``when`` ("start" or "end") in ``<stage dir>/teacher.json``: the teacher's directory and the
    sha256 of its in-memory parameters (see :meth:`cltk.teacher.OnlineTeacher.weights_sha256`)."""
    if not ctx.cfg.train.log_sequence_ids:
        return
    digest = teacher.weights_sha256()
    record = ctx.extras.setdefault("teacher_audit", {"teacher_dir": str(teacher.model_dir)})
    record[f"sha256_{when}"] = digest
    if when == "end" and dist.is_main():
        ctx.stage_dir.mkdir(parents=True, exist_ok=True)
        (ctx.stage_dir / "teacher.json").write_text(json.dumps(record, indent=1))


def _mean_label_prob(label_logprobs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The teacher's mean probability of the label over the trained positions (``labels`` not
    ignored), a 0-dim tensor: the loop reads it after its own synchronisation, so no extra wait on the
    GPU is added here."""
    valid = labels != IGNORE_INDEX
    probs = label_logprobs.detach().float().exp()
    return (probs * valid).sum() / valid.sum().clamp_min(1)


def _label_logprobs(teacher_logits: torch.Tensor, labels: torch.Tensor,
                    rows: int = 1024) -> torch.Tensor:
    """log softmax(teacher_logits) at the labels ``[b, T-1]``, ``rows`` positions at a time (no
    ``[tokens, vocab]`` fp32 temporary)."""
    flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    y = labels.reshape(-1, 1)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    for s in range(0, flat.shape[0], rows):
        chunk = flat[s:s + rows].float()
        out[s:s + rows] = chunk.gather(1, y[s:s + rows]).squeeze(1) - torch.logsumexp(chunk, -1)
    return out.view(labels.shape)


class SoftTargetMethod(Method):
    """Soft targets from the previous stage for every stage but the first (see the module doc).

    Args:
        cfg: the run config; its ``blocks`` section gives ``p``, ``one_hot_below``, ``teacher``,
            ``topk`` and ``across_domains``.
    """

    name = "soft_targets"

    def __init__(self, cfg: RunConfig):
        if cfg.blocks is None:
            raise ValueError("SoftTargetMethod needs the blocks section (blocks: {k: 4, p: 0.9})")
        self.cfg, self.b = cfg, cfg.blocks
        check_soft_target_args(self.b.p, self.b.one_hot_below)  # fail before any stage trains
        self.teacher: Any = None  # OnlineTeacher, or None
        self.cache: Any = None  # TeacherCache, or None

    def uses_teacher(self, ctx: StageContext) -> bool:
        """Whether this stage trains against soft targets (else plain cross-entropy)."""
        if ctx.prev_stage_dir is None or self.b.p >= 1.0:
            return False  # p = 1 makes the target one-hot: no teacher to run
        return self.b.across_domains or ctx.stage.block > 0

    def on_engine_ready(self, ctx: StageContext) -> None:
        if not self.uses_teacher(ctx):
            why = ("first stage" if ctx.prev_stage_dir is None else "blocks.p = 1"
                   if self.b.p >= 1.0 else "first block of a domain (across_domains false)")
            log(f"stage {ctx.stage.dirname}: plain cross-entropy ({why})")
            return
        from cltk.teacher import OnlineTeacher

        if self.b.teacher == "online":
            self.teacher = OnlineTeacher(ctx.prev_stage_dir, self.cfg, ctx.engine)
            audit_teacher(ctx, self.teacher, "start")
            log(f"stage {ctx.stage.dirname}: soft targets (p={self.b.p}) from online teacher "
                f"{ctx.prev_stage_dir.name} (ZeRO {self.teacher.zero_stage})")
            return
        self.cache = open_or_build_cache(ctx, self.b.topk)
        log(f"stage {ctx.stage.dirname}: soft targets (p={self.b.p}) from teacher cache "
            f"{self.cache.dir} (top-{self.cache.keys.topk}, {len(self.cache)} sequences, "
            f"{self.cache.bytes_per_token:.0f} bytes/token)")

    def loss(self, ctx: StageContext, batch: dict[str, torch.Tensor], logits: torch.Tensor,
             labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]] | None:
        if self.teacher is not None:
            t = self.teacher.logits(batch["input_ids"]).to(logits.device)
            # the loss's one pass over the teacher also gives log q_y for the metric
            loss, label_lp = soft_target_loss(logits, labels, t, p=self.b.p,
                                              one_hot_below=self.b.one_hot_below,
                                              return_label_logprobs=True)
            return loss, {"teacher_p_label": _mean_label_prob(label_lp, labels)}
        if self.cache is not None:
            top_lp, top_ix, label_lp = self.cache.lookup(batch["input_ids"])
            loss = soft_target_loss_topk(logits, labels, top_lp.to(logits.device),
                                         top_ix.to(logits.device), label_lp.to(logits.device),
                                         p=self.b.p, one_hot_below=self.b.one_hot_below)
            return loss, {"teacher_p_label": _mean_label_prob(label_lp, labels)}
        return None

    def on_stage_end(self, ctx: StageContext) -> None:
        if self.teacher is not None:
            audit_teacher(ctx, self.teacher, "end")
            self.teacher.close()
        self.teacher = self.cache = None


def open_or_build_cache(ctx: StageContext, topk: int):
    """The stage's offline teacher cache: reused when complete and matching, built when absent
    (collective), refused (:class:`~cltk.teacher_cache.StaleCacheError`) when built for another
    teacher or other data."""
    from cltk.teacher import OnlineTeacher, checkpoint_key
    from cltk.teacher_cache import CacheKeys, TeacherCache, build_cache, cache_exists, data_key

    where = cache_dir(ctx)
    ids = stage_rows(ctx)
    # rank 0 hashes the teacher's weights and decides; the other ranks follow
    found = cache_exists(where) if dist.is_main() else None
    tkey = checkpoint_key(ctx.prev_stage_dir) if dist.is_main() else None
    tkey, found = dist.broadcast_object((tkey, found))
    vocab = int(ctx.engine.module.config.vocab_size)
    keys = CacheKeys(teacher=tkey, data=data_key(ids), topk=min(topk, vocab),
                     seq_len=int(ids.shape[1]), vocab=vocab)
    if not found:
        teacher = OnlineTeacher(ctx.prev_stage_dir, ctx.cfg, ctx.engine)
        try:
            manifest = build_cache(where, keys, ids, teacher.logprobs, ctx.cfg.eval.batch_size)
        finally:
            teacher.close()
        log(f"stage {ctx.stage.dirname}: teacher cache written: {manifest['rows']} sequences, "
            f"{manifest['bytes'] / 2**20:.1f} MiB, {manifest['bytes_per_token']:.0f} bytes/token")
    return TeacherCache(where, keys)


class DistillMethod(Method):
    """Distillation from the previous stage's export (online teacher); the first stage is plain CE.

    Args:
        cfg: the run config; its ``distill`` section gives ``alpha``, ``beta`` and ``temperature``.
    """

    name = "distill"

    def __init__(self, cfg: RunConfig):
        if cfg.distill is None:
            raise ValueError("DistillMethod needs the distill section (distill: {alpha: 1.0})")
        self.cfg, self.d = cfg, cfg.distill
        check_distillation_args(self.d.alpha, self.d.beta, self.d.temperature)
        self.teacher: Any = None

    def on_engine_ready(self, ctx: StageContext) -> None:
        if ctx.prev_stage_dir is None:
            log(f"stage {ctx.stage.dirname}: plain cross-entropy (first stage: no teacher)")
            return
        from cltk.teacher import OnlineTeacher

        self.teacher = OnlineTeacher(ctx.prev_stage_dir, self.cfg, ctx.engine)
        audit_teacher(ctx, self.teacher, "start")
        log(f"stage {ctx.stage.dirname}: distillation (alpha={self.d.alpha}, beta={self.d.beta}, "
            f"T={self.d.temperature}) from {ctx.prev_stage_dir.name} "
            f"(ZeRO {self.teacher.zero_stage})")

    def loss(self, ctx: StageContext, batch: dict[str, torch.Tensor], logits: torch.Tensor,
             labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]] | None:
        if self.teacher is None:
            return None
        t = self.teacher.logits(batch["input_ids"]).to(logits.device)
        loss = distillation_loss(logits, labels, t, alpha=self.d.alpha, beta=self.d.beta,
                                 temperature=self.d.temperature)
        label_lp = _label_logprobs(t, labels.clamp_min(0))
        return loss, {"teacher_p_label": _mean_label_prob(label_lp, labels)}

    def on_stage_end(self, ctx: StageContext) -> None:
        if self.teacher is not None:
            audit_teacher(ctx, self.teacher, "end")
            self.teacher.close()
        self.teacher = None
