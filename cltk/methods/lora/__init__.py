"""A LoRA adapter per domain or block (``lora:``), on a frozen or a stage-by-stage merged base, with
oracle, routed and merged evaluation. The hooks are in :mod:`.adapters`, the router in :mod:`.routing`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cltk.config import RunConfig, option
from cltk.registry import MethodSpec, register


@dataclass
class LoraConfig:
    r: int = option("LoRA rank", 8)
    alpha: float = option("LoRA alpha", 16.0)
    dropout: float = option("LoRA dropout", 0.0)
    target_modules: list[str] | None = option(
        "module names to adapt; default: the attention projections", None
    )
    per: Literal["domain", "block"] = option("one adapter per domain or per block", "domain")
    base: Literal["frozen", "merged"] = option(
        "adapters on the original base, or merged stage by stage", "frozen"
    )


def check(cfg: RunConfig, section: LoraConfig) -> None:
    from cltk.methods.lora.adapters import check_lora_config  # PEFT: imported only for LoRA runs

    check_lora_config(cfg)



def _grow_refusal(section: LoraConfig) -> str | None:
    if section.base == "frozen":
        return (
            "a run with lora.base: frozen cannot grow yet (its earlier stages' adapter views would lack "
            "the new domains); start a new output_dir with every domain, or use lora.base: merged"
        )
    return None


SPEC = register(MethodSpec("lora", LoraConfig, "cltk.methods.lora.adapters:LoraMethod",
                           "a LoRA adapter per domain or block", check,
                           freezes_base=lambda section: True, grow_refusal=_grow_refusal,
                           run_files=("lora_base", "adapters"), order=10))
