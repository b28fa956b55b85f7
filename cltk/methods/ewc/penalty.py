"""EWC's arithmetic on flat tensors, one ZeRO partition at a time (pure functions, no DeepSpeed).

Every tensor here is flat and laid out like one partition of :class:`cltk.methods.kit.zero_view.ZeroView`:
``theta`` the fp32 master weights, ``anchor`` (theta*) their values at the end of the last stage,
``fisher`` (F) the diagonal Fisher, ``grad`` the reduced gradient the optimizer is about to use.
Elements outside any parameter (ZeRO padding) have zero gradient, hence F = 0: they add nothing.

The penalty (Kirkpatrick et al. 2017; online: Schwarz et al. 2018) is

    P(theta) = lam / 2 * sum_i F_i * (theta_i - theta*_i) ** 2
    dP / dtheta_i = lam * F_i * (theta_i - theta*_i)

and the diagonal Fisher of a stage is the mean over its last steps of the squared gradient.
"""

from __future__ import annotations

import torch

CHUNK = 1 << 22  # elements per slice: bounds the two fp32 temporaries to 16 MiB each


@torch.no_grad()
def penalty_(
    theta: torch.Tensor,
    anchor: torch.Tensor,
    fisher: torch.Tensor,
    lam: float,
    grad: torch.Tensor | None = None,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """``lam / 2 * sum F (theta - anchor)^2`` over these elements, and, when ``grad`` is given, its
    gradient ``lam * F * (theta - anchor)`` added to ``grad`` in place.

    Args:
        theta, anchor, fisher: ``[n]`` each, on one device.
        lam: the penalty's strength (lambda).
        grad: ``[n]`` or None (value only).
        chunk: elements per slice (the temporaries are two slices: ``d`` and ``F * d``).

    Returns:
        A 0-dim float64 tensor on ``theta``'s device (no host sync here).
    """
    n = theta.numel()
    if not anchor.numel() == fisher.numel() == n or (grad is not None and grad.numel() != n):
        raise ValueError(
            f"theta, anchor, fisher and grad must have equal sizes, got {n}, {anchor.numel()}, "
            f"{fisher.numel()}, {None if grad is None else grad.numel()}"
        )
    theta, anchor, fisher = theta.view(-1), anchor.view(-1), fisher.view(-1)
    total = torch.zeros((), dtype=torch.float64, device=theta.device)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        d = theta[lo:hi] - anchor[lo:hi]
        fd = d * fisher[lo:hi]
        if grad is not None:
            grad.view(-1)[lo:hi].add_(fd, alpha=lam)
        total += torch.dot(fd, d).double()
    return total * (lam / 2)


@torch.no_grad()
def add_square_(acc: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``acc += grad * grad`` (the running sum of squared gradients of a stage's Fisher window)."""
    return acc.addcmul_(grad, grad)


@torch.no_grad()
def fold_fisher(
    old: torch.Tensor | None, square_sum: torch.Tensor, steps: int, gamma: float
) -> torch.Tensor:
    """The Fisher after a stage: ``gamma * old + square_sum / steps`` (``square_sum / steps`` for
    the first stage). Online EWC (Schwarz et al. 2018) with ``gamma`` < 1; ``gamma = 1`` sums the
    stages' Fishers.

    Reuses ``square_sum``'s memory for the result (it is the stage's accumulator, not needed after).
    """
    if steps < 1:
        raise ValueError(f"a stage's Fisher needs at least one step, got {steps}")
    new = square_sum.div_(steps)
    if old is not None:
        new.add_(old.to(new.device), alpha=gamma)
    return new
