"""DAS soft-masking: the cost of a masked step and of scoring importance; the quality tables.

Cost (one process; the figures in docs/benchmarks/das.md come from these exact commands)::

    python benchmarks/das.py speed --steps 4 --rounds 30 --importance-seqs 64     # CPU
    python benchmarks/das.py speed --threads 0 --steps 5 --rounds 8 --importance-seqs 512  # GPU
    deepspeed --num_gpus 2 benchmarks/das.py speed ...                    # ZeRO across 2 ranks

Options: ``--config`` (default examples/quickstart.yaml), ``--set KEY=VALUE`` (a bigger model,
another ZeRO JSON: ``--set deepspeed=PATH``), ``--importance-rounds``, ``--hook-reps``,
``--threads`` (torch threads; default 1, so OpenMP does not spin against a shared CPU machine's
other work; 0: torch's default).
It builds the config's model (the quickstart's Llama: hidden 256, 4 layers, 8 heads / 4 KV heads,
FFN 688, vocabulary 4096, sequences of 128 tokens, micro-batch 8, its ZeRO JSON, cltk's AdamW), and

1. builds three engines with the same initial weights: ``none``, ``update``
   (``attach_update_masks`` after ``deepspeed.initialize``: cltk's default, units and token rows of
   the embedding / LM head) and ``update-units`` (units only: ``das.protect_embeddings: false``).
2. times ``cltk.methods.das.importance.estimate_importance`` in ``proxy`` and ``lm`` mode on the ``none``
   engine (as ``DasMethod`` scores: on the engine being trained, partitioned under ZeRO 3, in its
   precision) on ``--importance-seqs`` random sequences split over the ranks, the modes alternating
   for ``--importance-rounds`` rounds; printed as seconds per 1,000 sequences and against training
   1,000 sequences (the ``none`` arm's median step, scaled). The proxy importance it returns
   (normalised) is the one the masks use, so the masked span is what a real stage masks
   (``|tanh(z)|`` is non-zero almost everywhere: every unit weight and token row is masked).
3. runs ``--steps`` optimizer steps of each arm per round on the same random token ids (step time
   does not depend on the text), in a rotated order each round; round 0 warms up and is not timed.
   Each masked arm's ratio to ``none`` (median step over median step) is taken per round, so a
   shared machine's drifting load falls on both sides of each ratio; printed: the median ratio over
   rounds, its quartiles and range. Two clocks: wall, and this process's CPU time
   (``time.process_time``), which a loaded CPU machine disturbs far less (on a GPU the host waits
   for the device, and the two agree). The GPU is synchronised before each read.
4. times the update-mask work alone (``update`` arm), ``--hook-reps`` times: the handle's hooks as ``step()`` calls
   them (the copy of the masked span, then the ``lerp``), and the same work with torch's
   multi-tensor ``_foreach`` ops; as a fraction of ``none``'s median step.

Memory (peak memory of scoring importance at a stage's end, side by side; one process or ranks)::

    python benchmarks/das.py memory --importance-seqs 32 [--set ...]

scores ``--mode`` (lm) importance on the engine after one step (what ``DasMethod`` does now), then
on a second plain fp32 copy of the model (what it did before), and prints the peak memory each adds
per rank: GPU allocated bytes, or the process's RSS sampled every millisecond on a CPU.

Quality in minutes, with and without the token rows: ``benchmarks/das_quality.py``. Quality (two
runs from one base; configs in ``examples/das/``, commands in docs/benchmarks/das.md)::

    python benchmarks/das.py compare --base runs/das/base runs/das/naive runs/das/das

prints ``cltk.metrics.compare_reports`` of the runs, a per-domain table of final perplexity against
the base's (a domain a run keeps evaluation-only, like the base's own, has no forgetting figure in
the report: this table gives it), and each run's matrix (``format_table``).

A script, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from _common import PeakMemory, VocabOnly, random_batches, timed_command  # noqa: E402  (benchmarks/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = ("none", "update", "update-units")


def _sync() -> None:
    """Wait for the GPU's queued work, so that a clock read after it counts that work."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _clock() -> tuple[float, float]:
    """(wall, this process's CPU) seconds, after the GPU's queued work."""
    _sync()
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    now = _clock()
    return now[0] - start[0], now[1] - start[1]


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def _spread(xs: list[float], fmt: str = "{:.3f}") -> str:
    lo, med, hi = _quartiles(xs)
    return (
        f"{fmt.format(med)} (IQR {fmt.format(lo)}-{fmt.format(hi)}, "
        f"range {fmt.format(min(xs))}-{fmt.format(max(xs))}, n={len(xs)})"
    )


