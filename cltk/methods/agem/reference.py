"""A-GEM on a DeepSpeed engine: the reference gradient of a memory batch, taken through the engine in
the layout of this rank's ZeRO partitions, and the projection of the step's gradient against it.

Per optimizer step (see :class:`AgemProjector`):

1. :meth:`~AgemProjector.capture`, before the step's first micro-batch: the memory batch runs
   forward and backward through the engine with the accumulation boundary forced on its last
   micro-batch, so DeepSpeed reduces it over ranks like a step's gradient; this rank's share is
   copied into one flat fp32 tensor per partition (g_ref) and the engine's gradient is then dropped
   (:func:`.grads.discard_grads`). The engine's micro-step counters, the weights and the optimizer
   state are not touched.
2. The step's micro-batches train as usual.
3. :meth:`~AgemProjector.project`, after the last backward and before ``engine.step()``: the partial
   dot products ``g . g_ref`` and ``g_ref . g_ref`` of this rank's elements are summed over ranks in
   one all-reduce of two numbers, and every rank projects its own elements
   (:func:`.projection.project_`). DeepSpeed then clips (``train.grad_clip``) the projected gradient
   and steps.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from cltk import distributed as dist
from cltk.forward import forward_logits
from cltk.losses import causal_lm_loss
from cltk.methods.agem.grads import check_layout, discard_grads, read_grads, write_grads
from cltk.methods.agem.projection import Projection, project_
from cltk.methods.kit.zero_view import zero_view

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class AgemProjector:
    """A-GEM's two per-step calls on one engine (build it after ``deepspeed.initialize``).

    Raises:
        cltk.methods.kit.zero_view.LayoutError: an engine whose reduced gradient cannot be reached (bf16 without
            ZeRO, a partial ZeRO-3 optimizer offload, an unknown optimizer wrapper).
    """

    def __init__(self, engine):
        self.engine = engine
        self.view = zero_view(engine)
        check_layout(self.view)
        self.ref: list[torch.Tensor] | None = None

    @property
    def ref_bytes(self) -> int:
        """Bytes g_ref takes on this rank (4 per element of this rank's partitions)."""
        return 4 * self.view.numel

    def capture(self, batches: Sequence[torch.Tensor], loss_fn: LossFn = causal_lm_loss) -> None:
        """g_ref: the gradient of the mean loss over ``batches`` ([b, T] token ids each, this rank's
        share of the memory batch) and over ranks. Collective: every rank passes the same number of
        batches. Call at the start of an optimizer step, before its first micro-batch."""
        engine = self.engine
        if not batches:
            raise ValueError("A-GEM: an empty memory batch")
        rows = sum(int(b.shape[0]) for b in batches)
        try:
            for i, ids in enumerate(batches):
                # the last memory micro-batch is a boundary, so DeepSpeed reduces the gradient over ranks
                engine.set_gradient_accumulation_boundary(i == len(batches) - 1)
                ids = ids.to(engine.device)
                logits, labels = forward_logits(engine, ids)
                loss = loss_fn(logits, labels) * (ids.shape[0] / rows)
                engine.backward(loss, scale_wrt_gas=False)
            self.ref = read_grads(engine, self.view)
            discard_grads(engine, self.view)
        finally:
            # back to the engine's own count of micro-steps (None: not forced)
            engine.set_gradient_accumulation_boundary(None)

    def project(self) -> Projection:
        """Project the step's reduced gradient against g_ref (see :mod:`.projection`); call after the
        step's last backward and before ``engine.step()``. Every rank gets the same figures."""
        if self.ref is None:
            raise RuntimeError(
                "A-GEM: project() without a reference gradient; call capture() first"
            )
        grads = read_grads(self.engine, self.view)
        # ZeRO 0: every rank holds the whole reduced gradient, so its dots are already global
        reduce = None if self.view.layout == "plain" else dist.all_reduce_sum
        result = project_(grads, self.ref, reduce)
        if result.projected:
            write_grads(self.engine, self.view, grads)
        self.ref = None
        return result
