"""The memory plan against measured peaks: real 2-rank CPU runs, then ``cltk plan --memory --measured``.

    python benchmarks/memplan_check.py --out /tmp/memplan [--configs zero2 zero3 distill ewc]

Each configuration trains a 50M-parameter Llama (fp32, 2 gloo ranks through the deepspeed launcher,
2 domains x 3 steps of 2 x 64 tokens per rank) and records its peak host memory per rank in
``stage.json``; the plan of the same config (``--device cpu --world-size 2``) is then compared with the
highest rank's peak. Finished runs are kept (rerun with the same ``--out`` to reprint the table).
Printed: a markdown table, estimate / measured per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"model_type": "llama", "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8,
         "num_attention_heads": 12, "num_key_value_heads": 4, "max_position_embeddings": 128}
CONFIGS = {  # name: (ZeRO stage, extra sections)
    "zero2": (2, {}),
    "zero3": (3, {}),
    "distill": (2, {"distill": {"alpha": 0.5, "beta": 0.5}}),
    "ewc": (2, {"ewc": {"lam": 100.0, "fisher_steps": 2}}),
    "zero2-ckpt": (2, {"train": {"activation_checkpointing": True}}),
}


def write(run_dir: Path, stage: int, extra: dict, cache: Path) -> Path:
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    src = json.loads((ROOT / "ds_configs" / f"zero{stage}.json").read_text())
    (run_dir / "ds.json").write_text(json.dumps(src))
    train = {"micro_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps_per_stage": 3,
             "lr": 1e-4, "warmup_steps": 1, "log_every": 1, **extra.get("train", {})}
    raw = {
        "name": run_dir.name, "output_dir": "out", "seed": 3, "deepspeed": "ds.json",
        "model": {"config": MODEL},
        "tokenizer": {"train": {"vocab_size": 400, "max_chars_per_domain": 40000}},
        "domains": [{"name": "code", "source": {"builtin": "stdlib"}, "max_chars": 40000},
                    {"name": "bible", "source": {"builtin": "kjv"}, "max_chars": 40000}],
        "data": {"seq_len": 64, "eval_sequences": 4, "cache_dir": str(cache)},
        "train": train,
        "eval": {"batch_size": 2, "heatmap": False, "start": False},
        **{k: v for k, v in extra.items() if k != "train"},
    }
    path = run_dir / "run.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def train(cfg: Path) -> None:
    if list((cfg.parent / "out" / "stages").glob("*/stage.json")).__len__() == 2:
        return  # finished before
    from cltk.distributed import free_port

    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "cltk",
           "train", "--config", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(cfg.parent / "train.log", "w") as log:
        subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=True, cwd=cfg.parent)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = ap.parse_args()
    out = Path(args.out).resolve()
    rows = []
    for name in args.configs:
        stage, extra = CONFIGS[name]
        cfg = write(out / name, stage, extra, out / "cache")
        train(cfg)
        plan = subprocess.run(
            [sys.executable, "-m", "cltk", "plan", "--memory", "--config", str(cfg), "--world-size",
             "2", "--gpus-per-node", "2", "--device", "cpu", "--measured", str(cfg.parent / "out")],
            capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        total = re.search(r"\*\*total\*\* \| \| \*\*([\d.]+) GiB", plan.stdout)
        measured = re.search(r"measured peak .*?: ([\d.]+) GiB; estimate / measured = ([\d.]+)",
                             plan.stdout)
        assert total and measured, plan.stdout + plan.stderr
        (cfg.parent / "plan.md").write_text(plan.stdout)
        rows.append((name, total.group(1), measured.group(1), float(measured.group(2))))
    print("| config | estimate per rank | measured peak (highest rank) | estimate / measured |")
    print("|---|---:|---:|---:|")
    for name, est, meas, ratio in rows:
        print(f"| {name} | {est} GiB | {meas} GiB | {ratio:.2f} |")


if __name__ == "__main__":
    main()
