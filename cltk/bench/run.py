"""Running a tier's arms: each one ``cltk train`` (through the deepspeed launcher for several ranks) in its
own directory, seed by seed, with a progress line per arm and stage; what already finished is kept, so
an interrupted bench continues where it stopped."""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from cltk.bench.arms import ARMS, Tier, overrides
from cltk.distributed import free_port
from cltk.errors import UserError
from cltk.typed_config import read_raw
from cltk.validate import load_config

ROOT = Path(__file__).resolve().parents[2]
BENCH_CONFIGS = ROOT / "examples" / "bench"


@dataclass
class BenchArgs:
    tier: Tier
    out: Path
    seeds: list[int]
    arms: list[str]
    ranks: int = 1
    steps: int | None = None  # optimizer steps per stage (None: the tier config's)
    sets: list[str] = field(default_factory=list)  # overrides for every arm
    base_sets: list[str] = field(default_factory=list)  # overrides for the base's pre-training


def _command(ranks: int, config: Path, sets: list[str]) -> list[str]:
    if ranks > 1:
        launcher = str(Path(sys.executable).parent / "deepspeed")
        cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module"]
    else:
        cmd = [sys.executable, "-m"]
    cmd += ["cltk", "train", "--config", str(config)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _progress(line: str) -> str | None:
    """The child's lines worth a progress line: a stage's start, its perplexities, a refusal."""
    text = line.split("] ", 1)[-1].strip()
    if text.startswith("stage ") and (" steps of " in text or ": perplexity " in text):
        return text
    if text.startswith("start: ") or text.startswith("cltk: "):
        return text
    return None


def _run(label: str, cmd: list[str], out: Path, ranks: int) -> float:
    """Run one training command, printing its progress lines; returns its wall seconds."""
    if out.exists():  # an interrupted attempt: start it again
        shutil.rmtree(out)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    print(f"[bench] {label}: running", flush=True)
    start = time.perf_counter()
    tail: deque[str] = deque(maxlen=60)
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line)
            shown = _progress(line)
            if shown:
                print(f"[bench] {label}: {shown}", flush=True)
        code = proc.wait()
    if code != 0:
        sys.stderr.write("".join(tail))
        raise UserError(f"bench: {label} failed (exit {code}); its output is above, its run in {out}")
    seconds = time.perf_counter() - start
    print(f"[bench] {label}: done in {seconds:.0f} s", flush=True)
    return seconds


def base_model(args: BenchArgs, seed: int) -> Path | None:
    """The tier's starting model for ``seed``, pre-trained once (None: the tier config has its own)."""
    if args.tier.base is None:
        return None
    out = args.out / f"base-s{seed}"
    export = out / "stages" / "00-general"
    if not (export / "stage.json").is_file():
        sets = [f"output_dir={out}", f"seed={seed}", f"data.cache_dir={args.out / '.cache'}",
                "train.checkpoint_every=0", "train.keep_checkpoints=1", *args.base_sets]
        _run(f"base seed {seed}", _command(args.ranks, BENCH_CONFIGS / args.tier.base, sets), out,
             args.ranks)
    else:
        print(f"[bench] base seed {seed}: done earlier, kept", flush=True)
    return export


def check_configs(args: BenchArgs) -> None:
    """Every config the bench will run (the base's and each arm's, with every override), validated
    before the first run starts: a typo in ``--set`` fails in a second, not after the base's
    pre-training. An arm's ``model.init_from`` (the base, not trained yet) is left to its run."""
    common = ["train.checkpoint_every=0", "train.keep_checkpoints=1"]
    if args.steps is not None:
        common.append(f"train.max_steps_per_stage={args.steps}")
    stand_in: list[str] = []  # the arms start from the base's export: its model and tokenizer
    if args.tier.base is not None:
        _check_one("the base", BENCH_CONFIGS / args.tier.base, [*common, *args.base_sets], args.ranks)
        raw, _ = read_raw(BENCH_CONFIGS / args.tier.base, args.base_sets)
        stand_in = [f"model={json.dumps(raw.get('model'))}",
                    f"tokenizer={json.dumps(raw.get('tokenizer'))}"]
    for arm in args.arms:
        sets = [*common, *stand_in, *args.sets, *overrides(arm, args.tier)]
        _check_one(f"arm {arm}", BENCH_CONFIGS / args.tier.config, sets, args.ranks)


def _check_one(label: str, config: Path, sets: list[str], ranks: int) -> None:
    try:
        load_config(config, overrides=sets, world_size=ranks)
    except UserError as e:
        raise UserError(f"bench: {label}'s config is refused before any run: {e}") from e


