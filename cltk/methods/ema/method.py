"""The ``ema:`` hooks: an exponential moving average laid out like this rank's ZeRO partitions.

- ``on_engine_ready``: ``average`` <- this rank's fp32 partitions (the stage's starting weights), and
  a hook after the torch optimizer's step (:meth:`cltk.methods.kit.zero_view.ZeroView.on_step`): at every
  ``every``-th step, ``average <- decay * average + (1 - decay) * partition`` in fp32, partition by
  partition (ZeRO 3 steps one sub-group at a time). Memory: one fp32 copy of this rank's partitions
  (``1 / world`` of the model under ZeRO 1/2/3), like one optimizer moment. Time: one pass over them
  every ``every`` steps.
- ``export`` (before the default ``save_pretrained``): the partitions and the model's own parameters
  <- ``average`` (:func:`cltk.methods.kit.weight_average.write_back`): the export, the stage's evaluation and the
  next stage's start are the average.
- ``average`` and a signature of its layout are :meth:`state_tensors` (``methods_rank<r>.pt`` in every
  checkpoint), the number of updates :meth:`state_dict`: a run killed and resumed mid-stage goes on
  with the same average. The stage's ``-end`` checkpoint holds the trained weights and the average, so
  a run killed after it exports the average again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from cltk import distributed as dist
from cltk.errors import UserError
from cltk.method import Method, StageContext
from cltk.methods.kit.weight_average import interpolate_, layout_signature, snapshot, write_back
from cltk.methods.kit.zero_view import LayoutError, Partition, ZeroView, zero_view
from cltk.tracking import log

if TYPE_CHECKING:
    from cltk.config import RunConfig
    from cltk.methods.ema import EmaConfig


class EmaStateError(UserError):
    """A saved average that does not fit this stage's engine."""


class EmaMethod(Method):
    """The ``ema:`` hooks (see the module doc).

    Attributes:
        average: per partition of this rank, the running average (None outside a stage).
        updates: updates folded into it this stage.
    """

    name = "ema"

    @classmethod
    def from_config(cls, cfg: RunConfig, section: EmaConfig) -> EmaMethod:
        return cls(section)

    def __init__(self, section: EmaConfig):
        self.ema = section
        self.average: list[torch.Tensor] | None = None
        self.layout: torch.Tensor | None = None
        self.updates = 0
        self.view: ZeroView | None = None
        self._ctx: StageContext | None = None
        self._last_step = -1
        self._detach: Any = None

    def on_engine_ready(self, ctx: StageContext) -> None:
        try:
            self.view = zero_view(ctx.engine)
        except LayoutError as e:
            raise EmaStateError(f"ema: {e}") from e
        self._ctx = ctx
        self.average, self.layout = snapshot(self.view), layout_signature(self.view)
        self.updates, self._last_step = 0, -1
        self._detach = self.view.on_step(after=self._after_step)

    @torch.no_grad()
    def _after_step(self, parts: list[tuple[int, Partition]]) -> None:
        assert self._ctx is not None and self.average is not None
        step = self._ctx.step
        if (step + 1) % self.ema.every:
            return
        if step != self._last_step:  # ZeRO 3 steps its sub-groups one hook at a time
            self.updates, self._last_step = self.updates + 1, step
        for i, part in parts:
            interpolate_([self.average[i]], [part.tensor], 1.0 - self.ema.decay)

    def export(self, ctx: StageContext) -> bool:
        assert self.view is not None and self.average is not None, "on_engine_ready must run first"
        if self._detach is not None:
            self._detach()
            self._detach = None
        write_back(ctx.engine, self.view, self.average)
        log(f"ema: stage {ctx.stage.dirname}: exported the average of {self.updates} update(s) "
            f"(decay {self.ema.decay:g}, every {self.ema.every} step(s))")
        self.average, self.layout, self.view, self._ctx = None, None, None, None
        return False  # the default save_pretrained exports the average

    # ----- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state.get("updates", 0))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.average is None:
            return {}
        assert self.layout is not None
        return {**{f"average.{i}": t for i, t in enumerate(self.average)}, "layout": self.layout}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.view is None:  # a finished stage: its average was exported, nothing is held
            return
        saved = [tensors[f"average.{i}"] for i in range(len(tensors)) if f"average.{i}" in tensors]
        if not saved:
            raise EmaStateError(
                f"ema: the checkpoint being resumed holds no average in this rank's "
                f"methods_rank{dist.rank()}.pt: restore that file, or start the run again"
            )
        if not torch.equal(tensors.get("layout", torch.zeros(0)), layout_signature(self.view)):
            raise EmaStateError(
                "ema: the saved average is laid out for other ZeRO partitions than this stage's "
                "engine: the model, its trainable parameters, the ZeRO stage or the number of ranks "
                "changed; resume with the run's own settings"
            )
        parts = self.view.partitions
        self.average = [t.to(device=p.tensor.device, dtype=torch.float32) for t, p in zip(saved, parts)]
