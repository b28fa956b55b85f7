"""Cost of soft-target training: online teacher and offline cache against plain cross-entropy.

    deepspeed --num_gpus 2 benchmarks/soft_targets.py [--steps 6 --rounds 3 --topk 64]
    deepspeed --num_gpus 1 benchmarks/soft_targets.py --set model.config.hidden_size=1024 ...

Measured side by side in one run, on one student engine and the same batches: the model is the
quickstart's Llama (``examples/quickstart.yaml``: hidden 256, 4 layers, vocabulary 4096, sequences
of 128 tokens, micro-batch 8, the config's ZeRO JSON), trained on random token ids (the step time
does not depend on the text). The teacher is the student's own initial weights, exported with
``save_pretrained``, as a previous stage would be. Each mode runs ``--steps`` optimizer steps per
round, in a rotated order each round, and the median step time over all rounds is reported, so
drift of a shared machine's load falls on every mode alike.

Printed (rank 0): median step time of plain CE, soft targets with the online teacher, soft targets
from the offline top-k cache, their ratios to CE, the teacher's forward alone, the cache build time
and bytes per token, and per rank the teacher parameters it holds (bytes) and the growth of its
memory (resident memory, RSS, on CPU; allocated CUDA memory on a GPU) when a ZeRO-3 teacher and a
full-copy teacher are loaded. ``--set KEY=VALUE`` overrides the config (a bigger model, say).

A script, not a test: the figures in docs/benchmarks/soft_targets.md come from it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from _common import VocabOnly  # noqa: E402  (benchmarks/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]


def _mem_mib() -> float:
    """Allocated CUDA memory on a GPU, else the resident memory of this process (VmRSS), MiB."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class _StudentAs:
    """A student engine seen with another ZeRO stage (to load both kinds of teacher beside it)."""

    def __init__(self, engine, stage: int):
        self.engine, self.stage = engine, stage

    def zero_optimization_stage(self) -> int:
        return self.stage

    def bfloat16_enabled(self) -> bool:
        return self.engine.bfloat16_enabled()

    def fp16_enabled(self) -> bool:
        return self.engine.fp16_enabled()


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "examples" / "quickstart.yaml"))
    ap.add_argument("--vocab", type=int, default=4096, help="the quickstart tokenizer's size")
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps per mode per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    ap.add_argument("--topk", type=int, default=64,
                    help="blocks.topk of the offline cache (with --set blocks.cache_layout=topk)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. model.config.num_hidden_layers=8 (repeatable)",
    )
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args()


def _student(args, tmp: Path, world: int):
    """The config, the student engine and its stage context over random token rows (whose
    schedule covers every step), the teacher exported from the student's initial weights."""
    import datasets

    from cltk import distributed as dist
    from cltk.data.packing import PackedDomain
    from cltk.data.sampler import Pool, StageSchedule
    from cltk.engine import build_engine
    from cltk.method import StageContext
    from cltk.models import build_model, export_pretrained
    from cltk.plan import Stage
    from cltk.validate import load_config

    overrides = [f"output_dir={tmp / 'out'}", "blocks.k=2", f"blocks.topk={args.topk}", "blocks.p=0.9"]
    cfg = load_config(args.config, world_size=world, overrides=[*overrides, *args.set])
    tok = VocabOnly(args.vocab)
    model = build_model(cfg, tok)
    if dist.rank() == 0:
        export_pretrained(model, None, None, tmp / "teacher")
    dist.barrier()
    gb, seq = cfg.global_batch(world), cfg.data.seq_len
    n_steps = args.warmup + args.steps * args.rounds
    ids = np.random.default_rng(0).integers(0, args.vocab, (n_steps * gb, seq)).astype(np.int32)
    train = datasets.Dataset.from_dict({"input_ids": ids})
    name = cfg.domains[0].name
    sched = StageSchedule(Pool(0, np.arange(len(ids))), [], gb, 1.0, None, cfg.seed, 1)
    stage = Stage(1, name, 0, 1, 2, np.arange(len(ids)))
    engine = build_engine(cfg, model, len(sched))
    domains = {name: PackedDomain(name, train, train.select([]))}
    ctx = StageContext(cfg, stage, [stage], domains, tok, tmp / "stage", tmp / "teacher",
                       model=model, engine=engine, schedule=sched)
    return cfg, ctx, ids


def _batches(ctx, ids, step: int) -> list:
    """This rank's micro-batches of a step, from the schedule."""
    import torch

    from cltk import distributed as dist

    mb = ctx.cfg.train.micro_batch_size
    return [
        torch.as_tensor(ids[[i for _, i in m]].astype(np.int64))
        for m in ctx.schedule.micro_batches(step, dist.rank(), dist.world_size(), mb)
    ]


def _time_modes(args, ctx, ids, modes: dict) -> dict[str, list[float]]:
    """Warm-up steps of every mode, then per round each mode's timed steps in a rotated order."""
    from cltk.engine import train_step

    times: dict[str, list[float]] = {m: [] for m in modes}
    for step in range(args.warmup):
        for methods in modes.values():
            train_step(ctx, methods, _batches(ctx, ids, step))
    order = list(modes)
    for r in range(args.rounds):
        for mode in order[r % len(order) :] + order[: r % len(order)]:
            for s in range(args.steps):
                step = args.warmup + r * args.steps + s
                micro = _batches(ctx, ids, step)
                t0 = time.perf_counter()
                train_step(ctx, modes[mode], micro)
                times[mode].append(time.perf_counter() - t0)
    return times


