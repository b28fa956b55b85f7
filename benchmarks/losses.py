"""Loss kernels side by side: forward + backward time of each on the same logits, one process.

    python benchmarks/losses.py [--batch 8 --seq 127 --vocab 4096 --reps 10 --rounds 5 --threads 1]

Arms, all on the same random student and teacher logits (``[batch, seq, vocab]``, fp32; bf16 with
``--bf16``): ``causal_lm_loss`` (plain CE), ``soft_target_loss`` (the one-pass kernel of
``cltk.methods.kit.soft_losses``), the generic per-token kernel it replaced for soft targets (lambda from a
separate pass over the teacher, the teacher normalised again in forward and backward: what
``soft_target_loss`` did before), and ``distillation_loss``. Each arm runs ``--reps`` calls per
round, the arms rotated every round (round 0 warms up). Printed: median milliseconds per call and
the ratio to plain CE. The default shape is one micro-batch of the quickstart (8 x 127 tokens,
vocabulary 4096) on one torch thread.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=127)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()

    import torch

    from cltk import losses as L
    from cltk.methods.kit import soft_losses as S

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch, args.seq, args.vocab)
    student = torch.randn(shape, generator=g).to(dev, dtype)
    teacher = (torch.randn(shape, generator=g) * 2).to(dev, dtype)
    labels = torch.randint(0, args.vocab, shape[:2], generator=g).to(dev)

    def generic_soft_target(x):
        """soft_target_loss before the one-pass kernel: the generic per-token kernel."""
        safe = labels.clamp_min(0)
        lam = S._soft_target_weight(S._label_logprob(teacher, safe), 0.9, None)
        per, valid = L.token_losses(x, labels, -100, w_y=lam, w_r=1.0 - lam, teacher=teacher)
        return L.reduce_tokens(per, valid, None)

    arms = {
        "plain CE": lambda x: L.causal_lm_loss(x, labels),
        "soft target, one pass (cltk)": lambda x: S.soft_target_loss(x, labels, teacher, p=0.9),
        "soft target, generic kernel (before)": generic_soft_target,
        "distillation": lambda x: S.distillation_loss(x, labels, teacher, alpha=0.5, beta=0.5),
    }
    times: dict[str, list[float]] = {a: [] for a in arms}
    order = list(arms)
    for rnd in range(args.rounds + 1):
        k = rnd % len(order)
        for arm in order[k:] + order[:k]:
            for _ in range(args.reps):
                x = student.detach().requires_grad_(True)
                t0 = time.perf_counter()
                arms[arm](x).backward()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if rnd:
                    times[arm].append(time.perf_counter() - t0)
    med = {a: statistics.median(t) for a, t in times.items()}
    print(
        f"{args.batch} x {args.seq} tokens x vocab {args.vocab}, {str(dtype)[6:]}, {dev}, "
        f"{torch.get_num_threads()} thread(s); {args.rounds} rounds x {args.reps} calls per arm"
    )
    print("| loss (forward + backward) | median ms | vs plain CE |\n|---|---:|---:|")
    for a in arms:
        print(f"| {a} | {med[a] * 1e3:.1f} | {med[a] / med['plain CE']:.2f}x |")


if __name__ == "__main__":
    main()
