"""The one interface every continual-learning method plugs into (see docs/writing-a-method.md).

A stage runs: ``init_dir`` -> ``prepare_model`` -> ``on_stage_start`` -> ``deepspeed.initialize`` -> ``on_engine_ready`` ->
per step ``before_step`` -> per micro-batch ``loss`` (at most one method replaces the base cross-entropy) +
``extra_loss`` -> backward
-> at the accumulation boundary ``after_backward`` (gradient transforms) -> ``engine.step()`` (update
transforms hook the optimizer in ``on_engine_ready``) -> ... -> ``export`` -> ``on_stage_end`` (may
write files into the stage directory) -> ``evaluate``; after the last stage ``on_run_end``. ``state_dict`` (JSON) and ``state_tensors`` (this rank's
tensors) travel in every checkpoint and stage directory. Before the stage's data is laid out, ``mixes``
adds sequences drawn into every step (replay). A new method is one folder under ``cltk/methods/`` that
registers itself (:mod:`cltk.registry`); the loop never branches on a method's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cltk.data.sampler import Mix, Pool

if TYPE_CHECKING:
    from cltk.config import RunConfig
    from cltk.data.packing import PackedDomain
    from cltk.plan import Stage

__all__ = ["Method", "Mix", "Pool", "StageContext"]


@dataclass
class StageContext:
    """What a method may look at during one stage.

    ``domains`` holds every prepared source by name: the configured domains, then the extra sources
    the methods declared (``MethodSpec.extra_sources``, named ``<method>.<name>``); ``sources`` lists
    those names in id order, the ids a :class:`Pool` and the sequence-id audit log use.
    """

    cfg: RunConfig
    stage: Stage
    stages: list[Stage]
    domains: dict[str, PackedDomain]
    tokenizer: Any
    stage_dir: Path
    prev_stage_dir: Path | None
    schedule: Any = (
        None  # the stage's cltk.data.sampler.StageSchedule: which sequences each step trains
    )
    model: torch.nn.Module | None = None
    engine: Any = None
    step: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.sources:
            self.sources = list(self.domains)

    def rows(self, items: list[tuple[int, int]]) -> np.ndarray:
        """``[n, T]`` int64 token ids of ``(source id, index)`` items: a prepared source's training
        windows, or the rows a pool of the stage's schedule brought (a reservoir)."""
        out = []
        for d, i in items:
            own = self.schedule.rows(d) if self.schedule is not None else None
            src = own if own is not None else self.domains[self.sources[d]].train
            out.append(np.asarray(src[int(i)]["input_ids"], dtype=np.int64))
        return np.stack(out) if out else np.zeros((0, self.cfg.data.seq_len), np.int64)


class Method:
    """Base class: every hook is a no-op."""

    name = "base"

    @classmethod
    def from_config(cls, cfg: RunConfig, section: Any) -> Method:
        """The hooks for a run whose config turns the method on (``section``: its config section, also
        ``cfg.<name>``); what :meth:`cltk.registry.MethodSpec.build` calls. Override it when the
        constructor takes other arguments than ``(cfg, section)``."""
        return cls(cfg, section)  # type: ignore[call-arg]

    def init_dir(self, ctx: StageContext, default: Path | None) -> Path | None:
        """Where this stage's weights start: ``default`` is the previous stage's export (None for the first
        stage: the configured model). Return None to start from the configured model."""
        return default

    def prepare_model(self, ctx: StageContext, model: torch.nn.Module) -> torch.nn.Module:
        """Return the model to train (e.g. wrapped with an adapter); before ``deepspeed.initialize``."""
        return model

    def mixes(self, ctx: StageContext) -> list[Mix]:
        """Sequences drawn into every step of this stage besides its own (e.g. replay). Called before the
        stage's schedule exists, so ``ctx.schedule`` is None here; the shares of all methods' mixes must
        leave room for new data."""
        return []

    def on_stage_start(self, ctx: StageContext) -> None:
        """The plain model exists (``ctx.model``); gradient hooks go here, before DeepSpeed wraps it."""

    def on_engine_ready(self, ctx: StageContext) -> None:
        """``ctx.engine`` exists: teachers, optimizer step hooks."""

    def before_step(self, ctx: StageContext) -> None:
        """At the start of every optimizer step, before its first micro-batch (collective: every rank
        calls it). A method may run its own forward/backward through ``ctx.engine`` here, provided it
        leaves no gradient behind (e.g. a reference gradient on other data)."""

    def loss(
        self,
        ctx: StageContext,
        batch: dict[str, torch.Tensor],
        logits: torch.Tensor,
        labels: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]] | None:
        """Replace the base loss for this micro-batch (None keeps cross-entropy).

        ``logits`` [b, T-1, V] and ``labels`` [b, T-1] are already aligned.
        """
        return None

    def extra_loss(
        self,
        ctx: StageContext,
        batch: dict[str, torch.Tensor],
        logits: torch.Tensor,
        labels: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Named loss terms added to the main loss (penalties, contrastive terms)."""
        return {}

    def after_backward(self, ctx: StageContext) -> None:
        """Between the last backward of an accumulated batch and ``engine.step()``: gradient transforms."""

    def export(self, ctx: StageContext) -> bool:
        """Write the stage export into ``ctx.stage_dir`` yourself (collective: every rank calls it).

        Return True when done; False keeps the default ``save_pretrained`` of the engine's module. The
        export is what the next stage starts from (see ``init_dir``) and what ``cltk eval`` loads.
        """
        return False

    def on_stage_end(self, ctx: StageContext) -> None:
        """After training and the export of the stage; may write into ``ctx.stage_dir``."""

    def evaluate(self, ctx: StageContext, default: dict[str, float]) -> dict[str, float]:
        """The stage's row of the forgetting matrix (perplexity per domain); ``default`` is the trained
        model's. A method may replace it (e.g. each domain with its own adapter). Row 0, the starting
        model before any stage (:mod:`cltk.start`), does not pass through this hook."""
        return default

    def on_run_end(self, out_dir: Path, report: Any) -> None:
        """After the last stage and the forgetting report (rank-collective): extra reports."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state, the same on every rank (written by rank 0)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's tensor state (e.g. a Fisher diagonal laid out like this rank's ZeRO partition),
        saved per rank beside the checkpoint and the stage export; empty when there is none."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_tensors` returned on this rank (empty: nothing was saved)."""
