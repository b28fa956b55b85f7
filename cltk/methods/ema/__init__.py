"""An exponential moving average of the weights during each stage (``ema:``): every ``every``
optimizer steps ``average <- decay * average + (1 - decay) * weights``, starting from the weights the
stage starts from; at the stage's end the average is the stage's export, what it is evaluated as and
what the next stage starts from (so also the next stage's distillation teacher).

Here: the config section and its checks; the hooks are in :mod:`.method`, the arithmetic on this
rank's ZeRO partitions in :mod:`cltk.methods.kit.weight_average`; docs/ema.md says what it costs.
"""

from __future__ import annotations

from dataclasses import dataclass

from cltk.config import ConfigError, RunConfig, option
from cltk.registry import MethodSpec, register


@dataclass
class EmaConfig:
    decay: float = option(
        "average <- decay * average + (1 - decay) * weights at each update (the average starts at "
        "the stage's starting weights)",
        0.9,
    )
    every: int = option("update the average every N optimizer steps", 1)


def check(cfg: RunConfig, e: EmaConfig) -> None:
    if not 0 <= e.decay < 1:
        raise ConfigError("ema.decay", f"must be in [0, 1) (0: the last weights), got {e.decay}")
    if e.every < 1:
        raise ConfigError("ema.every", f"must be >= 1 (optimizer steps), got {e.every}")
    from cltk.methods.kit.weight_average import check_averaging

    check_averaging(cfg, "ema")


SPEC = register(
    MethodSpec(
        "ema",
        EmaConfig,
        "cltk.methods.ema.method:EmaMethod",
        "an exponential moving average of the weights during each stage, exported as its model",
        check,
        order=80,  # before merge: merge then interpolates the stage's start with the average
    )
)
