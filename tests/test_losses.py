"""Losses against plain references that build the V-sized targets the real code avoids."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cltk.losses as losses_module
from cltk.losses import causal_lm_loss, token_nll
from cltk.methods.kit.soft_losses import distillation_loss, soft_target_loss, soft_target_loss_topk

B, S, V = 3, 7, 11


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float32, sharp: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, V, generator=g).to(dtype)
    teacher = F.log_softmax(sharp * torch.randn(B, S, V, generator=g), dim=-1).to(dtype)
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, 0] = labels[2, 5] = -100
    return logits, labels, teacher


def _moved_target(teacher_logprobs, labels, p, one_hot_below):
    """The transformed distribution v', built entry by entry from its definition."""
    q = teacher_logprobs.double().exp()
    target = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for s in range(q.shape[1]):
            y = int(labels[b, s])
            if y == -100:
                continue
            v = q[b, s]
            if one_hot_below is not None and v[y] < one_hot_below:
                target[b, s, y] = 1.0
            elif v[y] >= p:
                target[b, s] = v
            else:
                target[b, s] = v * (1 - p) / (1 - v[y])
                target[b, s, y] = p
    return target


def _reference_soft_ce(logits, labels, target):
    logp = F.log_softmax(logits.double(), dim=-1)
    per_token = -(target * logp).sum(-1)
    valid = labels != -100
    return per_token[valid].mean()


def test_causal_lm_loss_matches_cross_entropy_and_token_nll():
    logits, labels, _ = _inputs()
    ref = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(causal_lm_loss(logits, labels), ref, atol=1e-6)
    nll, count = token_nll(logits, labels)
    assert int(count) == int((labels != -100).sum())
    assert torch.allclose(nll / count, ref, atol=1e-6)
    # a global count divides the same sum
    assert torch.allclose(causal_lm_loss(logits, labels, num_tokens=100), nll / 100, atol=1e-6)


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda lg, lb, t, n: soft_target_loss(lg, lb, t, p=0.6, num_tokens=n),
        lambda lg, lb, t, n: distillation_loss(lg, lb, t, temperature=2.0, num_tokens=n),
        lambda lg, lb, t, n: causal_lm_loss(lg, lb, num_tokens=n),
    ],
)
def test_micro_batches_with_global_count_equal_whole_batch(loss_fn):
    logits, labels, teacher = _inputs(seed=10)
    labels[1, 2:] = -100  # uneven token counts per micro-batch
    whole = loss_fn(logits, labels, teacher, None)
    n = (labels != -100).sum()
    parts = sum(
        loss_fn(logits[i : i + 1], labels[i : i + 1], teacher[i : i + 1], n) for i in range(B)
    )
    assert torch.allclose(whole, parts, atol=1e-6)
    # while the mean of per-micro-batch means is a different number
    means = (
        sum(
            loss_fn(logits[i : i + 1], labels[i : i + 1], teacher[i : i + 1], None)
            for i in range(B)
        )
        / B
    )
    assert not torch.allclose(whole, means, atol=1e-3)


def test_all_ignored_gives_zero_not_nan():
    logits, labels, teacher = _inputs()
    labels = torch.full_like(labels, -100)
    logits.requires_grad_(True)
    loss = soft_target_loss(logits, labels, teacher)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


@pytest.mark.parametrize(
    "p,one_hot_below,sharp", [(0.9, None, 1.0), (0.5, 0.1, 1.0), (0.3, None, 6.0), (1.0, None, 1.0)]
)
def test_soft_target_matches_direct_construction(p, one_hot_below, sharp):
    logits, labels, teacher = _inputs(seed=1, sharp=sharp)
    q_y = teacher.exp().gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    valid = labels != -100
    if sharp > 1:  # the "kept" branch must really be exercised
        assert bool(((q_y >= p) & valid).any()) and bool(((q_y < p) & valid).any())
    if one_hot_below is not None:
        assert bool(((q_y < one_hot_below) & valid).any())
    target = _moved_target(teacher, labels, p, one_hot_below)
    ref = _reference_soft_ce(logits, labels, target)
    got = soft_target_loss(logits, labels, teacher, p=p, one_hot_below=one_hot_below)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), ref, atol=1e-5)


def test_soft_target_accepts_raw_teacher_logits():
    logits, labels, _ = _inputs(seed=12)
    raw = 4.0 * torch.randn(B, S, V, generator=torch.Generator().manual_seed(3)) + 7.0
    want = soft_target_loss(logits, labels, F.log_softmax(raw, -1), p=0.5, one_hot_below=0.05)
    got = soft_target_loss(logits, labels, raw, p=0.5, one_hot_below=0.05)
    assert torch.allclose(got, want, atol=1e-6)