# ----- cost ---------------------------------------------------------------------------------------


def _time_importance(engine, cfg, vocab: int, args) -> tuple[dict[str, list[tuple[float, float]]], dict]:
    """(Wall, CPU) seconds per 1,000 sequences of each mode, per round; and a proxy importance."""
    import torch

    from cltk import distributed as dist
    from cltk.methods.das.importance import estimate_importance, normalize

    bs, seq = cfg.train.micro_batch_size, cfg.data.seq_len
    n = args.importance_seqs
    mine = n // dist.world_size() + (1 if dist.rank() < n % dist.world_size() else 0)
    gen = torch.Generator().manual_seed(cfg.seed + 7919 * dist.rank())
    ids = torch.randint(0, vocab, (mine, seq), generator=gen)
    batches = [{"input_ids": ids[i : i + bs]} for i in range(0, mine, bs)]
    per_1k: dict[str, list[tuple[float, float]]] = {"proxy": [], "lm": []}
    imp = None
    modes = list(per_1k)
    for rnd in range(args.importance_rounds):
        for mode in modes[rnd % 2 :] + modes[: rnd % 2]:
            dist.barrier()
            start = _clock()
            raw = estimate_importance(engine, batches, mode=mode, seed=cfg.seed)
            dist.barrier()
            wall, cpu = _since(start)
            per_1k[mode].append((wall / n * 1000, cpu / n * 1000))
            if mode == "proxy":
                imp = normalize(raw)
    return per_1k, imp


def _engines(cfg, vocab: int, total_steps: int) -> dict:
    import torch

    from cltk.engine import build_engine
    from cltk.models import build_model

    engines = {}
    for arm in ARMS:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, VocabOnly(vocab))  # seeded from cfg.seed: the same weights
        engines[arm] = build_engine(cfg, model, total_steps)
    return engines


def _time_hooks(engine, handle, reps: int) -> list[tuple[float, float]]:
    """(Wall, CPU) seconds of the update-mask hooks alone, called as ``step()`` would call them.

    Before and after with nothing in between: the lerp blends equal values, so the weights do not
    change. Uses the handle's hook methods directly (private: a benchmark of exactly that code).
    Not under ZeRO 3: DeepSpeed puts a sub-group's flat tensor into ``param_groups`` only inside
    its ``step()``, so called from outside the hooks find nothing to mask (the caller skips it).
    """
    from cltk.methods.kit.zero_view import zero_view

    parts = list(enumerate(zero_view(engine).partitions))
    out = []
    for _ in range(reps + 1):  # the first call warms up
        start = _clock()
        handle._before(parts)
        handle._after(parts)
        out.append(_since(start))
    return out[1:]


def _time_foreach(handle, reps: int) -> list[tuple[float, float]]:
    """The hooks' work (copy, then lerp) on every target at once with torch's multi-tensor ops.

    The alternative to the per-target loop of ``UpdateMaskHandle``: one launch per op however
    many targets (ZeRO 0 has one target per parameter; ZeRO 1/2 one per group).
    """
    import torch

    ts = list(handle.targets.values())
    if not ts:  # this rank's partition holds no unit weights
        return [(0.0, 0.0)] * reps
    spans, olds, weights = [t.span() for t in ts], [t.old for t in ts], [t.weight for t in ts]
    out = []
    with torch.no_grad():
        for _ in range(reps + 1):
            start = _clock()
            torch._foreach_copy_(olds, spans)
            torch._foreach_lerp_(spans, olds, weights)
            out.append(_since(start))
    return out[1:]


