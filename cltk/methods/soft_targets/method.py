"""Incremental soft-target blocks: the loss method.

:class:`SoftTargetMethod` (``blocks.k > 1``): each domain's training data is split into ``k`` seeded
blocks, one stage each (``cltk.plan``). The first stage trains with plain cross-entropy; every later
stage ``i`` trains against soft targets from its teacher ``M_(i-1)``, the previous stage's export:
the teacher's distribution moved so the correct token holds at least ``blocks.p``
(:func:`cltk.methods.kit.soft_losses.soft_target_loss`). With ``blocks.across_domains: false`` the first block of
every domain uses plain cross-entropy instead. ``blocks.teacher`` picks the online teacher
(:class:`cltk.methods.kit.teacher.OnlineTeacher`, run beside the student) or the offline top-k cache
(:mod:`cltk.methods.soft_targets.teacher_cache`, one teacher pass before the stage trains).

It combines with replay: replay rows are part of the micro-batch, so the teacher scores them too
(and the offline cache holds them). The loss hook also reports ``teacher_p_label``, the teacher's
mean probability of the correct token, in ``metrics.csv`` (``extra``; rank 0's micro-batches).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cltk import distributed as dist
from cltk.config import RunConfig
from cltk.method import Method, StageContext
from cltk.methods.kit.soft_losses import (
    check_soft_target_args,
    soft_target_loss,
    soft_target_loss_topk,
)
from cltk.methods.kit.teacher import OnlineTeacher, audit_teacher, checkpoint_key, mean_label_prob
from cltk.methods.soft_targets import BlocksConfig
from cltk.methods.soft_targets.teacher_cache import (
    CacheKeys,
    TeacherCache,
    build_cache,
    cache_exists,
    data_key,
)
from cltk.tracking import log

__all__ = ["SoftTargetMethod", "cache_dir", "open_or_build_cache", "stage_rows"]


def stage_rows(ctx: StageContext) -> np.ndarray:
    """``[n, T]`` int32 token ids of every distinct sequence the stage's schedule trains (its block
    and any mixed rows: replay, general data, a reservoir), in (source, index) order."""
    sched = ctx.schedule
    items = sorted({it for step in range(len(sched)) for it in sched.global_step(step)})
    return ctx.rows(items).astype(np.int32)


def cache_dir(ctx: StageContext):
    """``OUT/teacher_cache/<stage dir name>``: outside the stage directory, which the stage's export
    replaces whole."""
    return ctx.cfg.out / "teacher_cache" / ctx.stage.dirname


class SoftTargetMethod(Method):
    """Soft targets from the previous stage for every stage but the first (see the module doc).

    Args:
        cfg: the run config; its ``blocks`` section gives ``p``, ``one_hot_below``, ``teacher``,
            ``topk`` and ``across_domains``.
    """

    name = "soft_targets"

    def __init__(self, cfg: RunConfig, section: BlocksConfig | None = None):
        self.cfg, self.b = cfg, section if section is not None else cfg.blocks
        if self.b is None:
            raise ValueError("SoftTargetMethod needs the blocks section (blocks: {k: 4, p: 0.9})")
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
            return loss, {"teacher_p_label": mean_label_prob(label_lp, labels)}
        if self.cache is not None:
            top_lp, top_ix, label_lp = self.cache.lookup(batch["input_ids"])
            loss = soft_target_loss_topk(logits, labels, top_lp.to(logits.device),
                                         top_ix.to(logits.device), label_lp.to(logits.device),
                                         p=self.b.p, one_hot_below=self.b.one_hot_below)
            return loss, {"teacher_p_label": mean_label_prob(label_lp, labels)}
        return None

    def on_stage_end(self, ctx: StageContext) -> None:
        if self.teacher is not None:
            audit_teacher(ctx, self.teacher, "end")
            self.teacher.close()
        self.teacher = self.cache = None


def open_or_build_cache(ctx: StageContext, topk: int):
    """The stage's offline teacher cache: reused when complete and matching, built when absent
    (collective), refused (:class:`~cltk.methods.soft_targets.teacher_cache.StaleCacheError`) when built for another
    teacher or other data."""
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
