"""Soft-target losses: soft targets against a dense teacher or an offline top-k cache, and distillation.

Pure functions on the chunked per-token kernel of :mod:`cltk.losses` (same shapes, alignment, dtypes,
token normalisation and memory bounds; read its docstring). Shared by the soft-target and distillation
methods and the HF Trainer door.

The soft-target loss against a dense teacher runs in one pass per chunk (:class:`SoftTargetPass`). The
generic per-token kernel needs the teacher's label probability ``q_y`` before it starts (a log-sum-exp
pass over the teacher's logits), then normalises the teacher again in the forward and once more in the
backward, and the method read ``q_y`` a fourth time for its metric. Here the forward normalises each
side once per chunk (one fused ``log_softmax`` of the student, one ``softmax`` of the teacher) and takes
``q_y``, ``lambda``, both cross-entropies and the metric's ``log q_y`` from them; the backward keeps
``lambda`` per token and rebuilds the two softmaxes. The gradient is the closed form of
``lambda CE(y) + (1 - lambda) CE(q)`` with ``sum q = 1``:
``dL/dz = softmax(z) - lambda onehot(y) - (1 - lambda) q``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from cltk import losses as _kernel
from cltk.losses import (
    check_shapes,
    chunk_rows,
    chunk_slices,
    compute_dtype,
    reduce_tokens,
    token_losses,
)

__all__ = [
    "soft_target_loss",
    "soft_target_loss_topk",
    "distillation_loss",
    "check_soft_target_args",
    "check_distillation_args",
]


def check_soft_target_args(p: float, one_hot_below: float | None) -> None:
    """Raise ``ValueError`` unless ``p`` is in (0, 1] and ``one_hot_below`` is None or in [0, p]."""
    if not (isinstance(p, (int, float)) and 0.0 < p <= 1.0):
        raise ValueError(f"soft target p must be in (0, 1], got {p!r}")
    if one_hot_below is not None:
        if not (isinstance(one_hot_below, (int, float)) and 0.0 <= one_hot_below <= 1.0):
            raise ValueError(f"one_hot_below must be None or in [0, 1], got {one_hot_below!r}")
        if one_hot_below > p:
            raise ValueError(
                f"one_hot_below ({one_hot_below}) must not exceed p ({p}): a teacher probability "
                "between them would be both kept and replaced by the one-hot target"
            )


def check_distillation_args(alpha: float, beta: float, temperature: float) -> None:
    """Raise ``ValueError`` unless ``alpha, beta >= 0`` and ``temperature > 0`` (all finite)."""
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"distillation {name} must be a finite number >= 0, got {value!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"distillation temperature must be > 0, got {temperature!r}")


# ---------------------------------------------------------------------------------------------
# the one-pass soft-target kernel
# ---------------------------------------------------------------------------------------------


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


def _label_logprob(scores: Tensor, safe: Tensor) -> Tensor:
    """log softmax(scores) at the labels ``[...]``, the log-sum-exp taken a chunk at a time."""
    vocab, dtype = scores.shape[-1], compute_dtype(scores.dtype)
    flat = scores.detach().reshape(-1, vocab)
    lse = torch.empty(flat.shape[0], dtype=dtype, device=flat.device)
    for s in chunk_rows(flat.shape[0], vocab):
        lse[s] = torch.logsumexp(flat[s].to(dtype), dim=-1)
    picked = scores.detach().gather(-1, safe.unsqueeze(-1)).squeeze(-1).to(dtype)
    return picked - lse.view(safe.shape)


def _soft_target_weight(label_logprob: Tensor, p: float, one_hot_below: float | None) -> Tensor:
    """Weight lambda ``[...]`` of the one-hot term, from the teacher's log q_y ``[...]``.

    The moved target v'_y = p, v'_j = q_j (1 - p) / (1 - q_y) for q_y < p equals
    ``lambda * onehot(y) + (1 - lambda) * q`` with ``lambda = (p - q_y) / (1 - q_y)``: check the
    y entry, lambda + (1 - lambda) q_y = p, and any other entry, (1 - lambda) q_j.
    """
    q_y = label_logprob.detach().to(compute_dtype(label_logprob.dtype)).exp()
    return lam_from_q(q_y, p, one_hot_below)


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------


def soft_target_loss(
    logits: Tensor,
    labels: Tensor,
    teacher_logprobs: Tensor,
    p: float = 0.9,
    one_hot_below: float | None = None,
    ignore_index: int = -100,
    num_tokens: int | float | Tensor | None = None,
    return_label_logprobs: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Cross-entropy against the teacher's distribution moved so the label holds at least ``p``.

    Per token, with ``q = softmax(teacher)`` and ``q_y`` its probability of the label ``y``, the
    target ``v'`` is: ``q`` itself where ``q_y >= p``; ``v'_y = p`` and
    ``v'_j = q_j (1 - p) / (1 - q_y)`` where ``q_y < p``; ``onehot(y)`` where
    ``q_y < one_hot_below``. It is never built: it equals ``lambda onehot(y) + (1 - lambda) q``
    with ``lambda = max(0, (p - q_y) / (1 - q_y))`` (1 for the one-hot fallback), so the loss is
    ``lambda CE(y) + (1 - lambda) CE(q)``. ``p = 1`` is plain cross-entropy. The teacher side
    (``q`` and ``lambda``) carries no gradient.

    Args:
        logits: ``[batch, seq, vocab]`` student logits, aligned with ``labels``.
        labels: ``[batch, seq]`` token ids; ``ignore_index`` marks positions to skip.
        teacher_logprobs: ``[batch, seq, vocab]`` teacher log-probabilities, or its raw logits
            (both are normalised here, a chunk at a time), any float dtype.
        p: least probability the target gives the label, in ``(0, 1]``.
        one_hot_below: where ``q_y`` is below this (in ``[0, p]``) the target is the one-hot label:
            a teacher that far off is not trusted at all. ``None`` turns the fallback off.
        ignore_index: label value left out of the loss and of the count.
        num_tokens: divide the summed loss by this instead of the local count of labelled tokens.
        return_label_logprobs: also return the teacher's ``log q_y`` ``[batch, seq]`` (0 where
            ignored), which the pass computes anyway.

    Returns:
        Scalar tensor (fp32; fp64 for fp64 logits): the mean over non-ignored tokens of
        ``CE(v', softmax(logits))``; with ``return_label_logprobs``, ``(loss, log q_y)``.

    Cost: one pass per chunk reads the student's and the teacher's logits once each
    (:class:`SoftTargetPass`); memory: chunk temporaries and the ``[tokens, vocab]`` gradient, no
    target tensor.
    """
    check_shapes(logits, labels, teacher_logprobs)
    check_soft_target_args(p, one_hot_below)
    valid = labels != ignore_index
    safe = labels.masked_fill(~valid, 0).long()
    vocab = logits.shape[-1]
    losses, label_logprobs = SoftTargetPass.apply(
        logits.reshape(-1, vocab), teacher_logprobs.detach().reshape(-1, vocab), safe.reshape(-1),
        valid.reshape(-1), float(p), one_hot_below, _kernel.CHUNK_ELEMENTS,
    )
    loss = reduce_tokens(losses.view(labels.shape), valid, num_tokens)
    if return_label_logprobs:
        return loss, label_logprobs.view(labels.shape)
    return loss


