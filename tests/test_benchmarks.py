"""Every benchmark script runs on a tiny setting (seconds), so none can rot unseen.

The figures in docs come from the scripts' full settings; here only that each runs to its table.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kit import model_sets

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    *model_sets(num_hidden_layers=1),
    "data.seq_len=16",
    "train.micro_batch_size=2",
    "train.gradient_accumulation_steps=2",
    "tokenizer.train.vocab_size=400",
]
SETS = [a for kv in TINY for a in ("--set", kv)]

SCRIPTS = {
    "losses": (
        ["losses.py", "--batch", "2", "--seq", "8", "--vocab", "64", "--reps", "1", "--rounds", "1"],
        "| soft target, one pass (cltk) |",
    ),
    "step_check": (["step_check.py", "--steps", "1", "--rounds", "1"], "| per micro-batch |"),
    "soft_targets": (
        ["soft_targets.py", "--steps", "1", "--rounds", "1", "--warmup", "1", "--topk", "4",
         "--vocab", "400"],
        "| offline cache |",
    ),
    "das": (
        ["das.py", "speed", "--steps", "1", "--rounds", "1", "--importance-seqs", "4",
         "--importance-rounds", "1", "--hook-reps", "1"],
        "importance on the engine, seconds per 1,000 sequences",
    ),
    "das_memory": (["das.py", "memory", "--importance-seqs", "2"], "| second fp32 copy (before) |"),
    "das_quality": (
        ["das_quality.py", "--seeds", "1", "--base-steps", "2", "--steps", "2", "--chars", "20000",
         "--vocab", "400", "--seq-len", "16", "--eval-seqs", "4", "--importance-seqs", "4",
         "--hidden", "32", "--layers", "1"],
        "| das-units |",
    ),
    "lora": (["lora.py", "steps", "--steps", "1", "--rounds", "1"], "median step"),
    "spg": (["spg.py", "--elements", "1000", "--reps", "1", "--rounds", "1"], "| adamw + blend |"),
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_benchmark_script_runs_on_a_tiny_setting(name, tmp_path):
    argv, expect = SCRIPTS[name]
    sets = [] if name in ("losses", "das_quality", "spg") else SETS  # these take shapes, not a config
    cmd = [sys.executable, str(ROOT / "benchmarks" / argv[0]), *argv[1:], *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert expect in out, out[-4000:]


def test_overhead_benchmark_times_three_arms_on_the_same_work(tmp_path):
    """benchmarks/overhead.py in one process on the tiny model: a row per arm (cltk, the hand-written
    DeepSpeed loop, the HF Trainer) with a numeric ratio, and the same first-step loss in each (same
    init, same batch: the arms do the same work)."""
    import re

    cmd = [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--steps", "1", "--rounds", "1",
           *SETS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    ratios = dict(re.findall(r"^\| (cltk|DeepSpeed loop|HF Trainer) \|.*\| ([0-9.]+)x \|$", out, re.M))
    assert set(ratios) == {"cltk", "DeepSpeed loop", "HF Trainer"}, out[-4000:]
    assert float(ratios["cltk"]) == 1.0 and all(float(r) > 0 for r in ratios.values())
    losses = [float(v) for v in re.findall(r"(?:cltk|DeepSpeed loop|HF Trainer) ([0-9.]+)",
                                            out.split("first step's loss:")[1].splitlines()[0])]
    assert len(losses) == 3 and max(losses) - min(losses) < 1e-3, out[-4000:]
    assert "cltk -> DeepSpeed loop: identical" in out, out[-4000:]
