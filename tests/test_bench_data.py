"""benchmarks/data.py at a tiny size, so that the script cannot rot (its figures are not checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "data.py"


def test_data_benchmark_runs_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--mb", "1", "--base-mb", "0.2", "--steps", "1",
         "--vocab", "400", "--seq-len", "32", "--work", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "big - small peak RSS: prepare" in out and "prepare / that: small" in out
    assert "data loading share of step time" in out
    assert not (tmp_path / "work").exists()  # the corpora and caches are deleted
