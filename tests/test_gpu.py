"""GPU paths (NCCL, bf16): skipped without a CUDA GPU. Run on a GPU node: ``pytest -m gpu``."""

from __future__ import annotations

import json

import pytest
import torch

from tests.multirank import run_one
from tests.tiny_run import write_tiny_run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("zero", [2, 3])
def test_bf16_nccl_run_on_one_gpu(tmp_path, zero):
    proc = run_one(write_tiny_run(tmp_path, zero_stage=zero))
    assert proc.returncode == 0, proc.stderr[-4000:]
    stages = sorted((tmp_path / "out" / "stages").iterdir())
    record = json.loads((stages[-1] / "stage.json").read_text())
    assert record["precision"] == "bf16"  # "bf16": {"enabled": "auto"} resolves to bf16 on the GPU
    report = json.loads((tmp_path / "out" / "forgetting.json").read_text())
    assert all(1 < v < 1000 for row in report["perplexity"] for v in row)
    assert "backend nccl, device cuda:0" in proc.stderr


@pytest.mark.parametrize("mask", ["update", "grad"])
def test_das_two_stages_on_one_gpu(tmp_path, mask):
    # stage 2 registers grad hooks on the CPU model before DeepSpeed moves it to the GPU
    proc = run_one(write_tiny_run(tmp_path, das={"importance_samples": 8, "mask": mask}))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert all(
        (d / "importance.safetensors").is_file() for d in (tmp_path / "out" / "stages").iterdir()
    )
