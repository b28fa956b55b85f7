"""SPG's parameter importance as pure functions: tensors in, tensors out (no ranks, no DeepSpeed).

SPG (Konishi et al., "Parameter-Level Soft-Masking for Continual Learning", ICML 2023) scores each
parameter element by the gradient of a task's loss, standardised within its tensor and squashed:

    importance = | tanh( (g - mean(g)) / std(g) ) |          mean, std over the elements of one tensor

with ``g`` the gradient summed over the task's data and ``std`` the unbiased standard deviation (as the
authors' code computes it); a tensor whose gradient has no spread (all equal, or one element) scores 0.
The importance of all tasks so far is the element-wise max of each task's. Because of the
standardisation the scale of ``g`` does not matter: a sum over batches, a mean, a clipped sum all score
alike.

:func:`importance` is the plain, whole-tensor form (the reference); :func:`standardized_tanh` is the
piece the sharded form (:mod:`cltk.methods.spg.sharded`) applies to each rank's fragment of a tensor
with the tensor's global mean and std.
"""

from __future__ import annotations

import math

import torch

CHUNK = 1 << 22  # elements per piece when reducing or scoring a long tensor (bounds transient memory)


def moments(count: float, total: float, squares: float) -> tuple[float, float]:
    """``(mean, std)`` from an element count, the sum, and the sum of squared deviations from the mean
    (unbiased std; 0 when ``count < 2``)."""
    if count <= 0:
        return 0.0, 0.0
    mean = total / count
    std = math.sqrt(max(squares, 0.0) / (count - 1)) if count >= 2 else 0.0
    return mean, std


def sum64(x: torch.Tensor, shift: float = 0.0, square: bool = False) -> float:
    """``sum(x - shift)`` (or of its squares) accumulated in float64, a chunk at a time."""
    flat = x.reshape(-1)
    total = 0.0
    for a in range(0, flat.numel(), CHUNK):
        piece = flat[a : a + CHUNK].double() - shift
        total += float((piece * piece).sum() if square else piece.sum())
    return total


def standardized_tanh(
    g: torch.Tensor, mean: float, std: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``|tanh((g - mean) / std)|`` in float32, a chunk at a time (zeros when ``std`` is 0 or not
    finite: no spread, nothing to tell the elements apart).

    Args:
        g: any shape; ``out`` (if given) has as many elements.
    """
    flat = g.reshape(-1)
    res = out.view(-1) if out is not None else torch.empty(flat.numel(), device=g.device)
    if not (std > 0 and math.isfinite(std) and math.isfinite(mean)):
        res.zero_()
    else:
        for a in range(0, flat.numel(), CHUNK):
            piece = flat[a : a + CHUNK].double()
            res[a : a + CHUNK] = ((piece - mean) / std).tanh_().abs_()
    return out if out is not None else res.view(g.shape)


def importance(g: torch.Tensor) -> torch.Tensor:
    """SPG importance of one whole tensor's gradient ``g`` (same shape, float32 in [0, 1])."""
    n = g.numel()
    mean = sum64(g) / n if n else 0.0
    _, std = moments(n, 0.0, sum64(g, mean, square=True))
    return standardized_tanh(g, mean, std)


def accumulate(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """Importance over all tasks so far: the element-wise max, into ``old`` (``new`` when there is none)."""
    if old is None:
        return new
    return torch.maximum(old, new.to(old.device), out=old)