def test_soft_target_ignores_garbage_at_ignored_positions():
    logits, labels, teacher = _inputs(seed=2)
    ref = soft_target_loss(logits, labels, teacher)
    teacher2 = teacher.clone()
    teacher2[0, 0] = float("nan")  # labels[0, 0] is ignored
    logits2 = logits.clone().requires_grad_(True)
    got = soft_target_loss(logits2, labels, teacher2)
    got.backward()
    assert torch.allclose(got, ref) and torch.isfinite(logits2.grad).all()


def test_soft_target_bf16_inputs_match_fp32_reference():
    logits, labels, teacher = _inputs(seed=3, dtype=torch.bfloat16)
    target = _moved_target(teacher.float(), labels, 0.8, 0.05)
    ref = _reference_soft_ce(logits.float(), labels, target)
    logits.requires_grad_(True)
    got = soft_target_loss(logits, labels, teacher, p=0.8, one_hot_below=0.05)
    got.backward()
    assert got.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    assert torch.allclose(got.double(), ref, atol=1e-4)


def test_soft_target_gradient_matches_reference_and_spares_teacher():
    logits, labels, teacher = _inputs(seed=4)
    teacher.requires_grad_(True)
    a = logits.clone().requires_grad_(True)
    soft_target_loss(a, labels, teacher, p=0.7, one_hot_below=0.02).backward()
    b = logits.clone().double().requires_grad_(True)
    target = _moved_target(teacher.detach(), labels, 0.7, 0.02)
    _reference_soft_ce(b, labels, target).backward()
    assert torch.allclose(a.grad.double(), b.grad, atol=1e-6)
    assert teacher.grad is None


@pytest.mark.parametrize("chunk_rows", [1, 100])
def test_gradcheck_float64(monkeypatch, chunk_rows):
    # chunk_rows=1 walks the tokens one at a time through the chunked kernel
    monkeypatch.setattr(losses_module, "CHUNK_ELEMENTS", chunk_rows * 5)
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = F.log_softmax(torch.randn(1, 3, 5, generator=g, dtype=torch.float64), -1)
    labels = torch.tensor([[1, -100, 4]])
    topv, topi = teacher.topk(3, dim=-1)
    label_lp = teacher.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    fns = [
        lambda x: soft_target_loss(x, labels, teacher, p=0.6, one_hot_below=0.1),
        lambda x: soft_target_loss(x, labels, teacher, p=0.9, one_hot_below=0.3),
        lambda x: soft_target_loss_topk(x, labels, topv, topi, label_lp, p=0.6),
        lambda x: distillation_loss(x, labels, teacher, alpha=0.7, beta=0.3, temperature=2.0),
        lambda x: causal_lm_loss(x, labels),
    ]
    for fn in fns:
        assert fn(logits).dtype == torch.float64  # fp64 is kept, so default tolerances hold
        assert torch.autograd.gradcheck(fn, (logits,))


def test_chunked_equals_unchunked(monkeypatch):
    logits, labels, teacher = _inputs(seed=11)
    topv, topi = teacher.topk(4, dim=-1)
    label_lp = teacher.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    fns = [
        lambda x: soft_target_loss(x, labels, teacher, p=0.7, one_hot_below=0.02),
        lambda x: soft_target_loss_topk(x, labels, topv, topi, label_lp, p=0.7),
        lambda x: distillation_loss(x, labels, teacher, alpha=0.6, beta=0.4, temperature=1.5),
        lambda x: causal_lm_loss(x, labels),
    ]
    for fn in fns:
        results = []
        for chunk_elements in (10**9, 2 * V):  # one chunk, then 2 tokens per chunk (11 chunks)
            monkeypatch.setattr(losses_module, "CHUNK_ELEMENTS", chunk_elements)
            x = logits.clone().requires_grad_(True)
            loss = fn(x)
            loss.backward()
            results.append((loss.detach(), x.grad))
        assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
        assert torch.allclose(results[0][1], results[1][1], atol=1e-7)


def test_topk_equals_full_when_k_is_vocab():
    logits, labels, teacher = _inputs(seed=6)
    topv, topi = teacher.topk(V, dim=-1)
    label_lp = teacher.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    for p, ohb in [(0.9, None), (0.4, 0.05)]:
        full = soft_target_loss(logits, labels, teacher, p=p, one_hot_below=ohb)
        topk = soft_target_loss_topk(logits, labels, topv, topi, label_lp, p=p, one_hot_below=ohb)
        assert torch.allclose(full, topk, atol=1e-6)


