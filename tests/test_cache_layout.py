"""The packed teacher-cache record: bit packing, 8-bit quantisation, and the sampled tail's estimator."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cltk.methods.kit.soft_losses import soft_target_loss, soft_target_loss_topk
from cltk.methods.soft_targets.cache_layout import (
    PackedLayout,
    decode,
    encode,
    samples_for_budget,
)


def _dist(b: int, t1: int, v: int, seed: int = 0, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    lp = F.log_softmax(scale * torch.randn(b, t1, v, generator=g), -1)
    y = torch.randint(0, v, (b, t1), generator=g)
    return lp, y


@pytest.mark.parametrize("vocab", [5, 4096, 40000, 128256])
def test_packing_round_trips_ids_at_the_vocabulary_bit_width(vocab):
    head = 3
    lay = PackedLayout(vocab, head, samples_for_budget(vocab, head, 64))
    assert lay.bytes_per_token <= 64 and lay.bits == math.ceil(math.log2(vocab))
    lp, y = _dist(2, 3, vocab, seed=vocab)
    rec = encode(lay, lp, y, [11, 12])
    assert rec.dtype == torch.uint8 and rec.shape == (2, 3, lay.bytes_per_token)
    out_lp, out_ids, label_lp = decode(lay, rec, y)
    assert out_ids.shape == out_lp.shape == (2, 3, lay.entries)
    assert torch.equal(out_ids[..., 0], y)
    # the label's log-prob is kept bit for bit (fp32)
    assert torch.equal(label_lp, lp.gather(-1, y.unsqueeze(-1)).squeeze(-1))
    # the head: the largest probabilities other than the label's, in order, ids exact
    rest = lp.scatter(-1, y.unsqueeze(-1), float("-inf"))
    hv, hi = rest.topk(head, -1)
    assert torch.equal(out_ids[..., 1:1 + head], hi)
    # the draws: ids within the vocabulary, never the label or a head entry
    draws = out_ids[..., 1 + head:]
    assert draws.min() >= 0 and draws.max() < vocab
    assert not (draws.unsqueeze(-1) == out_ids[..., :1 + head].unsqueeze(-2)).any()
    # the ids hold the full width: token ids near the top of the vocabulary survive
    top = torch.full((1, 1, vocab), -30.0)
    top[0, 0, vocab - 1], top[0, 0, vocab - 2] = 0.0, -1.0
    rec = encode(lay, F.log_softmax(top, -1), torch.tensor([[0]]), [1])
    assert decode(lay, rec, torch.tensor([[0]]))[1][0, 0, 1:3].tolist() == [vocab - 1, vocab - 2]


def test_head_quantisation_error_is_half_a_step_and_the_record_sums_to_one():
    lay = PackedLayout(4096, 8, 24)
    lp, y = _dist(4, 16, 4096, seed=3)
    out_lp, _, label_lp = decode(lay, encode(lay, lp, y, [1, 2, 3, 4]), y)
    hv = lp.scatter(-1, y.unsqueeze(-1), float("-inf")).topk(8, -1).values
    step = (hv[..., 0] - hv[..., -1]) / 255
    err = (out_lp[..., 1:9] - hv).abs()
    # half a step, plus the fp16 rounding of the top value and of the step itself
    bound = step.unsqueeze(-1) * (0.5 + 255 * 2**-11) + hv[..., :1].abs() * 2**-11 + 1e-6
    assert (err <= bound).all()
    assert err.max() > 0  # quantised, not stored whole
    assert torch.allclose(out_lp.exp().sum(-1), torch.ones(4, 16), atol=1e-5)
    # the label entry is q_y itself, so the moved target holds exactly p at the label
    assert torch.equal(out_lp[..., 0], label_lp)


def test_the_sampled_estimate_is_unbiased_where_topk_is_not():
    """Mean over many independent records of the decoded target equals q; the soft-target loss and
    its gradient averaged over the records equal the full softmax's (to the sampling error)."""
    v, n, p = 64, 4000, 0.3
    lay = PackedLayout(v, 4, 6)
    lp1, y1 = _dist(1, 1, v, seed=5, scale=1.5)
    lp, y = lp1.expand(n, 1, v).contiguous(), y1.expand(n, 1).contiguous()
    t_lp, t_ids, t_lab = decode(lay, encode(lay, lp, y, list(range(n))), y)
    q_hat = torch.zeros(n, v).scatter_add_(1, t_ids.reshape(n, -1), t_lp.exp().reshape(n, -1))
    q = lp1.reshape(v).exp()
    se = q_hat.std(0) / math.sqrt(n)
    assert ((q_hat.mean(0) - q).abs() <= 4 * se + 2e-3 * q).all()  # 2e-3: the head's 8 bits
    # the loss: the mean over draws of CE(q^) equals CE(q); the gradient too
    z1 = torch.randn(1, 1, v, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    z = z1.expand(n, 1, v).clone().requires_grad_(True)
    est = soft_target_loss_topk(z, y, t_lp, t_ids, t_lab, p=p)
    est.backward()
    zf = z1.clone().requires_grad_(True)
    exact = soft_target_loss(zf, y1, lp1, p=p)
    exact.backward()
    per_draw = -(q_hat.double() * F.log_softmax(z1.reshape(1, v), -1)).sum(-1)
    se_loss = per_draw.std() / math.sqrt(n)
    assert abs(est.item() - exact.item()) <= 4 * se_loss.item() + 1e-3
    g_est = z.grad.sum(0)  # the mean's gradient: the average over draws of each draw's gradient
    assert F.cosine_similarity(g_est.reshape(-1), zf.grad.reshape(-1), dim=0) > 0.999
    # the same budget as top-k, renormalised (no draws): a bias many draws cannot remove
    top = PackedLayout(v, 10, 0)
    k_lp, k_ids, k_lab = decode(top, encode(top, lp, y, list(range(n))), y)
    biased = soft_target_loss_topk(z1.expand(n, 1, v), y, k_lp, k_ids, k_lab, p=p)
    assert abs(biased.item() - exact.item()) > 20 * se_loss.item()


def test_draws_are_seeded_by_row_not_by_batch():
    lay = PackedLayout(300, 2, 20)
    lp, y = _dist(3, 5, 300, seed=9)
    both = encode(lay, lp, y, [7, 8, 9])
    assert torch.equal(encode(lay, lp[1:2], y[1:2], [8]), both[1:2])
    assert not torch.equal(encode(lay, lp[1:2], y[1:2], [10]), both[1:2])


def test_layout_checks():
    assert samples_for_budget(4096, 8, 64) == 24 and samples_for_budget(4096, 0, 64) == 37
    assert samples_for_budget(49152, 8, 64) == 16
    with pytest.raises(ValueError, match="head"):
        PackedLayout(10, 10, 1)
    with pytest.raises(ValueError, match="head \\+ samples"):
        PackedLayout(10, 0, 0)
