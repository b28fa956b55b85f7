"""EWC's per-sample Fisher (``ewc.fisher: sample``): the mean over single sequences of the squared
gradient of each one's loss, at the end of a stage, in the layout of this rank's ZeRO partitions.

Under data parallelism the gradient DeepSpeed reduces is the mean over ranks, so one sequence's own
gradient needs every rank to run that same sequence: each of the ``n`` sequences is one forward and
backward on every rank plus one gradient reduction, the same work per rank as ``n`` micro-batches of
one sequence. The gradient is read and dropped without a step (:func:`cltk.methods.kit.grads.batch_grad`),
so the weights, the optimizer state and the step counters are untouched. The sequences are drawn from
those the stage trained (its own data, not replay), seeded by (seed, stage): a stage end redone after a
crash draws the same ones at the same weights.
"""

from __future__ import annotations

import numpy as np
import torch

from cltk.losses import causal_lm_loss
from cltk.method import StageContext
from cltk.methods.ewc.penalty import add_square_
from cltk.methods.kit.grads import batch_grad, check_layout
from cltk.methods.kit.zero_view import ZeroView

_SALT = 0xE3C5  # keeps these draws apart from the run's other seeded draws


def pick_sequences(items: list[tuple[int, int]], n: int, seed: int, stage_index: int) -> list[tuple[int, int]]:
    """``n`` of a stage's trained ``(source, index)`` items (all of them if fewer), drawn without
    replacement as a pure function of (seed, stage), in their original order."""
    if len(items) <= n:
        return list(items)
    rng = np.random.default_rng([seed, _SALT, stage_index])
    return [items[i] for i in sorted(rng.choice(len(items), size=n, replace=False).tolist())]


def sample_squares(ctx: StageContext, view: ZeroView, n: int, seed: int) -> tuple[list[torch.Tensor], int]:
    """The sum over the picked sequences of g_n * g_n per partition of this rank, and their count.
    Collective: every rank runs the same sequences in the same order."""
    check_layout(view)
    items = pick_sequences(ctx.schedule.trained_new(), n, seed, ctx.stage.index)
    rows = torch.from_numpy(ctx.rows(items))
    sums = [torch.zeros_like(p.tensor, dtype=torch.float32) for p in view.partitions]
    for row in rows:
        grads = batch_grad(ctx.engine, view, [row[None]], causal_lm_loss)
        for acc, g in zip(sums, grads, strict=True):
            add_square_(acc, g)
    return sums, len(items)
