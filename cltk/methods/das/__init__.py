"""DAS unit-importance soft-masking (``das:``): the heads, FFN units and token rows that earlier domains
found important move less, on the optimizer update so it holds under Adam and ZeRO.

Here: the config section and its checks. The hooks are in :mod:`.method`; units are found in
:mod:`.unit_discovery` and :mod:`.units`, scored in :mod:`.importance`, masked in :mod:`.masking`; the
contrastive term is :mod:`.contrastive`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cltk.config import ConfigError, RunConfig, option
from cltk.registry import MethodSpec, register


@dataclass
class ContrastiveConfig:
    weight: float = option("weight of the DAS contrastive term added to the loss", 0.1)
    temperature: float = option("temperature of the contrastive softmax", 0.05)


@dataclass
class DasConfig:
    importance_samples: int = option(
        "sequences of each domain used to estimate unit importance", 256
    )
    proxy_dropout: float = option("dropout of the two passes of the first domain's proxy KL", 0.1)
    mask: Literal["update", "grad"] = option(
        "mask the optimizer update (holds under Adam) or the grad", "update"
    )
    protect_embeddings: bool = option(
        "also score and mask the token rows of the input embedding and the LM head", True
    )
    contrastive: ContrastiveConfig | None = option(
        "DAS contrastive term: two dropout views as positives, the importance-gated view as hard "
        "negative",
        None,
    )


def check(cfg: RunConfig, das: DasConfig) -> None:
    if das.importance_samples < 1:
        raise ConfigError("das.importance_samples", f"must be > 0, got {das.importance_samples}")
    if das.contrastive is not None:
        if das.contrastive.weight < 0:
            raise ConfigError("das.contrastive.weight", f"must be >= 0, got {das.contrastive.weight}")
        if das.contrastive.temperature <= 0:
            raise ConfigError(
                "das.contrastive.temperature", f"must be > 0, got {das.contrastive.temperature}"
            )
    if not 0 < das.proxy_dropout < 1:
        raise ConfigError("das.proxy_dropout", f"must be in (0, 1), got {das.proxy_dropout}")



SPEC = register(MethodSpec("das", DasConfig, "cltk.methods.das.method:DasMethod",
                           "DAS unit-importance soft-masking", check, acts_on_base=True, order=60))
