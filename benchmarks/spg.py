"""SPG's cost per optimizer step: a torch AdamW step on fp32 weights with and without SPG's hooks.

    python benchmarks/spg.py [--elements 20000000 --reps 5 --rounds 3 --threads 1]

One flat fp32 parameter of ``--elements`` elements with a gradient, stepped by torch's AdamW (weight
decay on) as ZeRO's fp32 partition is (layout ``plain`` here; the hooks are the same under ZeRO 1/2/3,
on this rank's partition). Arms: ``adamw`` (no SPG: the first domain before its scoring window),
``adamw + blend`` (SPG's update blend with importance everywhere in (0, 1): later domains), and
``adamw + blend + gradient sum`` (the last ``spg.importance_steps`` steps of later domains). Each arm
runs ``--reps`` steps per round, the arms rotated every round (round 0 warms up); printed: the fastest
step of each arm in milliseconds and its ratio to ``adamw``. Forward and backward are left out: they
cost the same in every arm.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=20_000_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    import torch

    from cltk.methods.kit.zero_view import zero_view
    from cltk.methods.spg import SpgConfig
    from cltk.methods.spg.method import SpgMethod
    from cltk.methods.spg.sharded import layout_record

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.randn(args.elements))
    module.w.grad = torch.randn(args.elements) * 1e-3
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.01)
    engine = SimpleNamespace(module=module, optimizer=opt)
    stage = SimpleNamespace(block=0, blocks=1, name="d", domain="d")
    view = zero_view(engine)

    def arm(blend: bool, collect: bool) -> SpgMethod | None:
        if not blend:
            return None
        method = SpgMethod(None, SpgConfig(importance_steps=1))
        method.importance = [torch.rand(p.numel) * 0.98 + 0.01 for p in view.partitions]
        method.layout = layout_record(view)
        # step N - 1 of N: inside the scoring window when collecting, before it otherwise
        ctx = SimpleNamespace(engine=engine, stage=stage, schedule=range(2), step=int(collect))
        method.on_engine_ready(ctx)
        method.after_backward(ctx)
        return method

    arms = {
        "adamw": (False, False),
        "adamw + blend": (True, False),
        "adamw + blend + gradient sum": (True, True),
    }
    best = {name: float("inf") for name in arms}
    for r in range(args.rounds + 1):
        names = list(arms)
        names = names[r % len(names) :] + names[: r % len(names)]
        for name in names:
            method = arm(*arms[name])
            for _ in range(args.reps):
                start = time.perf_counter()
                opt.step()
                if r:
                    best[name] = min(best[name], time.perf_counter() - start)
            if method is not None:
                method._release()
    print(f"{args.elements:,} fp32 elements, {torch.get_num_threads()} torch thread(s)\n")
    print("| arm | fastest optimizer step (ms) | vs adamw |\n|---|---|---|")
    for name, t in best.items():
        print(f"| {name} | {t * 1e3:.1f} | {t / best['adamw']:.2f}x |")


if __name__ == "__main__":
    main()
