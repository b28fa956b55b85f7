"""Scale the optimizer's whole update of chosen elements: ``old + (1 - s) * (new - old)`` around the step.

Several methods (DAS unit masks, SPG parameter masks) protect weights by letting each element move only a
share ``1 - s`` of what the optimizer would move it. Scaling the gradient does not do that under Adam: a
constant factor on a gradient cancels in ``m / sqrt(v)``, and decoupled weight decay ignores the gradient
(see docs/das.md). Blending the step itself does: just before the torch optimizer steps a partition of
fp32 master weights, the blended span of it is copied; right after, ``new.lerp_(old, s)`` puts each
element back a share ``s`` of the way, so Adam's update, weight decay and the effect of clipping are all
scaled by ``1 - s``. ``s = 0`` leaves the step as it was, ``s = 1`` leaves the element where it was
(``lerp`` is exact at both ends).

The weights ``s`` are laid out like this rank's partitions (:mod:`cltk.methods.kit.zero_view`), so this works under
ZeRO 0, 1, 2, 3 and DeepSpeed's ``BF16_Optimizer`` alike. The cost is the weights themselves plus one
fp32 copy per step of each partition's blended span (from its first to its last non-zero weight).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from cltk.methods.kit.zero_view import Partition, ZeroView

_CHUNK = 1 << 22  # elements scanned at a time when trimming a weight to its non-zero span


@dataclass
class BlendTarget:
    """The blended span ``[lo, hi)`` of one tensor the torch optimizer steps on."""

    tensor: torch.Tensor
    lo: int
    hi: int
    weight: torch.Tensor  # [hi - lo] s: the share of the step taken back (1 - how far it moves)
    old: torch.Tensor  # [hi - lo] values before the step

    def span(self) -> torch.Tensor:
        return self.tensor.detach().view(-1)[self.lo : self.hi]


def nonzero_span(weight: torch.Tensor) -> tuple[int, int] | None:
    """``(first, last + 1)`` of the non-zero elements of a flat tensor; None when all are zero.

    Scans in chunks, so a partition-sized weight never needs a partition-sized index tensor."""
    n = weight.numel()
    lo = None
    for a in range(0, n, _CHUNK):
        nz = torch.nonzero(weight[a : a + _CHUNK])
        if nz.numel():
            lo = a + int(nz[0])
            break
    if lo is None:
        return None
    for b in range(n, 0, -_CHUNK):
        a = max(0, b - _CHUNK)
        nz = torch.nonzero(weight[a:b])
        if nz.numel():
            return lo, a + int(nz[-1]) + 1
    raise AssertionError("unreachable: a non-zero element was found above")


def blend_target(tensor: torch.Tensor, weight: torch.Tensor) -> BlendTarget | None:
    """A target for ``tensor`` (``weight`` flat, laid out like it), trimmed to the non-zero span of
    ``weight``; None when nothing is blended. The weight is a view when it already has the tensor's
    device and dtype (no copy)."""
    span = nonzero_span(weight)
    if span is None:
        return None
    lo, hi = span
    w = weight[lo:hi].to(device=tensor.device, dtype=tensor.dtype)
    return BlendTarget(tensor, lo, hi, w, torch.empty_like(w))


class UpdateBlend:
    """Blends attached to an engine's optimizer steps; :meth:`remove` detaches them.

    Args:
        view: this rank's partitions (:func:`cltk.methods.kit.zero_view.zero_view`).
        weights: one flat tensor (or None: not blended) per partition of ``view``, in [0, 1]: the share
            ``s`` of each element's step taken back.

    Attributes:
        layout: the view's layout (``plain``, ``zero1/2``, ``bf16``, ``zero3``).
        targets: ``{id(partition tensor): BlendTarget}``.
        masked_numel: elements blended on this rank (the size of the per-step copy).
    """

    def __init__(self, view: ZeroView, weights: Sequence[torch.Tensor | None]):
        if len(weights) != len(view.partitions):
            raise ValueError(
                f"{len(weights)} weight tensors for {len(view.partitions)} partitions: lay them out "
                "with the same view"
            )
        targets = []
        for part, w in zip(view.partitions, weights):
            if w is None:
                continue
            if w.numel() != part.numel:
                raise ValueError(
                    f"a weight of {w.numel()} elements for a partition of {part.numel}: lay it out "
                    "with the same view"
                )
            t = blend_target(part.tensor, w.reshape(-1))
            if t is not None:
                targets.append(t)
        self.layout = view.layout
        self.targets = {id(t.tensor): t for t in targets}
        self.masked_numel = sum(t.hi - t.lo for t in targets)
        self._pending: list[BlendTarget] = []
        self._detach = view.on_step(self._before, self._after)

    @torch.no_grad()
    def _before(self, parts: list[tuple[int, Partition]]) -> None:
        self._pending = [self.targets[id(p.tensor)] for _, p in parts if id(p.tensor) in self.targets]
        for t in self._pending:
            t.old.copy_(t.span())

    @torch.no_grad()
    def _after(self, parts: list[tuple[int, Partition]]) -> None:
        for t in self._pending:
            # new + s * (old - new) = old + (1 - s) * (new - old); lerp is exact at s = 0 and s = 1.
            t.span().lerp_(t.old, t.weight)
        self._pending = []

    def remove(self) -> None:
        self._detach()
