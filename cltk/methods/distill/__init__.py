"""Distillation from the previous stage (``distill:``): ``alpha * KL + beta * CE`` against the previous
stage's export, from the second stage on. The hooks are in :mod:`.method`."""

from __future__ import annotations

from dataclasses import dataclass

from cltk.config import ConfigError, RunConfig, option
from cltk.methods.kit.soft_losses import check_distillation_args
from cltk.registry import MethodSpec, register


@dataclass
class DistillConfig:
    alpha: float = option("weight of KL(teacher || student)", 1.0)
    beta: float = option("weight of the cross-entropy on the labels", 1.0)
    temperature: float = option("softmax temperature of the KL term", 1.0)


def check(cfg: RunConfig, d: DistillConfig) -> None:
    try:
        check_distillation_args(d.alpha, d.beta, d.temperature)
    except ValueError as e:
        raise ConfigError("distill", str(e)) from e



SPEC = register(MethodSpec("distill", DistillConfig, "cltk.methods.distill.method:DistillMethod",
                           "distillation from the previous stage", check,
                           replaces_loss=lambda d: True,
                           previous_domain_teacher=lambda d: "distill", order=30))
