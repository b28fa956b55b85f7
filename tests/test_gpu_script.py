"""benchmarks/gpu.sh on a machine without a GPU: it writes its page with every GPU part reported as
skipped and says so; the throughput script its GPU part runs works end to end on a CPU (tiny model);
the configs the GPU parts would load are valid here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.tiny_run import ROOT

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the page written without a GPU")
def test_gpu_sh_without_a_gpu_writes_a_page_of_skips(tmp_path):
    page = tmp_path / "gpu.md"
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--page", str(page)],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    text = page.read_text()
    assert "**No GPU has run this page yet.**" in text
    assert text.count("skipped: no CUDA GPU on this machine") == 1 + 2 + 2  # tests, 2 models, 2 overheads
    assert "deepspeed 0." in text and "`bash benchmarks/gpu.sh`" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU dry run")
def test_gpu_page_tables_on_a_cpu_dry_run(tmp_path):
    page = tmp_path / "gpu.md"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--page", str(page),
                        "--dry-run-on-cpu"], env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    text = page.read_text()
    assert text.count("CPU dry run: a tiny model stands in") == 2
    assert text.count("| checkpointing off |") == 2 and text.count("| checkpointing on |") == 2
    assert "**No GPU has run this page yet.**" in text


def test_throughput_script_runs_on_a_cpu(tmp_path):
    out = tmp_path / "t.json"
    p = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--model", "tiny", "--seq", "64",
         "--micro", "2", "--steps", "1", "--rounds", "1", "--json", str(out)],
        env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert [row["arm"] for row in r["rows"]] == ["checkpointing off", "checkpointing on"]
    assert all(row["tokens_per_s"] > 0 and row["mfu"] is None for row in r["rows"])  # no peak on CPU
    assert r["optimizer"] == "torch AdamW for-loop" and r["precision"] == "fp32"
    assert "| checkpointing on |" in p.stdout


def test_the_gpu_parts_configs_load():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu
        import throughput
    finally:
        sys.path.pop(0)
    from cltk.validate import load_config

    for model in ("llama1b", "tiny"):
        cfg = load_config(raw=throughput.run_config(model, 2048, 4, 1, None))
        assert cfg.train.activation_checkpointing
    for _, argv, _ in gpu.OVERHEAD:  # overhead.py's --set on the quickstart config
        sets = [a for a in argv if a != "--set"]
        cfg = load_config(ROOT / "examples" / "quickstart.yaml", overrides=sets)
        assert cfg.model.config is not None
    limits = [t for *_, t in gpu.THROUGHPUT] + [t for *_, t in gpu.OVERHEAD] + [gpu.TESTS_LIMIT]
    assert sum(limits) < 8 * 60  # the whole script fits in its 8 minutes
