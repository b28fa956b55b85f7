"""Replay's hooks: every stage mixes ``share`` of each global batch from the earlier domains' training data
(uniformly over their sequences)."""

from __future__ import annotations

from typing import Any

import numpy as np

from cltk.config import RunConfig
from cltk.data.sampler import Pool
from cltk.method import Method, Mix, StageContext


class ReplayMethod(Method):
    name = "replay"

    def __init__(self, cfg: RunConfig, section: Any):
        self.cfg, self.r = cfg, section

    def mixes(self, ctx: StageContext) -> list[Mix]:
        names = [d.name for d in ctx.cfg.domains]
        earlier = sorted(
            {s.domain_index for s in ctx.stages[: ctx.stage.index] if s.domain != ctx.stage.domain}
        )
        pools = [Pool(i, np.arange(len(ctx.domains[names[i]].train))) for i in earlier]
        return [Mix("earlier domains", pools, self.r.share)] if pools else []
