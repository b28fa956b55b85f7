"""Cost of the non-finite loss guard: one reduction per optimizer step against one per micro-batch.

    python benchmarks/step_check.py [--steps 8 --rounds 5]                 # one process (CPU or GPU)
    deepspeed --num_gpus 2 benchmarks/step_check.py [--steps 8 --rounds 5]  # 2 ranks

``cltk.engine.train_step`` keeps every logged loss term on the device and checks them once per
optimizer step (one all-reduce and one host copy, after the last backward, before the update). The
arm ``per micro-batch`` adds what the check cost before: a host copy and an all-reduce of the terms
after every micro-batch's forward (a method's ``extra_loss`` that does exactly that, returning no
term). Both arms run on one engine and the same random token ids (step time does not depend on the
text), ``--steps`` steps per arm per round, in a rotated order each round (round 0 warms up); printed
(rank 0): the median step of each and their ratio. ``--set KEY=VALUE`` overrides the config (default
the quickstart's: Llama hidden 256, 4 layers, micro-batch 8 x 128 tokens, ZeRO 2);
``--set train.gradient_accumulation_steps=8`` shows the effect of many micro-batches per step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from _common import VocabOnly, random_batches

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "examples" / "quickstart.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per arm per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    import numpy as np
    import torch

    from cltk import distributed as dist
    from cltk.engine import build_engine, train_step
    from cltk.method import Method, StageContext
    from cltk.models import build_model
    from cltk.validate import load_config

    class PerMicroBatchCheck(Method):
        """What the guard cost before: a host copy and an all-reduce of the terms per micro-batch."""

        name = "per_micro_batch_check"

        def extra_loss(self, ctx, batch, logits, labels):
            terms = torch.stack([logits.detach().float().mean(), labels.float().mean()])
            dist.all_reduce_sum(terms.cpu().clone())
            return {}

    dist.init()
    cfg = load_config(args.config, overrides=args.set, world_size=dist.world_size())
    vocab = int((cfg.model.config or {}).get("vocab_size") or cfg.tokenizer.train.vocab_size)
    total = args.steps * (args.rounds + 1) * 2
    engine = build_engine(cfg, build_model(cfg, VocabOnly(vocab)), total)
    ctx = StageContext(cfg, None, [], {}, None, Path("."), None, engine=engine)
    rng = np.random.default_rng(cfg.seed + dist.rank())
    arms = {"per optimizer step (cltk)": [], "per micro-batch": [PerMicroBatchCheck()]}
    times: dict[str, list[float]] = {a: [] for a in arms}
    order = list(arms)
    for rnd in range(args.rounds + 1):
        for arm in order[rnd % 2 :] + order[: rnd % 2]:
            for _ in range(args.steps):
                micro = random_batches(rng, vocab, cfg)
                dist.barrier()
                t0 = time.perf_counter()
                train_step(ctx, arms[arm], micro)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if rnd:
                    times[arm].append(time.perf_counter() - t0)
    if dist.is_main():
        med = {a: statistics.median(t) for a, t in times.items()}
        base = med[order[0]]
        print(
            f"{dist.world_size()} rank(s), device {engine.device}, ZeRO "
            f"{engine.zero_optimization_stage()}, {cfg.train.gradient_accumulation_steps} "
            f"micro-batch(es) of {cfg.train.micro_batch_size} x {cfg.data.seq_len} tokens per step; "
            f"{args.rounds} rounds x {args.steps} steps per arm"
        )
        print("| non-finite check | median step (s) | vs per step |\n|---|---:|---:|")
        for a in arms:
            print(f"| {a} | {med[a]:.4f} | {med[a] / base:.3f}x |")
    dist.barrier()
    engine.destroy()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
