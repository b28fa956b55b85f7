"""A tiny but real continual run config for tests: a small Llama, two real domains, a few steps each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.kit.models import TINY_LLAMA

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = TINY_LLAMA  # the tiny run's inline model config


def write_tiny_run(
    tmp: Path, zero_stage: int = 2, cache_dir: Path | None = None, **sections: Any
) -> Path:
    """Write ``tmp/run.yaml`` (+ its DeepSpeed JSON) and return its path.

    ``sections`` update the keys of ``train``, ``data`` and ``eval``, and replace any other section.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    ds = {"zero_optimization": {"stage": zero_stage}, "bf16": {"enabled": "auto"}}
    (tmp / "ds.json").write_text(json.dumps(ds))
    raw: dict[str, Any] = {
        "name": "tiny",
        "output_dir": "out",
        "seed": 7,
        "deepspeed": "ds.json",
        "model": {"config": dict(TINY_MODEL)},
        "tokenizer": {"train": {"vocab_size": 400, "max_chars_per_domain": 40000}},
        "domains": [
            {"name": "code", "source": {"builtin": "stdlib"}, "max_chars": 40000},
            {"name": "bible", "source": {"builtin": "kjv"}, "max_chars": 40000},
        ],
        "data": {
            "seq_len": 32,
            "eval_sequences": 8,
            "cache_dir": str(cache_dir if cache_dir else tmp / "cache"),
        },
        "train": {
            "micro_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "max_steps_per_stage": 6,
            "lr": 3e-3,
            "warmup_steps": 2,
            "log_every": 2,
        },
        "eval": {"batch_size": 4},
    }
    for k, v in sections.items():
        if (
            k in ("train", "data", "eval") and v is not None
        ):  # tweak these; replace the other sections
            raw[k] = {**raw[k], **v}
        else:
            raw[k] = v
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path
