"""A-GEM (``agem:``): each step's gradient is projected so that, to first order, it does not raise the loss
on a memory of earlier stages' sequences (Chaudhry et al., "Efficient Lifelong Learning with A-GEM",
ICLR 2019).

Here: the config section and its checks. The hooks are in :mod:`.method`; the projection is
:mod:`.projection` (pure), the reference gradient on the engine :mod:`.reference`, DeepSpeed's
reduced gradient :mod:`.grads`, the memory's draws :mod:`.memory`. See docs/agem.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cltk.config import ConfigError, RunConfig, option
from cltk.registry import MethodSpec, register


@dataclass
class AgemConfig:
    memory: int = option(
        "training sequences of each earlier stage kept in the episodic memory (a seeded sample)", 256
    )
    batch: int | None = option(
        "memory sequences per rank per step for the reference gradient (default: "
        "train.micro_batch_size)",
        None,
    )

    def batch_size(self, cfg: RunConfig) -> int:
        return self.batch if self.batch is not None else cfg.train.micro_batch_size


def _enabled(section: Any) -> Any:
    return section.get("enabled", False) if isinstance(section, dict) else False


def check_deepspeed(cfg: RunConfig) -> None:
    """Refuse the DeepSpeed settings whose reduced gradient A-GEM cannot reach (see :mod:`.grads`)."""
    from cltk.ds_config import load_deepspeed_json

    path = cfg.resolve(cfg.deepspeed) if cfg.deepspeed else None
    if path is None or not path.is_file():
        return  # cltk.validate refuses a missing file itself
    ds = load_deepspeed_json(path)
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if _enabled(ds.get("fp16")) is True:
        raise ConfigError(
            "deepspeed",
            f"{path} enables fp16, which agem does not support (its dynamic loss scale would see the "
            "memory batch's backward); use bf16 under ZeRO 2 or 3, or fp32",
        )
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            raise ConfigError(
                "deepspeed",
                f"{path} sets zero_optimization.{key}.device={device!r}, which agem does not support "
                "(the reduced gradient then lives in offload buffers); remove the offload",
            )
    bf16 = _enabled(ds.get("bf16")) is True
    accum = str((ds.get("data_types") or {}).get("grad_accum_dtype", "")).lower()
    if bf16 and (stage == 0 or (stage == 1 and accum in ("fp32", "float32", "float"))):
        raise ConfigError(
            "deepspeed",
            f"{path}: bf16 at ZeRO {stage}{' with fp32 gradient accumulation' if stage else ''} makes "
            "DeepSpeed step with its BF16_Optimizer, whose gradient agem does not read; use ZeRO 2 or 3 "
            "for bf16",
        )


def check(cfg: RunConfig, a: AgemConfig) -> None:
    if a.memory < 1:
        raise ConfigError("agem.memory", f"must be > 0 sequences per earlier stage, got {a.memory}")
    if a.batch is not None and a.batch < 1:
        raise ConfigError("agem.batch", f"must be > 0 sequences per rank, got {a.batch}")
    check_deepspeed(cfg)



SPEC = register(MethodSpec("agem", AgemConfig, "cltk.methods.agem.method:AgemMethod",
                           "A-GEM: project each step's gradient against a memory batch of earlier stages",
                           check, acts_on_base=True, order=70))
