"""Replay's hooks: the mixes of every stage, and the reservoir kept after every stage.

- earlier stages, at ``share_at(stage)``: without ``memory``, every earlier domain's training data
  (uniformly over their sequences; a domain's own earlier blocks are not replayed); with
  ``memory: N``, the reservoir after the previous stage (:mod:`.reservoir`; it holds earlier blocks of
  the same domain too), under the source id ``len(ctx.sources)``;
- general data, at ``general_share_at(stage)``, from the first stage on: the general sources'
  training windows (uniformly over all their sequences), each under its prepared source's id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cltk import distributed as dist
from cltk.config import RunConfig
from cltk.data.sampler import Mix, Pool
from cltk.data.windows import TokenWindows
from cltk.errors import UserError
from cltk.method import Method, StageContext
from cltk.methods.replay import reservoir as res
from cltk.methods.replay.config import OUTPUT, ReplayConfig
from cltk.tracking import log


class ReplayMethod(Method):
    name = "replay"

    def __init__(self, cfg: RunConfig, section: ReplayConfig):
        self.cfg, self.r = cfg, section
        self.root = cfg.out / OUTPUT
        self._loaded: tuple[int, res.Memory] | None = None

    # ----- the mixes --------------------------------------------------------------------------------
    def mixes(self, ctx: StageContext) -> list[Mix]:
        out = []
        share = self.r.share_at(ctx.stage.index)
        if share > 0 and ctx.stage.index > 0:
            if self.r.memory:  # the reservoir the stage before writes: read when this stage runs
                out.append(Mix("the reservoir of earlier stages",
                               lambda: self._memory_pools(ctx), share))
            else:
                out.append(Mix("earlier domains", self._earlier_pools(ctx), share))
        general = self.r.general_share_at(ctx.stage.index)
        if general > 0:
            out.append(Mix("general data", self._general_pools(ctx), general))
        return out

    def _earlier_pools(self, ctx: StageContext) -> list[Pool]:
        names = [d.name for d in ctx.cfg.domains]
        earlier = sorted(
            {s.domain_index for s in ctx.stages[: ctx.stage.index] if s.domain != ctx.stage.domain}
        )
        return [Pool(i, np.arange(len(ctx.domains[names[i]].train))) for i in earlier]

    def _general_pools(self, ctx: StageContext) -> list[Pool]:
        pools = []
        for g in self.r.general:
            name = g.domain if g.domain is not None else f"{self.name}.{g.name}"
            pools.append(Pool(ctx.sources.index(name), np.arange(len(ctx.domains[name].train))))
        return pools

    def _memory(self, stage: int) -> res.Memory | None:
        """The reservoir after ``stage`` (cached while it is the one in use)."""
        if self._loaded is None or self._loaded[0] != stage:
            memory = res.load(self.root, stage)
            if memory is None:
                return None
            self._loaded = (stage, memory)
        return self._loaded[1]

    def _memory_pools(self, ctx: StageContext) -> list[Pool]:
        """The reservoir after the previous stage, which has finished: this stage runs."""
        prev = ctx.stage.index - 1
        memory = self._memory(prev)
        if memory is None:
            raise UserError(
                f"replay.memory: stage {ctx.stages[prev].dirname} is finished but its reservoir "
                f"{res.memory_dir(self.root, prev)} is missing (was the run started without "
                "replay.memory, or the directory removed?); start the run in a new output_dir"
            )
        rows = TokenWindows.from_array(memory.tokens)
        source = len(ctx.sources)  # the first id after the prepared sources
        return [Pool(source, np.arange(len(memory)), rows=rows)]

    # ----- the reservoir ----------------------------------------------------------------------------
    def on_stage_start(self, ctx: StageContext) -> None:
        if not self.r.memory:
            return
        if dist.is_main():
            gone = res.remove_before(self.root, ctx.stage.index - 1)
            if gone:
                log(f"replay: removed reservoirs no longer needed: {', '.join(gone)}")
        memory = self._memory(ctx.stage.index - 1) if ctx.stage.index > 0 else None
        if memory is not None:
            log(f"replay: stage {ctx.stage.dirname} replays from {memory.path} ({len(memory):,} "
                f"sequences of stages {', '.join(s['name'] for s in memory.meta['stages'])})")

    def on_run_end(self, out_dir: Path, report: Any) -> None:
        """Keep only the reservoir after the last stage (a run that grows goes on from it)."""
        if self.r.memory and dist.is_main():
            res.remove_before(self.root, len(report.stage_names) - 1)

    def on_stage_end(self, ctx: StageContext) -> None:
        if not self.r.memory:
            return
        self._loaded = None  # the reservoir after this stage may replace one read ahead
        items = ctx.schedule.trained_new()
        error: BaseException | None = None
        if dist.is_main():
            try:
                self._absorb(ctx, items)
            except Exception as e:
                if dist.world_size() == 1:
                    raise
                error = e
        # every rank stops on rank 0's error (none hangs in the next collective)
        failed = dist.broadcast_object(None if error is None else repr(error))
        if error is not None:
            raise error
        if failed is not None:
            raise UserError(f"rank 0 failed writing the replay reservoir: {failed}")

    def _absorb(self, ctx: StageContext, items: list[tuple[int, int]]) -> None:
        """Rank 0: write the reservoir after this stage, unless it is on disk already."""
        stage = ctx.stage
        record = res.stage_record(stage.index, stage.name, items)
        seq_len, seed, n = self.cfg.data.seq_len, self.cfg.seed, self.r.memory
        prev = res.load(self.root, stage.index - 1) if stage.index > 0 else None
        done = res.load(self.root, stage.index)
        if done is not None and res.matches(done, prev, n, seq_len, seed, record):
            log(f"replay: the reservoir after stage {stage.dirname} is on disk already: kept")
            return
        if stage.index > 0 and prev is None:
            raise UserError(
                f"replay.memory: the reservoir after stage {stage.index - 1} is missing from "
                f"{self.root}; start the run in a new output_dir"
            )
        done = res.absorb(self.root, prev, stage.index, stage.name, items, ctx.rows, n, seq_len,
                          seed)
        mib = len(done) * seq_len * 4 / 2**20
        note = (f"; the stages so far trained only {done.meta['seen']:,} sequences, fewer than "
                f"replay.memory {n:,}: it holds them all" if len(done) < n else "")
        log(f"replay: reservoir after stage {stage.dirname}: {len(done):,} of "
            f"{done.meta['seen']:,} sequences seen ({mib:.1f} MiB of tokens in {done.path}){note}")
