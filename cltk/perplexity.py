"""Perplexity on every domain's held-out set, with the work split across ranks.

Each rank evaluates every ``world_size``-th sequence; all ranks run the same number of forward passes
(short shards run a padding batch whose tokens count zero), which ZeRO 3 requires, and the summed NLL and
token counts are all-reduced, so every rank returns the same figures.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from cltk import distributed as dist
from cltk.data.packing import PackedDomain
from cltk.losses import token_nll


def _batches(n: int, batch_size: int) -> tuple[np.ndarray, int]:
    mine = np.arange(dist.rank(), n, dist.world_size())
    per_rank = math.ceil(math.ceil(n / dist.world_size()) / batch_size)
    return mine, per_rank


@torch.no_grad()
def domain_perplexity(
    forward: Callable[[torch.Tensor], torch.Tensor],
    domain: PackedDomain,
    batch_size: int,
    device: torch.device,
) -> tuple[float, float, int]:
    """(perplexity, mean NLL, tokens) of ``domain.eval``; ``forward(ids [b, T])`` gives the next-token
    logits [b, T-1, V] (see :func:`engine_forward`)."""
    ids_all = domain.eval["input_ids"]
    n = len(domain.eval)
    mine, n_batches = _batches(n, batch_size)
    # sums stay on the device (no host copy per batch); one all-reduce at the end
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for b in range(n_batches):
        idx = mine[b * batch_size : (b + 1) * batch_size]
        pad = len(idx) == 0
        rows = [ids_all[0]] if pad else [ids_all[int(i)] for i in idx]
        ids = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=device)
        logits = forward(ids)
        s, c = token_nll(logits, ids[:, 1:])
        if not pad:
            nll += s.double()
            count += c.double()
    total_nll, total_count = dist.all_reduce_sum(torch.stack([nll, count])).tolist()
    mean = total_nll / total_count
    return math.exp(mean), mean, int(total_count)


def evaluate_domains(
    forward: Callable[[torch.Tensor], torch.Tensor],
    domains: list[PackedDomain],
    batch_size: int,
    device: torch.device,
    module: torch.nn.Module | None = None,
) -> dict[str, float]:
    """Perplexity of each domain (eval mode during the pass, restored afterwards)."""
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        return {d.name: domain_perplexity(forward, d, batch_size, device)[0] for d in domains}
    finally:
        if module is not None and was_training:
            module.train()