def test_topk_with_label_outside_topk():
    logits, labels, teacher = _inputs(seed=7)
    k, p = 3, 0.9
    topv, topi = teacher.topk(k, dim=-1)
    # make every label a token the teacher does NOT rank in its top k
    labels = torch.where(labels == -100, labels, teacher.argmin(-1))
    in_topk = (topi == labels.clamp_min(0).unsqueeze(-1)).any(-1)
    assert not in_topk[labels != -100].any()
    label_lp = teacher.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    got = soft_target_loss_topk(logits, labels, topv, topi, label_lp, p=p)
    # reference: lambda from the exact q_y, soft part = top-k mass renormalised, built densely
    q = teacher.double().exp()
    q_y = label_lp.double().exp()
    lam = ((p - q_y) / (1 - q_y)).clamp_min(0)
    trunc = torch.zeros_like(q).scatter(-1, topi, q.gather(-1, topi))
    trunc = trunc / trunc.sum(-1, keepdim=True)
    onehot = F.one_hot(labels.clamp_min(0), V).double()
    target = lam[..., None] * onehot + (1 - lam[..., None]) * trunc
    ref = _reference_soft_ce(logits, labels, target)
    assert torch.allclose(got.double(), ref, atol=1e-5)
    # the truncation matters here: the full-vocab loss differs
    assert not torch.allclose(got, soft_target_loss(logits, labels, teacher, p=p), atol=1e-3)


@pytest.mark.parametrize("alpha,beta,t", [(1.0, 1.0, 1.0), (0.5, 0.0, 2.0), (0.0, 1.0, 3.0)])
def test_distillation_matches_plain_reference(alpha, beta, t):
    logits, labels, teacher = _inputs(seed=8)
    valid = labels != -100
    log_s = F.log_softmax(logits.double() / t, -1)
    log_t = F.log_softmax(teacher.double() / t, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)[valid].mean()
    ce = F.cross_entropy(logits.double().reshape(-1, V), labels.reshape(-1))
    ref = alpha * t * t * kl + beta * ce
    x = logits.clone().requires_grad_(True)
    got = distillation_loss(x, labels, teacher, alpha=alpha, beta=beta, temperature=t)
    assert torch.allclose(got.double(), ref, atol=1e-5)
    got.backward()
    ref_x = logits.double().requires_grad_(True)
    log_s = F.log_softmax(ref_x / t, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)[valid].mean()
    ce = F.cross_entropy(ref_x.reshape(-1, V), labels.reshape(-1))
    (alpha * t * t * kl + beta * ce).backward()
    assert torch.allclose(x.grad.double(), ref_x.grad, atol=1e-6)


def test_distillation_of_teacher_itself_is_zero_kl():
    _, labels, teacher = _inputs(seed=9)
    got = distillation_loss(teacher * 1.0, labels, teacher, alpha=1.0, beta=0.0, temperature=2.0)
    assert abs(got.item()) < 1e-5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"p": 0.0}, "p must be in"),
        ({"p": 1.5}, "p must be in"),
        ({"one_hot_below": -0.1}, "one_hot_below"),
        ({"p": 0.5, "one_hot_below": 0.6}, "exceed"),
    ],
)
def test_soft_target_rejects_bad_arguments(kwargs, match):
    logits, labels, teacher = _inputs()
    with pytest.raises(ValueError, match=match):
        soft_target_loss(logits, labels, teacher, **kwargs)


def test_shape_and_argument_errors():
    logits, labels, teacher = _inputs()
    with pytest.raises(ValueError, match="not aligned"):
        causal_lm_loss(logits[:, :-1], labels)
    with pytest.raises(ValueError, match="teacher_logprobs"):
        soft_target_loss(logits, labels, teacher[..., :-1])
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(logits, labels, teacher, temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(logits, labels, teacher, alpha=-1)
    with pytest.raises(ValueError, match="num_tokens"):
        causal_lm_loss(logits, labels, num_tokens=0)
    topv, topi = teacher.topk(3, -1)
    with pytest.raises(ValueError, match="label_logprobs"):
        soft_target_loss_topk(logits, labels, topv, topi, topv[..., 0, None])


def test_one_pass_soft_target_equals_the_generic_kernel_and_returns_q_y():
    """The one-pass soft-target kernel against the generic per-token kernel it replaced (lambda from a
    separate pass over the teacher): loss and gradient equal; log q_y is the teacher's at the label."""
    from cltk.losses import reduce_tokens, token_losses
    from cltk.methods.kit.soft_losses import _label_logprob, _soft_target_weight

    logits, labels, teacher = _inputs(seed=21)
    raw = teacher * 1.7 + 0.3  # raw logits: both kernels normalise them
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    got, lq = soft_target_loss(a, labels, raw, p=0.8, one_hot_below=0.05, return_label_logprobs=True)
    safe = labels.clamp_min(0)
    lam = _soft_target_weight(_label_logprob(raw, safe), 0.8, 0.05)
    per, valid = token_losses(b, labels, -100, w_y=lam, w_r=1.0 - lam, teacher=raw)
    want = reduce_tokens(per, valid, None)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    ref_lq = F.log_softmax(raw, -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lq, torch.where(labels != -100, ref_lq, torch.zeros_like(ref_lq)))
