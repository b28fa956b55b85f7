"""A-GEM's hooks: the memory grows by a seeded sample of each finished stage; every step of a later stage
takes the reference gradient on a memory batch and projects the step's gradient against it.

The first stage has no memory and trains plainly. Per stage the method counts the steps it took a
reference gradient on and the steps it projected (in its JSON state: ``stage.json`` and
checkpoints), and logs them when the stage ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cltk import distributed as dist
from cltk.config import ConfigError, RunConfig
from cltk.method import Method, Mix, StageContext
from cltk.methods.agem.memory import memory_batch, stage_sample, too_small
from cltk.methods.kit.zero_view import LayoutError
from cltk.tracking import log

if TYPE_CHECKING:  # the package imports this module on use: no import back at run time
    from cltk.methods.agem import AgemConfig


class AgemMethod(Method):
    name = "agem"

    def __init__(self, cfg: RunConfig, section: AgemConfig):
        self.cfg, self.a = cfg, section
        # one entry per finished stage, in stage order: {"stage", "name", "domain", "sequences"}
        self.memory: list[dict[str, Any]] = []
        # per stage name: {"reference_steps": n, "projected_steps": m}
        self.counts: dict[str, dict[str, int]] = {}
        self.projector: Any = None
        self.pool: list[tuple[str, int]] = []
        self._rows: dict[str, Any] = {}

    # ----- the memory ---------------------------------------------------------------------------
    def _check_sizes(self, ctx: StageContext) -> None:
        """A memory larger than a remembered stage's data is refused with the key's name."""
        # the last stage is never recalled: its size does not matter
        sizes = {s.name: len(s.indices) for s in ctx.stages[:-1]}
        small = too_small(sizes, self.a.memory)
        if small is not None:
            name, n = small
            raise ConfigError(
                "agem.memory",
                f"{self.a.memory} sequences per earlier stage, but stage {name} has only {n} training "
                f"sequences; set agem.memory to at most {min(sizes.values())}",
            )

    def _remember(self, ctx: StageContext) -> None:
        """Add (or, on a resumed stage end, replace) this stage's sample to the memory."""
        s = ctx.stage
        picked = stage_sample(self.cfg.seed, s.index, s.indices, self.a.memory)
        entry = {"stage": s.index, "name": s.name, "domain": s.domain,
                 "sequences": [int(i) for i in picked]}
        self.memory = [m for m in self.memory if m["stage"] != s.index] + [entry]
        self.memory.sort(key=lambda m: m["stage"])

    def _batches(self, ctx: StageContext) -> list[torch.Tensor]:
        """This rank's share of the step's memory batch, in micro-batches of ``train.micro_batch_size``."""
        size = self.a.batch_size(self.cfg)
        picks = memory_batch(len(self.pool), self.cfg.seed, ctx.stage.index, ctx.step, dist.rank(),
                             dist.world_size(), size)
        rows = []
        for p in picks:
            domain, i = self.pool[int(p)]
            if domain not in self._rows:
                self._rows[domain] = ctx.domains[domain].train.with_format("numpy")
            rows.append(np.asarray(self._rows[domain][[i]]["input_ids"], dtype=np.int64)[0])
        ids = torch.as_tensor(np.stack(rows))
        mb = self.cfg.train.micro_batch_size
        return [ids[i : i + mb] for i in range(0, len(ids), mb)]

    # ----- hooks --------------------------------------------------------------------------------
    def mixes(self, ctx: StageContext) -> list[Mix]:
        # the first hook of a stage, called before its model is built: the memory's size is checked
        # against the plan here, before any training. A-GEM mixes nothing into the batches.
        self._check_sizes(ctx)
        return []

    def on_engine_ready(self, ctx: StageContext) -> None:
        from cltk.methods.agem.reference import AgemProjector

        self.projector, self.pool = None, []
        try:  # on every stage, the first included: an engine A-GEM cannot read fails before training
            projector = AgemProjector(ctx.engine)
        except LayoutError as e:
            raise ConfigError("deepspeed", f"agem: {e}") from e
        earlier = [m for m in self.memory if m["stage"] < ctx.stage.index]
        if not earlier:
            return  # the first stage: nothing to remember yet, plain training
        self.projector = projector
        self.pool = [(m["domain"], i) for m in earlier for i in m["sequences"]]
        self.counts.setdefault(ctx.stage.name, {"reference_steps": 0, "projected_steps": 0})
        log(
            f"agem: stage {ctx.stage.dirname}: memory of {len(self.pool)} sequences from "
            f"{len(earlier)} earlier stage(s), {self.a.batch_size(self.cfg)} per rank per step; "
            f"g_ref {projector.ref_bytes / 2**20:.1f} MiB on this rank"
        )

    def before_step(self, ctx: StageContext) -> None:
        if self.projector is not None:
            self.projector.capture(self._batches(ctx))

    def after_backward(self, ctx: StageContext) -> None:
        if self.projector is None:
            return
        result = self.projector.project()
        counts = self.counts.setdefault(
            ctx.stage.name, {"reference_steps": 0, "projected_steps": 0}
        )
        counts["reference_steps"] += 1
        counts["projected_steps"] += int(result.projected)

    def on_stage_end(self, ctx: StageContext) -> None:
        if self.projector is not None:
            c = self.counts[ctx.stage.name]
            log(
                f"agem: stage {ctx.stage.dirname}: projected {c['projected_steps']} of "
                f"{c['reference_steps']} steps"
            )
        self.projector, self.pool, self._rows = None, [], {}
        self._remember(ctx)

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory, "counts": self.counts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory = list(state.get("memory", []))
        self.counts = {k: dict(v) for k, v in state.get("counts", {}).items()}
