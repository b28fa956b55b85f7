"""Incremental soft-target blocks (``blocks:``): each domain split into ``k`` stages, every stage after the
first trained against its predecessor's soft targets, moved so the correct token holds at least ``p``.

Here: the config section and its checks; the hooks are in :mod:`.method`, the offline top-k teacher cache
in :mod:`.teacher_cache`, the transformers ``Trainer`` door in :mod:`.hf_trainer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cltk.config import ConfigError, RunConfig, option
from cltk.methods.kit.soft_losses import check_soft_target_args
from cltk.registry import MethodSpec, register


@dataclass
class BlocksConfig:
    k: int = option("number of incremental blocks each domain is split into", 1)
    p: float = option("mass the correct token holds at least in the soft targets", 0.9)
    one_hot_below: float | None = option(
        "one-hot target where the teacher gives y less than this", None
    )
    teacher: Literal["online", "offline"] = option(
        "run the teacher beside the student, or cache top-k", "online"
    )
    topk: int = option("log-probs per token kept by the offline teacher cache", 64)
    across_domains: bool = option(
        "the first block of a domain learns from the previous domain's model", True
    )


def check(cfg: RunConfig, b: BlocksConfig) -> None:
    if b.k < 1:
        raise ConfigError("blocks.k", f"must be > 0, got {b.k}")
    try:
        check_soft_target_args(b.p, b.one_hot_below)
    except ValueError as e:
        key = "blocks.p" if "soft target p" in str(e) else "blocks.one_hot_below"
        raise ConfigError(key, str(e)) from e
    if b.topk < 1:
        raise ConfigError("blocks.topk", f"must be > 0, got {b.topk}")



def _across_domains(b: BlocksConfig) -> str | None:
    """A domain's first block learns from the previous domain's model."""
    return "blocks.across_domains" if b.across_domains else None


SPEC = register(MethodSpec("blocks", BlocksConfig,
                           "cltk.methods.soft_targets.method:SoftTargetMethod",
                           "incremental soft-target blocks", check, active=lambda b: b.k > 1,
                           replaces_loss=lambda b: b.k > 1, stages_per_domain=lambda b: b.k,
                           fixed_on_resume=True,
                           previous_domain_teacher=_across_domains,
                           run_files=("teacher_cache",), order=20))