def _time_steps(engines: dict, cfg, vocab: int, args) -> dict[str, list[list[tuple[float, float]]]]:
    """Per arm, per timed round: [(wall seconds, this process's CPU seconds) per step]; the arms in
    a rotated order each round, round 0 a warm-up."""
    import numpy as np

    from cltk import distributed as dist
    from cltk.engine import train_step
    from cltk.method import StageContext

    rng = np.random.default_rng(cfg.seed + dist.rank())
    times: dict[str, list[list[tuple[float, float]]]] = {k: [] for k in ARMS}
    order = list(ARMS)
    for rnd in range(args.rounds + 1):  # round 0 warms up and is not timed
        k = rnd % len(order)
        for arm in order[k:] + order[:k]:
            ctx = StageContext(cfg, None, [], {}, None, Path("."), None, engine=engines[arm])
            steps = []
            for _ in range(args.steps if rnd else 1):
                micro = random_batches(rng, vocab, cfg)
                dist.barrier()
                start = _clock()
                train_step(ctx, [], micro)
                steps.append(_since(start))
            if rnd:
                times[arm].append(steps)
    return times


def _print_importance(imp_times: dict, base: dict, seqs: int, cfg, args) -> None:
    print(
        f"\nimportance on the engine, seconds per 1,000 sequences ({args.importance_seqs} "
        f"sequences a round, micro-batch {cfg.train.micro_batch_size}), and against training 1,000 "
        f"sequences (unmasked median step x {1000 / seqs:.1f}):"
    )
    for mode, xs in imp_times.items():
        for k, clock in enumerate(("wall", "CPU")):
            per = [x[k] for x in xs]
            train_1k = base[k] * 1000 / seqs
            print(
                f"  {mode:5s} {clock:4s} {_spread(per, '{:.1f}')}; training {train_1k:.1f}: "
                f"ratio {statistics.median(per) / train_1k:.2f}"
            )


def _print_steps(times: dict, args) -> None:
    print(
        f"\nstep time ({args.rounds} rounds x {args.steps} steps per arm, rotated order); ratio "
        "to none = per round, median masked step / median unmasked step; then over rounds:"
    )
    print("| arm | clock | median step (s) | ratio to none: median (IQR, range) |")
    print("|---|---|---:|---|")
    for arm in ARMS:
        for k, clock in enumerate(("wall", "CPU")):
            steps = [s[k] for r in times[arm] for s in r]
            cell = "1"
            if arm != "none":
                med = [
                    (statistics.median([x[k] for x in a]), statistics.median([x[k] for x in b]))
                    for a, b in zip(times[arm], times["none"])
                ]
                ratios = [m / n for m, n in med]
                cell = _spread(ratios)
            print(f"| {arm} | {clock} | {statistics.median(steps):.3f} | {cell} |")


def _print_mask_work(handle, hooks: list, foreach: list, base: dict, slowest: list, args) -> None:
    print(
        f"\nupdate-mask work alone, {args.hook_reps} calls, vs the unmasked median step "
        f"({len(handle.targets)} target tensor(s)):"
    )
    print("| what | clock | min (ms) | median (ms) | median / unmasked step |")
    print("|---|---|---:|---:|---:|")
    for what, xs2 in (("hooks (masking.py)", hooks), ("same work, torch._foreach_*", foreach)):
        if not xs2:
            print(f"| {what} | - | n/a under ZeRO 3 (see _time_hooks) | | |")
            continue
        for k, clock in enumerate(("wall", "CPU")):
            xs = [h[k] for h in xs2]
            print(
                f"| {what} | {clock} | {min(xs) * 1e3:.2f} | {statistics.median(xs) * 1e3:.2f} "
                f"| {statistics.median(xs) / base[k] * 100:.2f}% |"
            )
    print(
        f"slowest rank's median mask work (wall): {max(slowest) * 1e3:.2f} ms; masked span "
        f"{handle.masked_numel * 4 / 2**20:.1f} MiB fp32 on rank 0",
        flush=True,
    )