def run_arm(args: BenchArgs, arm: str, seed: int, base: Path | None) -> Path:
    """One arm on one seed; kept when it finished earlier (its ``forgetting.json`` exists)."""
    out = args.out / f"{arm}-s{seed}"
    if (out / "forgetting.json").is_file():
        print(f"[bench] {arm} seed {seed}: done earlier, kept", flush=True)
        return out
    sets = [f"output_dir={out}", f"seed={seed}", f"data.cache_dir={args.out / '.cache'}",
            "train.checkpoint_every=0", "train.keep_checkpoints=1"]
    if base is not None:
        sets += [f"model.init_from={base}", f"tokenizer.path={base}"]
    if args.steps is not None:
        sets.append(f"train.max_steps_per_stage={args.steps}")
    sets += [*args.sets, *overrides(arm, args.tier)]
    seconds = _run(f"{arm} seed {seed}", _command(args.ranks, BENCH_CONFIGS / args.tier.config, sets),
                   out, args.ranks)
    (out / "bench.json").write_text(json.dumps({
        "arm": arm, "seed": seed, "wall_s": seconds, "overrides": sets, "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
    }, indent=1))
    return out


def git_commit() -> str:
    """The checkout's commit (with ``+`` when it has uncommitted changes), or ``?``."""
    try:
        run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT)  # noqa: E731
        head = run("rev-parse", "--short", "HEAD").stdout.strip()
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except OSError:
        return "?"
    return (head + ("+" if dirty else "")) if head else "?"


def read_arm(out: Path) -> dict:
    """What the page reads from one finished arm: the report, throughput, step time and peak memory."""
    rep = json.loads((out / "forgetting.json").read_text())
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    # steady steps: every stage but the first (where every method is active; all of a one-stage run),
    # leaving out each stage's first step (engine warm-up)
    steady = [r for r in rows if int(r["step"]) > 0] or rows
    later = [r for r in steady if int(r["stage"]) > 0] or steady
    stages = [json.loads(p.read_text()) for p in sorted((out / "stages").glob("*/stage.json"))]
    peaks = [p for s in stages for p in s.get("peak_memory_mb", [])]
    meta = json.loads((out / "bench.json").read_text()) if (out / "bench.json").is_file() else {}
    ranks = stages[0]["world_size"] if stages else 1
    return {
        "report": rep,
        "step_s": statistics.median(float(r["seconds"]) for r in later),
        "tokens_per_s": statistics.median(float(r["tokens_per_s"]) for r in later),
        "ranks": ranks,
        "steps": sum(s["steps"] for s in stages),
        "peak_rss_mb": max((p["rss"] for p in peaks), default=None),
        "peak_device_mb": max((p["device"] for p in peaks if "device" in p), default=None),
        "wall_s": meta.get("wall_s"),
        "commit": meta.get("commit", "?"),
        "date": meta.get("date") or time.strftime(
            "%Y-%m-%d", time.localtime((out / "forgetting.json").stat().st_mtime)),
        "dir": str(out),
        "parameters": _parameters(out / "stages"),
        "precision": stages[0]["precision"] if stages else None,
    }


def _parameters(stages: Path) -> int | None:
    """Parameters of the run's base model, read from a stage export's safetensors header (a LoRA
    stage's export is the merged base)."""
    from safetensors import safe_open

    files = sorted(stages.glob("*/model*.safetensors"))
    if not files:
        return None
    n = 0
    for f in sorted(files[0].parent.glob("model*.safetensors")):
        with safe_open(str(f), "np") as st:
            for k in st.keys():
                size = 1
                for dim in st.get_slice(k).get_shape():
                    size *= dim
                n += size
    return n


def bench(args: BenchArgs) -> dict[str, dict[int, dict]]:
    """Every arm on every seed (the bases first); returns ``results[arm][seed]``."""
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        raise UserError(f"bench: unknown arm(s) {', '.join(unknown)}; known: {', '.join(ARMS)}")
    if not args.seeds:
        raise UserError("bench: give at least one seed")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"bench: --out {args.out} is a file; name a directory for the arms' runs")
    check_configs(args)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"bench: cannot create --out {args.out} ({e.strerror or e}); choose a place "
                        "you can write") from e
    arms = ["naive"] + [a for a in args.arms if a != "naive"]  # the reference of the ratios
    results: dict[str, dict[int, dict]] = {a: {} for a in arms}
    for seed in args.seeds:
        base = base_model(args, seed)
        for i, arm in enumerate(arms):
            print(f"[bench] seed {seed}, arm {i + 1}/{len(arms)}: {arm}", flush=True)
            results[arm][seed] = read_arm(run_arm(args, arm, seed, base))
    return results