def _time_teacher_forward(args, ctx, ids, online) -> list[float]:
    import torch

    from cltk import distributed as dist

    fwd = []
    for step in range(args.warmup, args.warmup + args.steps):
        micro = _batches(ctx, ids, step)
        dist.barrier()
        t0 = time.perf_counter()
        for x in micro:
            online.teacher.logprobs(x.to(ctx.engine.device))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        fwd.append(time.perf_counter() - t0)
    return fwd


def _teacher_memory(tmp: Path, cfg, engine) -> dict[str, tuple[int, float]]:
    """Per teacher kind: the parameter bytes it holds and the memory growth (MiB) at its load."""
    import gc

    from cltk.methods.kit.teacher import OnlineTeacher

    mem = {}
    for label, zero in (("ZeRO-3 teacher", 3), ("full-copy teacher", 0)):
        gc.collect()
        before = _mem_mib()
        teacher = OnlineTeacher(tmp / "teacher", cfg, _StudentAs(engine, zero))
        mem[label] = (teacher.param_bytes(), _mem_mib() - before)
        teacher.close()
    return mem


def _report(args, ctx, n_rows: int, times: dict, fwd: list, cache: dict, mem_all: list) -> None:
    import torch

    cfg, engine, world = ctx.cfg, ctx.engine, len(mem_all)
    med = {m: statistics.median(t) for m, t in times.items()}
    n_params = sum(p.numel() for p in ctx.model.parameters())
    mc = cfg.model.config or {}
    print(
        f"\nmodel: Llama, hidden {mc.get('hidden_size')}, "
        f"{mc.get('num_hidden_layers')} layers, "
        f"{n_params / 1e6:.2f}M parameters, vocab {args.vocab}; "
        f"{world} ranks, ZeRO {engine.zero_optimization_stage()}, "
        f"{'bf16' if engine.bfloat16_enabled() else 'fp32'}, device {engine.device}; "
        f"global batch {cfg.global_batch(world)} x {cfg.data.seq_len} tokens; "
        f"{args.rounds} rounds x {args.steps} steps per mode"
    )
    print("| mode | median step (s) | vs plain CE |\n|---|---:|---:|")
    for m in times:
        print(f"| {m} | {med[m]:.3f} | {med[m] / med['plain CE']:.2f}x |")
    print(
        f"teacher forward alone: {statistics.median(fwd):.3f} s per step "
        f"({statistics.median(fwd) / med['plain CE']:.2f} of a plain CE step)"
    )
    keys = cache["keys"]
    what = (f"top-{keys.topk}: fp16 log-probs + {keys.index_dtype().name} ids + fp32 label "
            "log-prob" if keys.layout == "topk" else
            f"sampled: {keys.head} exact + {keys.samples} draws + fp32 label log-prob")
    print(
        f"offline cache ({what}), {cache['bytes_per_token']:.1f} bytes/token on disk "
        f"({keys.bytes_per_token()} of data); built in {cache['build_s']:.1f} s for {n_rows} sequences"
    )
    what = "CUDA memory" if torch.cuda.is_available() else "RSS"
    print(f"| rank | teacher | parameter bytes held | {what} growth at load (MiB) |")
    print("|---|---|---:|---:|")
    for r, mm in enumerate(mem_all):
        for label, (b, rss) in mm.items():
            print(f"| {r} | {label} | {b:,} | {rss:.1f} |")


def main() -> None:
    args = _parse_args()

    from cltk import distributed as dist
    from cltk.methods.soft_targets.method import SoftTargetMethod

    dist.init()
    rank, world = dist.rank(), dist.world_size()
    tmp = Path(dist.broadcast_object(tempfile.mkdtemp(prefix="cltk-bench-") if rank == 0 else None))
    cfg, ctx, ids = _student(args, tmp, world)
    online = SoftTargetMethod(cfg)
    online.on_engine_ready(ctx)
    off_cfg = replace(cfg, sections={**cfg.sections, "blocks": replace(cfg.blocks, teacher="offline")})
    offline = SoftTargetMethod(off_cfg)
    dist.barrier()
    t0 = time.perf_counter()
    offline.on_engine_ready(ctx)  # one teacher pass over every scheduled sequence, written to disk
    cache = {"build_s": time.perf_counter() - t0}
    modes = {"plain CE": [], "online teacher": [online], "offline cache": [offline]}
    times = _time_modes(args, ctx, ids, modes)
    fwd = _time_teacher_forward(args, ctx, ids, online)
    cache.update(bytes_per_token=offline.cache.bytes_per_token, keys=offline.cache.keys)
    online.on_stage_end(ctx)
    offline.on_stage_end(ctx)
    mem_all = dist.all_gather_object(_teacher_memory(tmp, cfg, ctx.engine))
    if rank == 0:
        _report(args, ctx, len(ids), times, fwd, cache, mem_all)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