def cmd_speed(args: argparse.Namespace) -> None:
    import torch

    from cltk import distributed as dist
    from cltk.methods.das import DasConfig
    from cltk.validate import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    dist.init()
    cfg = load_config(args.config, overrides=args.set, world_size=dist.world_size())
    cfg.das = cfg.das or DasConfig()
    vocab = int((cfg.model.config or {}).get("vocab_size") or cfg.tokenizer.train.vocab_size)

    from cltk.methods.das.masking import attach_update_masks, param_masks

    total = args.steps * args.rounds + 2
    engines = _engines(cfg, vocab, total)
    imp_times, imp = _time_importance(engines["none"], cfg, vocab, args)
    handle = attach_update_masks(engines["update"], param_masks(engines["update"].module, imp))
    units_only = param_masks(engines["update-units"].module, imp, tokens=False)
    handle_units = attach_update_masks(engines["update-units"], units_only)
    times = _time_steps(engines, cfg, vocab, args)
    hooks = [] if handle.layout == "zero3" else _time_hooks(engines["update"], handle, args.hook_reps)
    foreach = _time_foreach(handle, args.hook_reps)
    work = hooks or foreach
    slowest = dist.all_gather_object(statistics.median([h[0] for h in work]))

    if not dist.is_main():
        dist.barrier()
        return
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engines["none"].module.parameters())
    zero = engines["none"].zero_optimization_stage()
    print(
        f"model: {n_params:,} parameters; {dist.world_size()} rank(s), ZeRO {zero}, "
        f"{torch.get_num_threads()} torch thread(s), batch {cfg.global_batch(dist.world_size())} "
        f"x {cfg.data.seq_len} tokens; update masks ({handle.layout}) span "
        f"{handle.masked_numel:,} elements on rank 0 ({handle_units.masked_numel:,} without "
        "the token rows)"
    )
    base = {k: statistics.median([s[k] for r in times["none"] for s in r]) for k in (0, 1)}
    _print_importance(imp_times, base, cfg.global_batch(dist.world_size()), cfg, args)
    _print_steps(times, args)
    _print_mask_work(handle, hooks, foreach, base, slowest, args)
    dist.barrier()


def cmd_memory(args: argparse.Namespace) -> None:
    """Peak memory of scoring importance after a stage: on the engine just trained (now) against a
    second plain fp32 copy of the model built from the export (before), side by side."""
    import torch

    from cltk import distributed as dist
    from cltk.engine import train_step
    from cltk.method import StageContext
    from cltk.methods.das.importance import estimate_importance
    from cltk.models import build_model
    from cltk.validate import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    dist.init()
    cfg = load_config(args.config, overrides=args.set, world_size=dist.world_size())
    vocab = int((cfg.model.config or {}).get("vocab_size") or cfg.tokenizer.train.vocab_size)
    torch.manual_seed(cfg.seed)
    engine = build_engine_for(cfg, vocab)
    import numpy as np

    rng = np.random.default_rng(cfg.seed + dist.rank())
    ctx = StageContext(cfg, None, [], {}, None, Path("."), None, engine=engine)
    train_step(ctx, [], random_batches(rng, vocab, cfg))  # optimizer states exist, as at stage end
    gen = torch.Generator().manual_seed(dist.rank())
    ids = torch.randint(0, vocab, (args.importance_seqs, cfg.data.seq_len), generator=gen)
    bs = cfg.train.micro_batch_size
    batches = [{"input_ids": ids[i : i + bs]} for i in range(0, len(ids), bs)]
    out = {}
    # The engine first: should memory a CPU process frees stay with it despite malloc_trim, it can
    # only make the second arm (the copy) look cheaper than it is.
    with PeakMemory() as m:
        estimate_importance(engine, batches, mode=args.mode)
    out["engine (now)"] = m.added
    with PeakMemory() as m:
        copy = build_model(cfg, VocabOnly(vocab)).to(dist.device())  # as build_model(init_dir=..)
        estimate_importance(copy, batches, mode=args.mode)
        del copy
    out["second fp32 copy (before)"] = m.added
    peaks = dist.all_gather_object(out)
    if dist.is_main():
        n = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
        where = "GPU allocated" if torch.cuda.is_available() else "process RSS"
        print(
            f"model {n:,} parameters ({n * 4 / 2**20:.0f} MiB in fp32); ZeRO "
            f"{engine.zero_optimization_stage()}, {'bf16' if engine.bfloat16_enabled() else 'fp32'}"
            f", {dist.world_size()} rank(s); {args.mode} importance of {args.importance_seqs} "
            f"sequences of {cfg.data.seq_len} per rank, micro-batch {bs}"
        )
        print(f"\n| scoring on | peak {where} added, per rank (MiB) |\n|---|---:|")
        for arm in out:
            cells = ", ".join(f"{p[arm] / 2**20:.0f}" for p in peaks)
            print(f"| {arm} | {cells} |")
    dist.barrier()


def build_engine_for(cfg, vocab: int):
    from cltk.engine import build_engine
    from cltk.models import build_model

    return build_engine(cfg, build_model(cfg, VocabOnly(vocab)), 10)


# ----- quality ------------------------------------------------------------------------------------


