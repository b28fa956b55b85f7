"""``cltk bench``: every method on the same stages, budget and seeds, against naive sequential training
and joint training, with what each forgets and costs (docs/benchmarks.md).

    cltk bench --tier small --out runs/bench-small [--seeds 1 2] [--arms naive joint replay ...]
    cltk bench --tier real --out runs/bench-real --ranks 8 --steps 200     # the same on GPUs

:mod:`.arms` holds the arms (run-config overrides) and the tiers, :mod:`.run` runs them (resumable,
a progress line per arm and stage), :mod:`.page` writes the page. The bench drives ``cltk train``
in a child process per arm, so each arm is exactly what a user's run with those keys would be.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from cltk.bench.arms import ARMS, TIERS
from cltk.bench.page import write_page
from cltk.bench.run import BenchArgs, bench, read_arm
from cltk.bench.sources import check_general_apart
from cltk.errors import UserError


def run_bench(tier: str, out: str, seeds: list[int], arms: list[str] | None, ranks: int,
              steps: int | None, sets: list[str], base_sets: list[str], page: str | None) -> str:
    """Run (or continue) a bench and write its page; returns the summary table."""
    if tier not in TIERS:
        raise UserError(f"bench: unknown tier {tier!r}; known: {', '.join(TIERS)}")
    if ranks < 1 or (steps is not None and steps < 1):
        raise UserError("bench: --ranks and --steps must be >= 1")
    t = TIERS[tier]
    args = BenchArgs(t, Path(out).resolve(), list(seeds), list(arms or t.arms), ranks, steps,
                     list(sets), list(base_sets))
    if any("{general}" in o for a in args.arms if a in ARMS for o in ARMS[a][0]):
        check_general_apart(t)
    results = bench(args)
    page_path = Path(page).resolve() if page else args.out / "bench.md"
    figures = page_path.parent / "figures" / page_path.stem  # one folder per page
    figures.mkdir(parents=True, exist_ok=True)
    command = "cltk " + " ".join(shlex.quote(a) for a in sys.argv[sys.argv.index("bench"):]) \
        if "bench" in sys.argv else f"cltk bench --tier {tier}"
    bases = {s: read_arm(args.out / f"base-s{s}") for s in args.seeds} if t.base else None
    md = write_page(results, t, args.seeds, command, page_path, figures, bases)
    print(md, flush=True)
    print(f"[bench] page: {page_path}", flush=True)
    return md


__all__ = ["ARMS", "TIERS", "run_bench"]
