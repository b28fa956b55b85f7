"""GPU paths (NCCL, bf16), skipped without a CUDA GPU. Run on a GPU node: ``pytest -m gpu``.

One GPU runs one rank, but NCCL checks a collective's device even in a group of one, and cltk runs
every collective whenever a process group exists (``cltk.distributed``): so these runs exercise the
multi-GPU path of every method (a CPU tensor handed to NCCL fails them at once). Together the runs of
``METHOD_RUNS`` use every method cltk has, two stages each, and one is evaluated again with
``cltk eval``. Methods that exclude each other (two teacher losses, DAS with LoRA) get separate runs.
``test_method_runs_configs_load`` checks on any machine that these configs stay valid.

Last passed on a GPU: see docs/launching.md ("GPU test record").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.multirank import run_one
from tests.tiny_run import write_tiny_run

no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REPLAY = {"share": 0.25}
DAS = {"importance_samples": 8, "mask": "update", "contrastive": {"weight": 0.1}}
METHOD_RUNS = {
    # online soft-target blocks (a second engine as teacher), DAS update masks + contrastive, replay
    "online_das": dict(blocks={"k": 2, "teacher": "online"}, das=DAS, replay=REPLAY),
    # the offline top-k teacher cache (collectives: the cache build's failure check, its manifest)
    "offline": dict(blocks={"k": 2, "teacher": "offline", "topk": 16}, replay=REPLAY),
    # distillation from the previous stage under ZeRO 3 (a partitioned teacher)
    "distill_zero3": dict(distill={"alpha": 0.5, "beta": 0.5}, replay=REPLAY, zero_stage=3),
    # LoRA per domain, frozen base, routed evaluation (the router's all-reduce)
    "lora": dict(lora={"r": 4, "alpha": 8.0, "base": "frozen"}, replay=REPLAY),
    # DAS with grad masks (hooks registered on the CPU model before DeepSpeed moves it to the GPU)
    "das_grad": dict(das={"importance_samples": 8, "mask": "grad"}),
    # EWC, SPG and A-GEM on the fp32 partitions (their reductions and projections), general replay and
    # a reservoir under ZeRO 3
    "partition_methods": dict(
        ewc={"lam": 1000.0, "fisher_steps": 2},
        spg={"importance_steps": 2},
        agem={"memory": 8, "batch": 2},
        replay={"share": 0.25, "memory": 16, "general_share": 0.1,
                "general": [{"name": "lic", "source": {"builtin": "licenses"}, "max_chars": 20000}]},
        zero_stage=3,
    ),
}


def _write(tmp_path, name):
    sections = dict(METHOD_RUNS[name])
    zero = sections.pop("zero_stage", 2)
    return write_tiny_run(tmp_path / name, zero_stage=zero, **sections)


@pytest.mark.parametrize("name", sorted(METHOD_RUNS))
def test_method_runs_configs_load(tmp_path, name):
    from cltk.validate import load_config

    load_config(_write(tmp_path, name), world_size=1)


@pytest.mark.gpu
@no_gpu
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


@pytest.mark.gpu
@no_gpu
@pytest.mark.parametrize("name", sorted(METHOD_RUNS))
def test_every_method_two_stages_under_nccl_on_one_gpu(tmp_path, name):
    cfg = _write(tmp_path, name)
    proc = run_one(cfg)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "backend nccl, device cuda:0" in proc.stderr
    out = cfg.parent / "out"
    report = json.loads((out / "forgetting.json").read_text())
    assert all(1 < v < 1000 for row in report["perplexity"] for v in row)
    if "das" in METHOD_RUNS[name]:
        assert all((d / "importance.safetensors").is_file() for d in (out / "stages").iterdir())
    if name == "online_das":  # the same matrix again through `cltk eval` over the saved exports
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        ev = subprocess.run(
            [sys.executable, "-m", "cltk", "eval", "--config", str(cfg)],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert ev.returncode == 0, ev.stderr[-4000:]
        again = json.loads((out / "eval" / "forgetting.json").read_text())["perplexity"]
        for a, b in zip(again, report["perplexity"]):
            assert a == pytest.approx(b, rel=2e-2)  # bf16 engine vs bf16 reload
