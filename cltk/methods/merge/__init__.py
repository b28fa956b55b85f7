"""Weight merging between stages (``merge:``): at the end of each stage its result becomes
``(1 - alpha) * before + alpha * after`` (``before``: the weights the stage started from, ``after``:
what it trained), or, with ``mode: mean``, the running mean of every stage's result; that merged
model is the stage's export, what it is evaluated as, and what the next stage starts from.

Here: the config section and its checks; the hooks are in :mod:`.method`, the arithmetic on this
rank's ZeRO partitions in :mod:`cltk.methods.kit.weight_average`; docs/merge.md says what it costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cltk.config import ConfigError, RunConfig, option
from cltk.registry import MethodSpec, register


@dataclass
class MergeConfig:
    alpha: float = option(
        "mode fixed: the stage's result becomes (1 - alpha) * before + alpha * after (1: no merge)",
        0.5,
    )
    mode: Literal["fixed", "mean"] = option(
        "fixed: alpha every stage; mean: the running mean of every stage's result (alpha = 1/i at "
        "stage i)",
        "fixed",
    )
    count_start: bool = option(
        "mode mean: count the starting model as one of the averaged models (alpha = 1/(i+1))", False
    )

    def weight(self, stage_index: int) -> float:
        """alpha at the stage of 0-based ``stage_index``: the weight of what it trained."""
        if self.mode == "fixed":
            return float(self.alpha)
        return 1.0 / (stage_index + 1 + int(self.count_start))


def check(cfg: RunConfig, m: MergeConfig) -> None:
    if not 0 < m.alpha <= 1:
        raise ConfigError(
            "merge.alpha", f"must be in (0, 1] (the weight of the stage's result), got {m.alpha}"
        )
    if m.mode == "mean" and m.alpha != 0.5:
        raise ConfigError("merge.alpha", "mode mean sets the weights itself: leave alpha out")
    from cltk.methods.kit.weight_average import check_averaging

    check_averaging(cfg, "merge")


SPEC = register(
    MethodSpec(
        "merge",
        MergeConfig,
        "cltk.methods.merge.method:MergeMethod",
        "weight merging between stages: (1 - alpha) * before + alpha * after, or the mean",
        check,
        order=90,
    )
)