def soft_target_loss_topk(
    logits: Tensor,
    labels: Tensor,
    topk_logprobs: Tensor,
    topk_indices: Tensor,
    label_logprobs: Tensor,
    p: float = 0.9,
    one_hot_below: float | None = None,
    ignore_index: int = -100,
    num_tokens: int | float | Tensor | None = None,
) -> Tensor:
    """:func:`soft_target_loss` from an offline top-k teacher cache.

    ``lambda`` uses the teacher's exact ``log q_y`` (``label_logprobs``, which the cache keeps
    because ``y`` may fall outside the top k). The ``CE(q)`` term uses the top-k probabilities
    renormalised to sum to 1, i.e. the target is ``lambda onehot(y) + (1 - lambda) q_topk / m``
    with ``m`` the top-k mass: the mass outside the top k is dropped rather than guessed. When
    ``k = vocab`` this equals :func:`soft_target_loss` exactly. Entries of ``topk_logprobs`` may be
    ``-inf`` (padding) as long as each labelled token keeps one finite entry.

    Args:
        logits: ``[batch, seq, vocab]`` student logits, aligned with ``labels``.
        labels: ``[batch, seq]`` token ids; ``ignore_index`` marks positions to skip.
        topk_logprobs: ``[batch, seq, k]`` teacher log-probabilities of its top k tokens.
        topk_indices: ``[batch, seq, k]`` the token ids of those entries.
        label_logprobs: ``[batch, seq]`` the teacher's exact log-probability of the label.
        p: least probability the target gives the label, in ``(0, 1]``.
        one_hot_below: one-hot fallback threshold on ``q_y``, in ``[0, p]``, or ``None``.
        ignore_index: label value left out of the loss and of the count.
        num_tokens: divide the summed loss by this instead of the local count of labelled tokens.

    Returns:
        Scalar tensor (fp32; fp64 for fp64 logits).

    Memory: the renormalised top-k probabilities ``[tokens, k]``, chunk temporaries, and the
    ``[tokens, vocab]`` gradient.
    """
    check_shapes(logits, labels)
    if topk_logprobs.shape != topk_indices.shape or tuple(topk_logprobs.shape[:-1]) != tuple(
        labels.shape
    ):
        raise ValueError(
            f"topk_logprobs {tuple(topk_logprobs.shape)} and topk_indices "
            f"{tuple(topk_indices.shape)} must both be labels.shape + [k] = "
            f"{tuple(labels.shape)} + [k]"
        )
    if tuple(label_logprobs.shape) != tuple(labels.shape):
        raise ValueError(
            f"label_logprobs {tuple(label_logprobs.shape)} must have the labels' shape "
            f"{tuple(labels.shape)}"
        )
    if topk_logprobs.shape[-1] > logits.shape[-1]:
        raise ValueError(f"k = {topk_logprobs.shape[-1]} exceeds the vocab {logits.shape[-1]}")
    check_soft_target_args(p, one_hot_below)
    lam = _soft_target_weight(label_logprobs, p, one_hot_below)
    losses, valid = token_losses(logits, labels, ignore_index, w_y=lam, w_r=1.0 - lam,
                                  topk=(topk_logprobs, topk_indices))
    return reduce_tokens(losses, valid, num_tokens)


