"""Every continual-learning method on the same domains, budget and seeds: forgetting, plasticity, final
perplexity and step time relative to naive sequential training, side by side in one run.

    python benchmarks/methods.py --out /tmp/methods --seeds 1 2 --steps 24        # docs/benchmarks.md

Each arm is one ``cltk train`` of ``--config`` (default: the quickstart's three domains) with the arm's
``--set`` overrides, ``--steps`` optimizer steps per stage, on ``--ranks`` CPU ranks. Arms run seed by seed,
so every seed's arms share the machine's state; a finished arm (its ``forgetting.json`` exists) is not run
again, so an interrupted benchmark continues where it stopped. The table gives, per arm, the mean over
seeds and the half-spread (half of max - min): a difference smaller than the spread is noise.

Step time is the median of the arm's per-step seconds in every stage after the first (where every method
is active), divided by naive's median for the same seed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# arm -> the run-config overrides that turn it on (YAML values, as `cltk train --set`)
ARMS: dict[str, list[str]] = {
    "naive": [],
    "replay": ["replay={share: 0.25}"],
    "replay-reservoir": ["replay={share: 0.25, memory: 200}"],
    "replay-general": [
        "replay={share: 0.25, general: [{name: general, source: {builtin: licenses}, max_chars: 200000}], "
        "general_share: 0.1}"
    ],
    "distill": ["distill={alpha: 1.0, beta: 1.0}"],
    "blocks": ["blocks={k: 2, p: 0.9}"],
    "das": ["das={importance_samples: 64}"],
    "ewc": ["ewc={lam: 20000, fisher_steps: 8}"],
    "spg": ["spg={importance_steps: 8}"],
    "agem": ["agem={memory: 256}"],
    "lora": ["lora={r: 8, alpha: 16}"],
    "lr-continue": ["train.lr_span=run"],
    "lr-wsd": ["train.schedule=wsd", "train.decay_share=0.2"],
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_arm(args: argparse.Namespace, arm: str, seed: int) -> Path:
    out = Path(args.out) / f"{arm}-s{seed}"
    if (out / "forgetting.json").is_file():
        print(f"[methods] {arm} seed {seed}: done earlier, kept", flush=True)
        return out
    sets = [
        f"output_dir={out}",
        f"seed={seed}",
        f"data.cache_dir={Path(args.out) / '.cache'}",
        f"train.max_steps_per_stage={args.steps}",
        "train.checkpoint_every=0",
        "train.keep_checkpoints=1",
        "eval.heatmap=false",
        *args.set,
        *ARMS[arm],
    ]
    if out.exists():  # an interrupted attempt: start the arm again
        import shutil

        shutil.rmtree(out)
    if args.ranks > 1:
        deepspeed = str(Path(sys.executable).parent / "deepspeed")
        cmd = [deepspeed, "--num_gpus", str(args.ranks), "--master_port", str(_port()), "--module"]
    else:
        cmd = [sys.executable, "-m"]
    cmd += ["cltk", "train", "--config", str(args.config)]
    for s in sets:
        cmd += ["--set", s]
    print(f"[methods] {arm} seed {seed}: running", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"[methods] {arm} seed {seed} failed (exit {proc.returncode})")
    print(f"[methods] {arm} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    return out


def read_arm(out: Path) -> dict:
    rep = json.loads((out / "forgetting.json").read_text())
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    later = [float(r["seconds"]) for r in rows if int(r["stage"]) > 0]
    return {
        "final": rep["average_final_perplexity"],
        "forgetting": rep["mean_forgetting"],
        "plasticity": rep["mean_plasticity"],
        "step_s": statistics.median(later) if later else None,
    }


def _fmt(values: list[float | None], digits: int = 1) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {(max(vals) - min(vals)) / 2:.{digits}f}"


def table(results: dict[str, dict[int, dict]], seeds: list[int]) -> str:
    lines = [
        "| arm | final avg perplexity | mean forgetting | mean plasticity | step time vs naive |",
        "|---|---|---|---|---|",
    ]
    for arm, by_seed in results.items():
        ratios = []
        for s in seeds:
            base = results.get("naive", {}).get(s, {}).get("step_s")
            mine = by_seed.get(s, {}).get("step_s")
            ratios.append(mine / base if base and mine else None)
        lines.append(
            f"| {arm} | {_fmt([by_seed[s]['final'] for s in seeds])} | "
            f"{_fmt([by_seed[s]['forgetting'] for s in seeds])} | "
            f"{_fmt([by_seed[s]['plasticity'] for s in seeds])} | {_fmt(ratios, 2)}x |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="where each arm's run goes (and the table)")
    p.add_argument("--config", default=str(ROOT / "examples" / "quickstart.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per stage")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="overrides for every arm (e.g. a smaller model for a smoke run)")
    args = p.parse_args()
    arms = ["naive"] + [a for a in args.arms if a != "naive"]  # the reference of the step-time ratio
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[int, dict]] = {a: {} for a in arms}
    for seed in args.seeds:
        for arm in arms:
            results[arm][seed] = read_arm(run_arm(args, arm, seed))
    md = table(results, args.seeds)
    header = (
        f"{len(args.seeds)} seed(s) {args.seeds}, {args.steps} steps per stage, {args.ranks} rank(s), "
        f"config {Path(args.config).name}; mean ± half-spread over seeds\n\n"
    )
    (Path(args.out) / "methods.md").write_text(header + md + "\n")
    (Path(args.out) / "methods.json").write_text(json.dumps(results, indent=1))
    print(header + md)


if __name__ == "__main__":
    main()
