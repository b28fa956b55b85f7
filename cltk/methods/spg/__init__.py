"""SPG parameter-level soft-masking (``spg:``): every weight element that earlier domains' gradients
marked important moves ``1 - importance`` as far, on the optimizer update so it holds under Adam and ZeRO.

Konishi et al., "Parameter-Level Soft-Masking for Continual Learning" (ICML 2023). Here: the config
section and its checks. The math is in :mod:`.importance`, its sharded form in :mod:`.sharded`, the
hooks in :mod:`.method`; see docs/spg.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from cltk.config import ConfigError, RunConfig, option
from cltk.registry import MethodSpec, register


@dataclass
class SpgConfig:
    importance_steps: int = option(
        "optimizer steps at the end of each domain whose gradients score SPG's parameter importance",
        32,
    )


def check(cfg: RunConfig, spg: SpgConfig) -> None:
    if isinstance(spg.importance_steps, bool) or spg.importance_steps < 1:
        raise ConfigError("spg.importance_steps", f"must be >= 1, got {spg.importance_steps}")
    from cltk.ds_config import load_deepspeed_json

    ds = load_deepspeed_json(cfg.resolve(cfg.deepspeed))  # type: ignore[arg-type]
    zero = ds.get("zero_optimization") or {}
    fp16 = ds.get("fp16") or {}
    if zero.get("stage", 0) == 0 and fp16.get("enabled") is True:
        raise ConfigError(
            "deepspeed",
            "spg masks the fp32 master weights, which fp16 without ZeRO keeps where cltk cannot lay "
            "out per-element importance: use a ZeRO stage (1, 2, 3), bf16, or fp32",
        )
    if (zero.get("offload_optimizer") or {}).get("device") == "nvme":
        raise ConfigError(
            "deepspeed",
            "spg keeps importance laid out like the fp32 partitions in memory, and with "
            "offload_optimizer.device nvme those partitions live on disk between steps (untested): "
            "offload to cpu instead",
        )



SPEC = register(MethodSpec("spg", SpgConfig, "cltk.methods.spg.method:SpgMethod",
                           "SPG parameter-level soft-masking of the update", check,
                           acts_on_base=True, order=61))
