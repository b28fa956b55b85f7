"""Distillation from the previous stage (``distill``): from the second stage on, the loss is
``alpha * T^2 * KL(teacher_T || student_T) + beta * CE`` against the previous stage's export
(:func:`cltk.methods.kit.soft_losses.distillation_loss`), with the online teacher (:class:`cltk.methods.kit.teacher.OnlineTeacher`).
Replay rows are part of the micro-batch, so the teacher scores them too. The loss hook reports
``teacher_p_label``, the teacher's mean probability of the correct token, in ``metrics.csv``.
"""

from __future__ import annotations

from typing import Any

import torch

from cltk.config import RunConfig
from cltk.method import Method, StageContext
from cltk.methods.distill import DistillConfig
from cltk.methods.kit.soft_losses import check_distillation_args, distillation_loss
from cltk.methods.kit.teacher import OnlineTeacher, audit_teacher, label_logprobs, mean_label_prob
from cltk.tracking import log


class DistillMethod(Method):
    """Distillation from the previous stage's export (online teacher); the first stage is plain CE.

    Args:
        cfg: the run config; its ``distill`` section gives ``alpha``, ``beta`` and ``temperature``.
    """

    name = "distill"

    def __init__(self, cfg: RunConfig, section: DistillConfig | None = None):
        self.cfg, self.d = cfg, section if section is not None else cfg.distill
        if self.d is None:
            raise ValueError("DistillMethod needs the distill section (distill: {alpha: 1.0})")
        check_distillation_args(self.d.alpha, self.d.beta, self.d.temperature)
        self.teacher: Any = None

    def on_engine_ready(self, ctx: StageContext) -> None:
        if ctx.prev_stage_dir is None:
            log(f"stage {ctx.stage.dirname}: plain cross-entropy (first stage: no teacher)")
            return
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
        label_lp = label_logprobs(t, labels.clamp_min(0))
        return loss, {"teacher_p_label": mean_label_prob(label_lp, labels)}

    def on_stage_end(self, ctx: StageContext) -> None:
        if self.teacher is not None:
            audit_teacher(ctx, self.teacher, "end")
            self.teacher.close()
        self.teacher = None
