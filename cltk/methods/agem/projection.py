"""A-GEM's projection as pure functions (Chaudhry et al., "Efficient Lifelong Learning with A-GEM",
ICLR 2019, eq. 11).

With g the gradient of the training batch and g_ref the gradient of a batch drawn from the episodic
memory of earlier tasks: where ``g . g_ref < 0`` the update would raise the memory's loss to first
order, so g is replaced by its projection onto the half-space ``{x : x . g_ref >= 0}``::

    g <- g - (g . g_ref / g_ref . g_ref) g_ref

after which ``g . g_ref = 0``. Where ``g . g_ref >= 0`` g is left as it is.

Both dot products are over the whole parameter vector. :func:`project_` takes the vector in pieces
(the fragments one rank holds, see :mod:`cltk.methods.kit.zero_view`) and a ``reduce`` that sums the pieces'
partial dot products over ranks, so that every rank applies the same coefficient to its own
elements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class Projection:
    """One step's figures, equal on every rank: the global ``g . g_ref`` and ``g_ref . g_ref``, and the
    coefficient ``c`` that was subtracted (``g <- g - c g_ref``; 0 when g was left alone)."""

    dot: float
    ref_sq: float
    coef: float

    @property
    def projected(self) -> bool:
        return self.coef != 0.0


def coefficient(dot: float, ref_sq: float) -> float:
    """``dot / ref_sq`` where the gradients conflict (``dot < 0``), else 0.

    A zero reference gradient (``ref_sq == 0``) constrains nothing: 0. Non-finite dot products raise
    ``FloatingPointError`` (a NaN would otherwise reach the weights through the projection).
    """
    if not (math.isfinite(dot) and math.isfinite(ref_sq)):
        raise FloatingPointError(
            f"A-GEM: non-finite dot products (g.g_ref={dot}, g_ref.g_ref={ref_sq})"
        )
    if dot >= 0.0 or ref_sq <= 0.0:
        return 0.0
    return dot / ref_sq


def local_dots(grads: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[g . g_ref, g_ref . g_ref]`` over the given pieces, as a float64 CPU tensor.

    Each piece's dot product is taken in fp32 (as the optimizer sees the gradient), the sum over
    pieces (and, in :func:`project_`, over ranks) in fp64.
    """
    if len(grads) != len(refs):
        raise ValueError(f"{len(grads)} gradient pieces but {len(refs)} reference pieces")
    dots = torch.zeros(2, dtype=torch.float64)
    for g, r in zip(grads, refs):
        if g.numel() != r.numel():
            raise ValueError(
                f"a gradient piece of {g.numel()} elements against {r.numel()} reference ones"
            )
        gf, rf = g.reshape(-1).float(), r.reshape(-1).float()
        dots[0] += torch.dot(gf, rf).double().cpu()
        dots[1] += torch.dot(rf, rf).double().cpu()
    return dots


def project_(
    grads: Sequence[torch.Tensor],
    refs: Sequence[torch.Tensor],
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Projection:
    """Project ``grads`` in place against ``refs`` (A-GEM); the pieces together form one vector each.

    Args:
        grads: pieces of g (any shapes, floating point), changed in place where projected.
        refs: pieces of g_ref, each the size of its piece of g.
        reduce: sums the float64 tensor ``[g . g_ref, g_ref . g_ref]`` of this process's pieces
            (:func:`local_dots`) over the processes that hold the rest of the vector (an
            all-reduce); None when ``grads`` is all of it.

    Returns:
        The global dot products and the coefficient applied (see :class:`Projection`).
    """
    dots = local_dots(grads, refs)
    if reduce is not None:
        dots = reduce(dots)
    dot, ref_sq = (float(x) for x in dots.tolist())
    coef = coefficient(dot, ref_sq)
    if coef != 0.0:
        for g, r in zip(grads, refs):
            g.sub_(r.reshape(g.shape).to(g.dtype), alpha=coef)
    return Projection(dot, ref_sq, coef)


def project_reference(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """The projection of a whole vector, written out plainly (the reference the tests compare with)."""
    dot = torch.dot(g.double().reshape(-1), g_ref.double().reshape(-1))
    if dot >= 0:
        return g.clone()
    return (g.double() - dot / torch.dot(g_ref.double().reshape(-1), g_ref.double().reshape(-1))
            * g_ref.double()).to(g.dtype)
