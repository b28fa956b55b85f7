"""The soft-target loss against a dense teacher in one pass per chunk (behind
:func:`cltk.losses.soft_target_loss`).

The generic per-token loss of :mod:`cltk.losses` needs the teacher's label probability ``q_y`` before it
starts (a log-sum-exp pass over the teacher's logits), then normalises the teacher again in the forward
and once more in the backward, and the method read ``q_y`` a fourth time for its metric. Here the
forward normalises each side once per chunk (one fused ``log_softmax`` of the student, one ``softmax``
of the teacher) and takes ``q_y``, ``lambda``, both cross-entropies and the metric's ``log q_y`` from
them; the backward keeps ``lambda`` per token and rebuilds the two softmaxes. The gradient is the closed form of ``lambda CE(y) + (1 - lambda) CE(q)`` with ``sum q = 1``:
``dL/dz = softmax(z) - lambda onehot(y) - (1 - lambda) q``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def chunk_slices(rows: int, vocab: int, elements: int) -> list[slice]:
    """Row slices of a ``[rows, vocab]`` tensor holding about ``elements`` entries each."""
    step = max(1, elements // max(vocab, 1))
    return [slice(s, min(s + step, rows)) for s in range(0, rows, step)]


def lam_from_q(q_y: Tensor, p: float, one_hot_below: float | None) -> Tensor:
    """``lambda = max(0, (p - q_y) / (1 - q_y))`` (0 where ``q_y >= p``), 1 below ``one_hot_below``.

    ``q_y = 1`` makes the ratio 0/0; such tokens satisfy ``q_y >= p`` and take 0, so clamping the
    denominator only keeps NaN out of the discarded branch of ``where()``.
    """
    lam = (p - q_y) / (1.0 - q_y).clamp_min(torch.finfo(q_y.dtype).tiny)
    lam = torch.where(q_y >= p, torch.zeros_like(lam), lam.clamp(0.0, 1.0))
    if one_hot_below is not None:
        lam = torch.where(q_y < one_hot_below, torch.ones_like(lam), lam)
    return lam


class SoftTargetPass(torch.autograd.Function):
    """Per-token soft-target losses ``[tokens]`` and the teacher's label log-probabilities.

    Inputs: ``logits`` and ``teacher`` ``[tokens, vocab]`` (any float dtype, fp32 maths; fp64 kept),
    ``safe`` ``[tokens]`` labels with ignored positions at 0, ``valid`` ``[tokens]`` bool.
    Outputs: losses (0 at ignored positions) and ``log q_y`` (0 at ignored positions; no gradient).

    Built from torch's fused softmax / log_softmax (one vectorised pass each on CPU and GPU), not from
    logsumexp and exp, which are several times slower per element on CPU.
    """

    @staticmethod
    def forward(ctx, logits, teacher, safe, valid, p, one_hot_below, chunk_elements):  # type: ignore[override]
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        n, vocab = logits.shape
        y = safe.unsqueeze(1)
        out = torch.empty(n, dtype=dtype, device=logits.device)
        log_q_y = torch.empty(n, dtype=dtype, device=logits.device)
        lam = torch.empty(n, dtype=dtype, device=logits.device)
        tiny = torch.finfo(dtype).tiny
        for s in chunk_slices(n, vocab, chunk_elements):
            v = valid[s]
            lp = torch.log_softmax(logits[s], -1, dtype=dtype)
            q = torch.softmax(teacher[s], -1, dtype=dtype)
            if not bool(v.all()):  # an ignored row may hold NaN/inf: keep it out of every sum
                q[~v] = 0.0
            q_y = q.gather(1, y[s]).squeeze(1)
            lam[s] = lam_s = lam_from_q(q_y, p, one_hot_below)
            ce_y = -lp.gather(1, y[s]).squeeze(1)
            ce_q = -(q.mul_(lp)).sum(-1)
            loss = lam_s * ce_y + (1.0 - lam_s) * ce_q
            zero = torch.zeros_like(loss)
            out[s] = torch.where(v, loss, zero)
            log_q_y[s] = torch.where(v, q_y.clamp_min(tiny).log(), zero)
        lam = torch.where(valid, lam, torch.zeros_like(lam))
        ctx.save_for_backward(logits, teacher, safe, valid, lam)
        ctx.chunk_elements = chunk_elements
        ctx.mark_non_differentiable(log_q_y)
        return out, log_q_y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_lq):  # type: ignore[override]
        logits, teacher, safe, valid, lam = ctx.saved_tensors
        dtype = lam.dtype
        n, vocab = logits.shape
        y = safe.unsqueeze(1)
        g = torch.where(valid, grad_out.to(dtype), torch.zeros_like(lam))
        grad = torch.empty_like(logits)
        for s in chunk_slices(n, vocab, ctx.chunk_elements):
            v = valid[s]
            chunk = torch.softmax(logits[s], -1, dtype=dtype).mul_(g[s].unsqueeze(1))
            q = torch.softmax(teacher[s], -1, dtype=dtype)
            if not bool(v.all()):
                q[~v] = 0.0
            chunk.sub_(q.mul_((g[s] * (1.0 - lam[s])).unsqueeze(1)))
            chunk.scatter_add_(1, y[s], -(g[s] * lam[s]).unsqueeze(1))
            grad[s] = chunk
        return grad, None, None, None, None, None, None
