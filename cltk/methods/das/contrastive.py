"""The DAS contrastive term (Ke et al., "Continual Pre-training of Language Models", ICLR 2023).

Each sequence of a micro-batch gives three pooled representations: two views with dropout (the
positive pair: view 1 and view 2 of the *same* sequence) and one view with its units gated by the
accumulated importance (the hard negative). :func:`contrastive_loss` is InfoNCE over cosine
similarities: for the anchor ``anchor[i]`` the positive is ``positive[i]``; the negatives are every
other ``positive[j]`` and every ``hard_negative[j]``, its own ``hard_negative[i]`` included.
:func:`gather_with_grad` collects the representations of all ranks so the negatives come from the
whole global micro-batch, with gradients flowing back to the rank that computed each row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cltk import distributed as cdist


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the hidden states over the real tokens of each sequence.

    Args:
        hidden: ``[b, T, H]`` hidden states.
        mask: ``[b, T]``, 1 (or True) for a real token, 0 for padding; None: every token counts
            (packed sequences).

    Returns:
        ``[b, H]`` float32. A sequence without any real token pools to zeros.
    """
    hidden = hidden.float()
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.to(hidden.dtype).unsqueeze(-1)  # [b, T, 1]
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def contrastive_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    hard_negative: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """InfoNCE with cosine similarity; row i of each input is sequence i.

    Args:
        anchor: ``[n, H]`` view 1 of each sequence.
        positive: ``[n, H]`` view 2 of each sequence (``positive[i]`` pairs with ``anchor[i]``).
        hard_negative: ``[n, H]`` the importance-gated view of each sequence.
        temperature: divides the cosine similarities (> 0).

    Returns:
        Scalar: mean over i of ``-log softmax_j(sim(anchor[i], c_j) / t)[i]`` where the candidates
        ``c`` are ``[positive; hard_negative]`` (``2n`` rows).
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    if not (anchor.shape == positive.shape == hard_negative.shape) or anchor.dim() != 2:
        raise ValueError(
            "anchor, positive and hard_negative must all be [n, H]; got "
            f"{tuple(anchor.shape)}, {tuple(positive.shape)}, {tuple(hard_negative.shape)}"
        )
    a = F.normalize(anchor.float(), dim=-1)
    cands = F.normalize(torch.cat([positive, hard_negative]).float(), dim=-1)  # [2n, H]
    logits = a @ cands.T / temperature  # [n, 2n]
    target = torch.arange(a.shape[0], device=a.device)
    return F.cross_entropy(logits, target)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums every rank's gradient and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows, ctx.rank = x.shape[0], cdist.rank()
        return cdist.all_gather_cat(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # all_reduce works on every backend (gloo has no reduce_scatter)
        grad = cdist.all_reduce_sum(grad.contiguous().clone())
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``[n, H]`` on each rank -> ``[world * n, H]`` (rank 0's rows first), differentiable.

    Every rank must pass the same shape. Without a process group ``x`` is returned as is; with one, the
    collective runs at any world size (one GPU exercises the NCCL path too). The gradient of a row
    reaching its rank is the sum over ranks of the gradient of that row, so a loss computed identically
    on every rank over the gathered rows, with the gradients then averaged over ranks (as DeepSpeed
    does), gets the gradient of that loss.
    """
    if not cdist.is_initialized():
        return x
    return _GatherWithGrad.apply(x)
