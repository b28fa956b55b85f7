"""Replay (``replay:``): a share of every step drawn from earlier stages' training data.

Here: the config section and its checks; the hooks are in :mod:`.method`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cltk.config import ConfigError, RunConfig, option
from cltk.registry import MethodSpec, register


@dataclass
class ReplayConfig:
    share: float = option("share r of each batch drawn from earlier domains' training data", 0.0)


def check(cfg: RunConfig, r: ReplayConfig) -> None:
    if not 0 <= r.share < 1:
        raise ConfigError("replay.share", f"must be in [0, 1), got {r.share}")


def build(cfg: RunConfig, section: ReplayConfig) -> Any:
    from cltk.methods.replay.method import ReplayMethod

    return ReplayMethod(cfg, section)


SPEC = register(
    MethodSpec(
        name="replay",
        config=ReplayConfig,
        build=build,
        help="replay of earlier domains",
        check=check,
        active=lambda r: r.share > 0,
        order=5,
    )
)
