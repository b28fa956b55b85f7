"""DAS: unit-importance soft-masking (Ke et al., "Continual Pre-training of Language Models", ICLR 2023).

Before the first domain trains, the importance of every attention head and FFN unit to what the model
already knows is scored with the proxy (KL between two dropout passes on the first domain's data). After each
domain, importance for that domain is scored with the LM loss and accumulated by element-wise max. While a
later domain trains, a unit of accumulated importance s changes about (1 - s) as much as it would unmasked:
by default the optimizer's *update* is masked (holds under Adam, weight decay included; ZeRO 0-3), or, as an
option correct for SGD only, the gradient. Every stage directory holds the accumulated importance that the
next stage uses, as ``importance.safetensors``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cltk import distributed as dist
from cltk.config import RunConfig
from cltk.importance import (
    accumulate,
    estimate_importance,
    load_importance,
    normalize,
    save_importance,
)
from cltk.masking import attach_update_masks, param_masks, register_grad_masks
from cltk.methods.base import Method, StageContext
from cltk.models import build_model
from cltk.tracking import log

IMPORTANCE_FILE = "importance.safetensors"


class DasMethod(Method):
    name = "das"

    def __init__(self, cfg: RunConfig):
        assert cfg.das is not None
        self.cfg, self.das = cfg, cfg.das
        self.importance: dict[str, torch.Tensor] | None = None
        self.handles: list[Any] = []

    # ----- scoring ----------------------------------------------------------------------------------
    def _batches(self, ctx: StageContext, domain: str):
        """This rank's share of ``importance_samples`` sequences of ``domain``'s training data."""
        train = ctx.domains[domain].train.with_format("numpy")
        n = min(self.das.importance_samples, len(train))
        order = np.random.default_rng([self.cfg.seed, 0xDA5]).permutation(len(train))[:n]
        mine = order[dist.rank() :: dist.world_size()]
        bs = self.cfg.train.micro_batch_size
        for i in range(0, len(mine), bs):
            rows = train[np.sort(mine[i : i + bs]).tolist()]["input_ids"]
            yield {"input_ids": torch.as_tensor(np.asarray(rows, dtype=np.int64))}

    def _score(self, ctx: StageContext, model: torch.nn.Module, domain: str, mode: str) -> dict:
        model.to(dist.device())
        raw = estimate_importance(
            model,
            self._batches(ctx, domain),
            mode=mode,
            proxy_dropout=self.das.proxy_dropout,
            seed=self.cfg.seed,
        )
        return normalize(raw)

    # ----- hooks ------------------------------------------------------------------------------------
    def on_stage_start(self, ctx: StageContext) -> None:
        if ctx.prev_stage_dir is None:
            log(
                f"das: scoring what the initial model knows (proxy KL, {self.das.importance_samples} "
                f"sequences of {ctx.stage.domain})"
            )
            self.importance = self._score(ctx, ctx.model, ctx.stage.domain, "proxy")
        else:
            self.importance = load_importance(ctx.prev_stage_dir / IMPORTANCE_FILE, model=ctx.model)
        if self.das.mask == "grad":
            self.handles = register_grad_masks(ctx.model, param_masks(ctx.model, self.importance))

    def on_engine_ready(self, ctx: StageContext) -> None:
        if self.das.mask == "update":
            assert self.importance is not None
            masks = param_masks(ctx.engine.module, self.importance)
            self.handles = [attach_update_masks(ctx.engine, masks)]

    def on_stage_end(self, ctx: StageContext) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        assert self.importance is not None
        stage = ctx.stage
        if (
            stage.block == stage.blocks - 1
        ):  # the domain is done: score it on the model just trained
            log(
                f"das: scoring units for {stage.domain} (LM loss, {self.das.importance_samples} sequences)"
            )
            trained = build_model(self.cfg, ctx.tokenizer, init_dir=ctx.stage_dir)
            self.importance = accumulate(
                self.importance, self._score(ctx, trained, stage.domain, "lm")
            )
            del trained
        if dist.is_main():
            save_importance(ctx.stage_dir / IMPORTANCE_FILE, self.importance)
        dist.barrier()