def cmd_compare(args: argparse.Namespace) -> None:
    from cltk.metrics import compare_reports, format_table
    from cltk.metrics_files import load_report

    runs = {Path(r).name: load_report(Path(r)) for r in args.runs}
    print(compare_reports(runs))
    base = load_report(Path(args.base)) if args.base else None
    domains = next(iter(runs.values())).domain_names
    if base is not None:
        head = "| domain | base | " + " | ".join(f"{n} final | {n} vs base" for n in runs) + " |"
        print("\nFinal perplexity per domain against the base's:\n\n" + head)
        print("|---|---:|" + "---:|---:|" * len(runs))
        b = base.final
        for d in domains:
            cells = " | ".join(
                f"{r.final[d]:.2f} | {100 * (r.final[d] / b[d] - 1):+.1f}%" for r in runs.values()
            )
            print(f"| {d} | {b[d]:.2f} | {cells} |")
    if base is not None:
        print("\nbase:\n" + format_table(base))
    for name, r in runs.items():
        print(f"\n{name}:\n" + format_table(r))


def cmd_probe(args: argparse.Namespace) -> None:
    """Where the base's knowledge was lost: each stage export as trained, and with the base's
    embeddings put back (DAS masks heads and FFN units only; embeddings, norms and the tied LM
    head train freely). Writes the hybrids under ``--out`` and evaluates every model on the
    config's domains (``cltk.report.evaluate_models``: rows in the order given)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from cltk.report import evaluate_models
    from cltk.validate import load_config

    cfg = load_config(args.config)
    out = Path(args.out)
    base = load_file(str(Path(args.base) / "model.safetensors"))
    rows: list[tuple[str, Path, str]] = []  # (row name, model directory, its domain)
    for m in map(Path, args.models):
        domain = json.loads((m / "stage.json").read_text())["domain"]
        label = f"{m.parent.parent.name}-{m.name}"  # RUN-NN-domain
        hybrid = out / "models" / f"{label}+base-embed"
        if hybrid.exists():
            shutil.rmtree(hybrid)
        shutil.copytree(m, hybrid)
        weights = load_file(str(m / "model.safetensors"))
        swapped = [k for k in weights if "embed_tokens" in k or "lm_head" in k]
        weights.update({k: base[k] for k in swapped})
        save_file(weights, str(hybrid / "model.safetensors"), metadata={"format": "pt"})
        print(f"{hybrid.name}: base values for {', '.join(swapped)}")
        rows += [(label, m, domain), (hybrid.name, hybrid, domain)]
    named = []
    for i, (label, d, _) in enumerate(rows):  # report rows are named after the directories
        link = out / "rows" / f"{i:02d}-{label}"
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(d.resolve())
        named.append(link)
    domains = [r[2] for r in rows]
    evaluate_models(cfg, named, out, stage_domains=domains)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = timed_command(sub, "speed", "step time with / without update masks; importance time", 4, 8)
    s.add_argument("--importance-seqs", type=int, default=128)
    s.add_argument("--importance-rounds", type=int, default=3)
    s.add_argument("--hook-reps", type=int, default=50)
    s.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (0: torch's default); 1 keeps OpenMP from "
        "spinning against the other processes of a shared machine",
    )
    m = sub.add_parser("memory", help="peak memory of importance: on the engine vs a 2nd copy")
    m.add_argument("--config", default=str(ROOT / "examples" / "quickstart.yaml"))
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    m.add_argument("--importance-seqs", type=int, default=32)
    m.add_argument("--mode", default="lm", choices=["lm", "proxy"])
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    c = sub.add_parser("compare", help="tables of the quality runs (after training them)")
    c.add_argument("runs", nargs="+", help="run output directories (forgetting.json inside)")
    c.add_argument("--base", default=None, help="the base run's directory: its final row")
    r = sub.add_parser("probe", help="stage exports with the base's embeddings put back")
    r.add_argument("models", nargs="+", help="stage exports (RUN/stages/NN-domain)")
    r.add_argument("--base", required=True, help="the base model directory")
    r.add_argument("--config", required=True, help="a run config: domains, tokenizer, eval")
    r.add_argument("--out", required=True)
    args = p.parse_args()
    cmds = {"speed": cmd_speed, "memory": cmd_memory, "compare": cmd_compare, "probe": cmd_probe}
    cmds[args.cmd](args)


if __name__ == "__main__":
    main()
