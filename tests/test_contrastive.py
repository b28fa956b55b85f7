"""The DAS contrastive term: pure functions against hand computations, gathering across 2 ranks, and a
real DAS run that trains with it."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from cltk.methods.das.contrastive import contrastive_loss, gather_with_grad, mean_pool
from tests.tiny_run import ROOT, write_tiny_run


def _cos(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def _loss_by_hand(anchor, positive, negative, t: float) -> float:
    """InfoNCE with explicit loops: candidates are all positives then all hard negatives."""
    n = len(anchor)
    total = 0.0
    for i in range(n):
        cands = [positive[j] for j in range(n)] + [negative[j] for j in range(n)]
        exps = [math.exp(_cos(anchor[i], c) / t) for c in cands]
        total += -math.log(exps[i] / sum(exps))
    return total / n


def test_contrastive_loss_matches_a_hand_computation():
    a = [[1.0, 0.0, 2.0], [0.5, -1.0, 0.0]]
    p = [[0.9, 0.1, 1.5], [0.4, -1.2, 0.3]]
    h = [[1.0, 1.0, 0.0], [-0.5, -1.0, 0.2]]
    for t in (0.05, 0.5, 1.0):
        got = contrastive_loss(torch.tensor(a), torch.tensor(p), torch.tensor(h), t)
        assert got.item() == pytest.approx(_loss_by_hand(a, p, h, t), rel=1e-5, abs=1e-6)


def test_positives_are_paired_by_sequence():
    torch.manual_seed(0)
    a = torch.randn(4, 8)
    p = a + 0.05 * torch.randn(4, 8)  # view 2 of the same sequences: close to their anchors
    h = torch.randn(4, 8)
    right = contrastive_loss(a, p, h, 0.1)
    swapped = contrastive_loss(a, p[[1, 0, 3, 2]], h, 0.1)  # view 2 of other documents
    assert right.item() < 0.1 and swapped.item() > right.item() + 1.0
    # the own gated view is a hard negative: making it equal to the positive raises the loss
    assert contrastive_loss(a, p, p.clone(), 0.1).item() > right.item() + 0.5
    # scale-invariant (cosine similarity)
    assert contrastive_loss(3 * a, p, 2 * h, 0.1).item() == pytest.approx(right.item(), rel=1e-5)
    with pytest.raises(ValueError):
        contrastive_loss(a, p[:3], h, 0.1)
    with pytest.raises(ValueError):
        contrastive_loss(a, p, h, 0.0)


def test_mean_pool_ignores_padding():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    # packed (no mask): every token
    assert torch.allclose(mean_pool(hidden), hidden.mean(1))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    want = torch.stack([hidden[0, :2].mean(0), hidden[1, :1].mean(0)])
    assert torch.allclose(mean_pool(hidden, mask), want)
    # changing what sits under padding changes nothing
    other = hidden.clone()
    other[0, 2] = 1e6
    other[1, 1:] = -1e6
    assert torch.allclose(mean_pool(other, mask), want)
    assert mean_pool(hidden, mask.bool()).shape == (2, 2)


def test_gather_with_grad_is_identity_in_one_process():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x


def _two_rank_worker(rank: int, init: str, seed_rows: torch.Tensor, out: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        w = torch.nn.Parameter(torch.eye(4) + 0.1 * torch.ones(4, 4))
        rows = seed_rows[:, rank * 2 : rank * 2 + 2]  # [3 views, 2 local sequences, 4]
        views = [gather_with_grad(v @ w) for v in rows]
        loss = contrastive_loss(*views, 0.2)
        loss.backward()
        g = w.grad.clone()
        dist.all_reduce(g)
        out[rank] = (loss.item(), (g / 2).tolist())  # DeepSpeed averages gradients over ranks
    finally:
        dist.destroy_process_group()


def test_two_ranks_gather_equals_one_process_on_the_global_batch(tmp_path):
    torch.manual_seed(1)
    rows = torch.randn(3, 4, 4)  # 3 views of 4 sequences, 4 features
    w = torch.nn.Parameter(torch.eye(4) + 0.1 * torch.ones(4, 4))
    want = contrastive_loss(*(v @ w for v in rows), 0.2)
    want.backward()
    out = mp.Manager().dict()
    init = f"file://{tmp_path / 'pg'}"
    mp.spawn(_two_rank_worker, args=(init, rows, out), nprocs=2, join=True)
    for rank in (0, 1):
        loss, grad = out[rank]
        assert loss == pytest.approx(want.item(), rel=1e-5)
        assert torch.allclose(torch.tensor(grad), w.grad, atol=1e-5)


def test_das_run_with_contrastive_term_logs_it(tmp_path):
    cfg = write_tiny_run(
        tmp_path,
        das={"importance_samples": 8, "contrastive": {"weight": 0.1}},
        train={"max_steps_per_stage": 2, "warmup_steps": 1, "log_every": 1},
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, "-m", "cltk", "train", "--config", str(cfg)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    with open(tmp_path / "out" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    extras = [json.loads(r["extra"]) for r in rows if r.get("extra")]
    terms = [e["das_contrastive"] for e in extras if "das_contrastive" in e]
    assert terms, rows
    assert all(math.isfinite(v) and v > 0 for v in terms)
