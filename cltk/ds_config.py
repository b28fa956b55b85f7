"""The DeepSpeed config cltk hands to ``deepspeed.initialize``, for every mode (continual pre-training,
continual NER).

The DeepSpeed JSON (``deepspeed:``) owns ZeRO and precision; cltk owns the optimizer, LR schedule, batch
sizes and clipping, which :func:`deepspeed_config` writes into the config it hands to DeepSpeed.
:func:`check_deepspeed_json` refuses, at load, a JSON that disagrees.

Both take any config with a ``deepspeed`` path, ``resolve()`` and a ``train`` section holding
``micro_batch_size``, ``gradient_accumulation_steps`` and ``grad_clip`` (:class:`EngineConfig`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Protocol

from cltk.errors import ConfigError


class EngineConfig(Protocol):
    """What the DeepSpeed config and the engine read of a mode's config (the run config, NER's)."""

    deepspeed: str
    train: Any  # micro_batch_size, gradient_accumulation_steps, grad_clip, lr, betas, weight_decay

    def resolve(self, path: str | None) -> Path | None: ...


def global_batch(cfg: EngineConfig, world_size: int) -> int:
    """Sequences per optimizer step over all ranks."""
    return cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * world_size


def load_deepspeed_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError("deepspeed", f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError("deepspeed", f"{path} must hold a JSON object")
    return data


def check_deepspeed_json(cfg: EngineConfig, world_size: int) -> None:
    """Refuse a DeepSpeed JSON that is missing, or that sets what the config owns (batch sizes that
    differ from it, an optimizer or a scheduler), or an unknown ZeRO stage."""
    t, expected = cfg.train, global_batch(cfg, world_size)
    if not cfg.deepspeed:
        raise ConfigError(
            "deepspeed", "name a DeepSpeed JSON, e.g. deepspeed: ds_configs/zero2.json"
        )
    ds_path = cfg.resolve(cfg.deepspeed)
    if not ds_path.is_file():  # type: ignore[union-attr]
        raise ConfigError("deepspeed", f"{ds_path} not found (ship one of ds_configs/zero*.json)")
    ds = load_deepspeed_json(ds_path)  # type: ignore[arg-type]
    for k, ours in (
        ("train_micro_batch_size_per_gpu", t.micro_batch_size),
        ("gradient_accumulation_steps", t.gradient_accumulation_steps),
        ("train_batch_size", expected),
    ):
        if k in ds and ds[k] != "auto" and ds[k] != ours:
            raise ConfigError(
                "deepspeed",
                f"{ds_path} sets {k}={ds[k]} but the run config gives {ours}; "
                f'batch sizes belong in the run config\'s train section: remove {k} or set it to "auto"',
            )
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(
            "deepspeed", f"{ds_path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}"
        )
    for k in ("optimizer", "scheduler"):
        if k in ds:
            raise ConfigError(
                "deepspeed",
                f"{ds_path} has a '{k}' section; cltk owns the optimizer and "
                "LR schedule (train.lr, train.schedule...): remove it",
            )


def deepspeed_config(cfg: EngineConfig, world_size: int, bf16_available: bool) -> dict[str, Any]:
    """The DeepSpeed config handed to ``deepspeed.initialize``: the JSON plus cltk's batch sizes.

    ``"bf16": {"enabled": "auto"}`` resolves to enabled where bf16 runs natively (a CUDA GPU with bf16
    support) and disabled elsewhere (CPU trains in fp32).
    """
    ds = load_deepspeed_json(cfg.resolve(cfg.deepspeed))  # type: ignore[arg-type]
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.train.gradient_accumulation_steps
    ds["train_batch_size"] = global_batch(cfg, world_size)
    ds["gradient_clipping"] = cfg.train.grad_clip  # 0 turns clipping off (it must not fall to a default)
    for prec in ("bf16", "fp16"):
        sec = ds.get(prec)
        if isinstance(sec, dict) and sec.get("enabled") == "auto":
            sec["enabled"] = bool(bf16_available) if prec == "bf16" else False
    ds.setdefault("steps_per_print", 10**9)  # cltk logs itself
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def frozen_deepspeed_config(ds: dict[str, Any], zero3: bool | None = None) -> dict[str, Any]:
    """The config of a model that only runs forward (row 0's evaluation, a frozen teacher): a copy of
    ``ds`` (a config from :func:`deepspeed_config`) without the optimizer's parts.

    ZeRO 3 stays ZeRO 3 (each rank holds its partition); ZeRO 0/1/2 become stage 0 (a full copy per
    rank: with no optimizer there is nothing for stages 1/2 to shard). ``zero3`` overrides which.
    """
    ds = copy.deepcopy(ds)
    zero = dict(ds.get("zero_optimization") or {})
    if zero3 if zero3 is not None else int(zero.get("stage", 0)) == 3:
        zero.pop("offload_optimizer", None)  # there is no optimizer to offload
        zero["stage"] = 3
    else:
        zero = {"stage": 0}
    ds["zero_optimization"] = zero
    ds.pop("gradient_clipping", None)
    ds.pop("zero_force_ds_cpu_optimizer", None)
    return ds