def distillation_loss(
    logits: Tensor,
    labels: Tensor,
    teacher_logprobs: Tensor,
    alpha: float = 1.0,
    beta: float = 1.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    num_tokens: int | float | Tensor | None = None,
) -> Tensor:
    """``alpha * T^2 * KL(teacher_T || student_T) + beta * CE(labels)``, means over tokens.

    ``teacher_T = softmax(teacher_logprobs / T)`` (dividing log-probs or logits by ``T`` gives the
    same softmax), ``student_T = softmax(logits / T)``. The ``T^2`` keeps the soft term's gradient
    scale independent of ``T`` (Hinton et al., 2015, "Distilling the Knowledge in a Neural
    Network", sec. 2). The KL is averaged over the same labelled tokens as the CE, so padding
    does not count. The teacher carries no gradient.

    Args:
        logits: ``[batch, seq, vocab]`` student logits, aligned with ``labels``.
        labels: ``[batch, seq]`` token ids; ``ignore_index`` marks positions to skip.
        teacher_logprobs: ``[batch, seq, vocab]`` teacher log-probabilities (or logits).
        alpha: weight of the KL term, ``>= 0``.
        beta: weight of the label cross-entropy, ``>= 0``.
        temperature: softening temperature ``T > 0``.
        ignore_index: label value left out of both terms and of the count.
        num_tokens: divide the summed loss by this instead of the local count of labelled tokens.

    Returns:
        Scalar tensor (fp32; fp64 for fp64 logits).

    Memory: chunk temporaries (tempered teacher and student distributions a chunk at a time),
    and the ``[tokens, vocab]`` gradient.
    """
    check_shapes(logits, labels, teacher_logprobs)
    check_distillation_args(alpha, beta, temperature)
    losses, valid = token_losses(logits, labels, ignore_index, w_y=float(beta),
                                  w_r=float(alpha), teacher=teacher_logprobs if alpha > 0 else None,
                                  temperature=temperature, kl=True)
    return reduce_tokens(losses, valid, num_tokens)
