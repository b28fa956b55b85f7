"""The library front door in one process: a NaN loss stops cleanly, resume finishes, evaluate agrees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "api_run.py"


def test_import_cltk_train_nan_guard_resume_and_evaluate(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert "non-finite loss at stage code step 3" in lines["NAN-STOPPED"]
    assert "the last checkpoint is intact" in lines["NAN-STOPPED"]
    assert lines["LATEST"] == "s00-step000002"  # the NaN step never reached a checkpoint
    assert "global batch of 4 sequences" in lines["BATCH-REFUSED"]
    assert "pass --resume" in lines["REFUSED"] and "Nothing was changed" in lines["REFUSED"]
    trained, evaluated = json.loads(lines["TRAINED"]), json.loads(lines["EVALUATED"])
    assert len(trained) == 2
    for a, b in zip(trained, evaluated):  # cltk eval on the exports reproduces the run's matrix
        assert a == pytest.approx(b, rel=1e-4)
    assert (tmp_path / "eval" / "forgetting.json").is_file()
