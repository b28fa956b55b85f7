"""The DeepSpeed config cltk hands to ``deepspeed.initialize``.

The DeepSpeed JSON (``deepspeed:``) owns ZeRO and precision; cltk owns the optimizer, LR schedule and batch
sizes, which :func:`deepspeed_config` writes into the config it hands to DeepSpeed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cltk.errors import ConfigError

if TYPE_CHECKING:
    from cltk.config import RunConfig


def load_deepspeed_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError("deepspeed", f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError("deepspeed", f"{path} must hold a JSON object")
    return data


def deepspeed_config(cfg: RunConfig, world_size: int, bf16_available: bool) -> dict[str, Any]:
    """The DeepSpeed config handed to ``deepspeed.initialize``: the JSON plus cltk's batch sizes.

    ``"bf16": {"enabled": "auto"}`` resolves to enabled where bf16 runs natively (a CUDA GPU with bf16
    support) and disabled elsewhere (CPU trains in fp32).
    """
    ds = load_deepspeed_json(cfg.resolve(cfg.deepspeed))  # type: ignore[arg-type]
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.train.gradient_accumulation_steps
    ds["train_batch_size"] = cfg.global_batch(world_size)
    ds["gradient_clipping"] = cfg.train.grad_clip  # 0 turns clipping off (it must not fall to a default)
    for prec in ("bf16", "fp16"):
        sec = ds.get(prec)
        if isinstance(sec, dict) and sec.get("enabled") == "auto":
            sec["enabled"] = bool(bf16_available) if prec == "bf16" else False
    ds.setdefault("steps_per_print", 10**9)  # cltk logs itself
    ds.setdefault("wall_clock_breakdown", False)
    return ds
