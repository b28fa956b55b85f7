"""The plan of a run: its stages, one per domain, or one per block when incremental blocks are on."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from cltk import registry
from cltk.config import RunConfig
from cltk.data.sampler import split_blocks


@dataclass(frozen=True)
class Stage:
    """One stage: a domain, or block ``block`` of ``blocks`` of a domain."""

    index: int
    domain: str
    domain_index: int
    block: int
    blocks: int
    indices: np.ndarray  # training sequences of the domain this stage trains
    # joint training (``train.joint``): (index, name) of every other domain mixed into this one stage
    joint: tuple[tuple[int, str], ...] = ()

    @property
    def name(self) -> str:
        if self.joint:
            return "joint"
        return self.domain if self.blocks == 1 else f"{self.domain}-b{self.block}"

    @property
    def trains(self) -> str | list[str]:
        """The domain the stage trains, or every domain of a joint stage (the forgetting report's
        ``stage_domains`` entry)."""
        return [self.domain, *(n for _, n in self.joint)] if self.joint else self.domain

    @property
    def dirname(self) -> str:
        return f"{self.index:02d}-{self.name}"


def plan_stages(cfg: RunConfig, train_sizes: dict[str, int]) -> list[Stage]:
    """Stages in training order. ``train_sizes`` maps each domain to its number of training sequences."""
    k = registry.stages_per_domain(cfg)
    stages: list[Stage] = []
    if cfg.train.joint:  # one stage: the first trained domain, every other one mixed in
        trained = [(di, d.name) for di, d in enumerate(cfg.domains) if not d.eval_only]
        (di, name), rest = trained[0], tuple(trained[1:])
        return [Stage(0, name, di, 0, 1, np.arange(train_sizes[name]), joint=rest)]
    for di, d in enumerate(cfg.domains):
        if d.eval_only:
            continue
        n = train_sizes[d.name]
        blocks = split_blocks(n, k, cfg.seed + di) if k > 1 else [np.arange(n)]
        for b, idx in enumerate(blocks):
            stages.append(Stage(len(stages), d.name, di, b, k, idx))
    return stages


def plan_record(stages: list[Stage]) -> dict:
    """The recorded split (written to OUT/plan.json): blocks are reproducible and auditable."""
    return {
        "stages": [
            {
                "index": s.index,
                "name": s.name,
                "domain": s.domain,
                **({"joint": [n for _, n in s.joint]} if s.joint else {}),
                "block": s.block,
                "blocks": s.blocks,
                "sequences": int(len(s.indices)),
                "indices_sha256": hashlib.sha256(
                    np.asarray(s.indices, np.int64).tobytes()
                ).hexdigest(),
            }
            for s in stages
        ]
    }


def plan_json(stages: list[Stage]) -> str:
    return json.dumps(plan_record(stages), indent=1)
