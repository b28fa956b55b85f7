"""The ``merge:`` hooks: a copy of the weights the stage starts from, interpolated with its result.

- ``on_engine_ready``: ``before`` <- this rank's fp32 partitions, before any step (the previous
  stage's export, or the configured model at the first stage). A resumed stage rebuilds its model
  from the same export before its checkpoint loads, so ``before`` needs no saving.
- ``export`` (before the default ``save_pretrained``): each partition <- ``(1 - a) * before + a *
  partition`` in fp32, then the model's own (bf16 / fp32) parameters are refreshed from it
  (:func:`cltk.methods.kit.weight_average.write_back`). The export, the stage's evaluation and the next stage's
  start (hence its distillation teacher) are the merged model. The stage's ``-end`` checkpoint was
  written before, with the unmerged weights and their optimizer state: a run killed between the two
  merges again from it on resume. The optimizer state is not merged: every stage starts a fresh
  optimizer (docs/architecture.md), so the moments of the unmerged weights end with the stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from cltk.errors import UserError
from cltk.method import Method, StageContext
from cltk.methods.kit.weight_average import interpolate_, snapshot, write_back
from cltk.methods.kit.zero_view import LayoutError, ZeroView, zero_view
from cltk.tracking import log

if TYPE_CHECKING:
    from cltk.config import RunConfig
    from cltk.methods.merge import MergeConfig


class MergeMethod(Method):
    """The ``merge:`` hooks (see the module doc)."""

    name = "merge"

    @classmethod
    def from_config(cls, cfg: RunConfig, section: MergeConfig) -> MergeMethod:
        return cls(section)

    def __init__(self, section: MergeConfig):
        self.merge = section
        self.view: ZeroView | None = None
        self.before: list[torch.Tensor] | None = None

    def on_engine_ready(self, ctx: StageContext) -> None:
        try:
            self.view = zero_view(ctx.engine)
        except LayoutError as e:
            raise UserError(f"merge: {e}") from e
        self.before = snapshot(self.view)

    def export(self, ctx: StageContext) -> bool:
        assert self.view is not None and self.before is not None, "on_engine_ready must run first"
        a = self.merge.weight(ctx.stage.index)
        # before <- (1 - a) * before + a * after, then the partitions and the model <- before
        interpolate_(self.before, [p.tensor for p in self.view.partitions], a)
        write_back(ctx.engine, self.view, self.before)
        log(f"merge: stage {ctx.stage.dirname}: exported (1 - {a:.4g}) * its start + {a:.4g} * its "
            f"result ({self.merge.mode})")
        self.before, self.view = None, None
        return False  # the default save_pretrained exports the merged weights
