"""SPG's hooks: collect gradients at the end of each domain, score and accumulate importance, and scale
every later update of each parameter element by ``1 - importance``.

The state lives in this rank's partition layout (:mod:`cltk.methods.kit.zero_view`), one flat tensor per partition
of the fp32 master weights the optimizer steps on:

- ``importance.<i>`` (float32): the importance accumulated over the finished domains, on the
  partition's device; it blends every step (:class:`cltk.methods.kit.update_blend.UpdateBlend`);
- ``grad_sum.<i>`` (float32, only in the last ``spg.importance_steps`` steps of a domain): the sum of
  the reduced, clipped gradients of this rank's elements, read just before each optimizer step (no extra
  forward or backward pass);
- ``numel.<i>``, ``frag.<i>.<param>``: the layout they were laid out in (:func:`.sharded.layout_record`).

All of it travels in every checkpoint and stage directory (``methods_rank<r>.pt``), so a resumed run,
one resumed inside the scoring window included, scores what an uninterrupted one would. Each stage
builds a new engine: its layout must equal the saved one (checked on every rank).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from cltk import distributed as dist
from cltk.config import RunConfig
from cltk.method import Method, StageContext
from cltk.methods.kit.update_blend import UpdateBlend
from cltk.methods.kit.zero_view import Partition, ZeroView, zero_view
from cltk.methods.spg.importance import accumulate
from cltk.methods.spg.sharded import (
    check_layout,
    importance_from_grads,
    layout_record,
    replicated,
)
from cltk.tracking import log

if TYPE_CHECKING:  # the package imports this module on use: no import back at run time
    from cltk.methods.spg import SpgConfig


def _indexed(tensors: dict[str, torch.Tensor], prefix: str) -> list[torch.Tensor] | None:
    """``[tensors["<prefix>.0"], tensors["<prefix>.1"], ...]``; None when there are none."""
    out = []
    while f"{prefix}.{len(out)}" in tensors:
        out.append(tensors[f"{prefix}.{len(out)}"])
    return out or None


def scoring_step(ctx: StageContext, steps: int) -> bool:
    """Whether the optimizer step ``ctx.step`` of this stage adds its gradient to the importance: one of
    the last ``steps`` steps of a domain's last stage (with incremental blocks, the domain's last block:
    blocks of one domain do not protect themselves from each other)."""
    stage = ctx.stage
    return stage.block == stage.blocks - 1 and ctx.step >= len(ctx.schedule) - steps


class SpgMethod(Method):
    name = "spg"

    def __init__(self, cfg: RunConfig, section: SpgConfig):
        self.cfg, self.spg = cfg, section
        self.importance: list[torch.Tensor] | None = None
        self.grad_sum: list[torch.Tensor] | None = None
        self.layout: dict[str, torch.Tensor] | None = None  # of the saved/held tensors
        self.view: ZeroView | None = None
        self.names: list[str] = []
        self.blend: UpdateBlend | None = None
        self._detach: Callable[[], None] | None = None
        self._collect = False

    # ----- attaching to an engine -------------------------------------------------------------------
    def on_engine_ready(self, ctx: StageContext) -> None:
        self.view = zero_view(ctx.engine)
        self.names = [n for n, p in ctx.engine.module.named_parameters() if p.requires_grad]
        self._adopt()
        self._detach = self.view.on_step(before=self._add_grads)

    def _adopt(self) -> None:
        """Check the held state against this engine's layout, move it to the partitions' devices and
        blend the updates with the importance (collective)."""
        assert self.view is not None
        if self.blend is not None:
            self.blend.remove()
            self.blend = None
        if self.importance is None and self.grad_sum is None:
            return
        check_layout(self.view, self.layout or {})
        devices = [p.tensor.device for p in self.view.partitions]
        if self.importance is not None:
            self.importance = [t.to(d, torch.float32) for t, d in zip(self.importance, devices)]
            self.blend = UpdateBlend(self.view, self.importance)
        if self.grad_sum is not None:
            self.grad_sum = [t.to(d, torch.float32) for t, d in zip(self.grad_sum, devices)]

    def _release(self) -> None:
        if self.blend is not None:
            self.blend.remove()
            self.blend = None
        if self._detach is not None:
            self._detach()
            self._detach = None

    # ----- training ---------------------------------------------------------------------------------
    def after_backward(self, ctx: StageContext) -> None:
        self._collect = scoring_step(ctx, self.spg.importance_steps)

    @torch.no_grad()
    def _add_grads(self, parts: list[tuple[int, Partition]]) -> None:
        """Before the optimizer steps ``parts``: add their reduced gradients to ``grad_sum``."""
        if not self._collect:
            return
        assert self.view is not None
        if self.grad_sum is None:
            self.grad_sum = [
                torch.zeros(p.numel, dtype=torch.float32, device=p.tensor.device)
                for p in self.view.partitions
            ]
            self.layout = layout_record(self.view)
        for i, part in parts:
            g = part.tensor.grad
            if g is not None:
                self.grad_sum[i].add_(g.reshape(-1).to(torch.float32))

    # ----- the end of a stage -----------------------------------------------------------------------
    def on_stage_end(self, ctx: StageContext) -> None:
        self._release()
        view, stage = self.view, ctx.stage
        assert view is not None
        if stage.block == stage.blocks - 1:
            if self.grad_sum is None:
                raise RuntimeError(
                    f"spg: stage {stage.name} ended without a gradient collected for its importance"
                )
            # scored over the gradient sum itself: no second partition-sized tensor
            new = importance_from_grads(view, self.grad_sum, self.names, in_place=True)
            self.grad_sum = None
            self._log(ctx, view, new)
            if self.importance is None:
                self.importance = new
            else:
                self.importance = [accumulate(o, n) for o, n in zip(self.importance, new)]
            self.layout = layout_record(view)
        self.view = None  # the engine goes away after this stage

    def _log(self, ctx: StageContext, view: ZeroView, new: list[torch.Tensor]) -> None:
        """One line: the domain's mean importance, and the share of weights above 0.9 before and after
        accumulating it (over every rank's elements, padding left out)."""
        stats = torch.zeros(4, dtype=torch.float64)
        for i, part in enumerate(view.partitions):
            for f in part.fragments:
                seg = slice(f.offset, f.offset + f.numel)
                n_new = new[i][seg]
                acc = n_new if self.importance is None else torch.maximum(n_new, self.importance[i][seg])
                stats += torch.tensor(
                    [f.numel, float(n_new.double().sum()), float((n_new > 0.9).sum()),
                     float((acc > 0.9).sum())], dtype=torch.float64
                )
        if not replicated(view):
            dist.all_reduce_sum(stats)
        n = max(float(stats[0]), 1.0)
        log(
            f"spg: {ctx.stage.domain} scored over its last {self.spg.importance_steps} step(s): mean "
            f"importance {stats[1] / n:.3f}, {100 * stats[2] / n:.1f}% of weights above 0.9 "
            f"({100 * stats[3] / n:.1f}% with earlier domains)"
        )

    # ----- state ------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for prefix, tensors in (("importance", self.importance), ("grad_sum", self.grad_sum)):
            for i, t in enumerate(tensors or []):
                out[f"{prefix}.{i}"] = t
        if out:
            out.update(self.layout or {})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.importance = _indexed(tensors, "importance")
        self.grad_sum = _indexed(tensors, "grad_sum")
        layout = {k: v for k, v in tensors.items() if k.startswith(("numel.", "frag."))}
        self.layout = layout or None
        if self.view is not None:  # resumed inside a stage: the engine is already there
            self._adopt()
