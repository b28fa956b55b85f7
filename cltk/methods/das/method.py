"""DAS: unit-importance soft-masking (Ke et al., "Continual Pre-training of Language Models", ICLR 2023).

Before the first domain trains, the importance of every attention head and FFN unit to what the model
already knows is scored with the proxy (KL between two dropout passes on the first domain's data). After each
domain, importance for that domain is scored with the LM loss and accumulated by element-wise max. While a
later domain trains, a unit of accumulated importance s changes about (1 - s) as much as it would unmasked:
by default the optimizer's *update* is masked (holds under Adam, weight decay included; ZeRO 0-3), or, as an
option correct for SGD only, the gradient. With ``das.protect_embeddings`` (default) the token rows of the
input embedding and the LM head are scored and masked the same way. Every stage directory holds the
accumulated importance that the next stage uses, as ``importance.safetensors``.

Scoring runs on the model being trained, not on a second copy: the DeepSpeed engine's module (partitioned
under ZeRO 3, in the run's precision), before the first stage's first step (proxy) and after each domain's
last step (LM loss). Only ``mask: grad``, whose hooks must exist before ``deepspeed.initialize``, scores the
first proxy on the plain model being trained, before the engine wraps it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cltk import distributed as dist
from cltk.config import RunConfig
from cltk.forward import keeps_logits
from cltk.method import Method, StageContext
from cltk.methods.das import DasConfig
from cltk.methods.das.contrastive import contrastive_loss, gather_with_grad, mean_pool
from cltk.methods.das.importance import (
    accumulate,
    dropout_hook,
    estimate_importance,
    load_importance,
    normalize,
    save_importance,
)
from cltk.methods.das.masking import attach_update_masks, param_masks, register_grad_masks
from cltk.methods.das.units import UnitMap, attach_gates, block_modules, build_unit_map
from cltk.tracking import log

IMPORTANCE_FILE = "importance.safetensors"


class DasMethod(Method):
    name = "das"

    def __init__(self, cfg: RunConfig, section: DasConfig | None = None):
        self.cfg, self.das = cfg, section if section is not None else cfg.das
        assert self.das is not None
        self.importance: dict[str, torch.Tensor] | None = None
        self.handles: list[Any] = []
        self._umap: UnitMap | None = None  # of ctx.engine.module, for the contrastive gated pass

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

    def _score(self, ctx: StageContext, model: Any, domain: str, mode: str) -> dict:
        """Normalised importance on ``model``: the engine, or (``mask: grad``) the plain model."""
        if isinstance(model, torch.nn.Module) and not hasattr(model, "optimizer"):
            model.to(dist.device())
        what = "proxy KL" if mode == "proxy" else "LM loss"
        log(f"das: scoring {domain} ({what}, {self.das.importance_samples} sequences)")
        raw = estimate_importance(
            model,
            self._batches(ctx, domain),
            mode=mode,
            proxy_dropout=self.das.proxy_dropout,
            seed=self.cfg.seed,
            tokens=self.das.protect_embeddings,
        )
        return normalize(raw)

    def _masks(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        assert self.importance is not None
        return param_masks(model, self.importance, tokens=self.das.protect_embeddings)

    # ----- hooks ------------------------------------------------------------------------------------
    def on_stage_start(self, ctx: StageContext) -> None:
        build_unit_map(ctx.model)  # a model DAS cannot map is refused before the engine is built
        self.importance = None
        if ctx.prev_stage_dir is not None:
            self.importance = load_importance(ctx.prev_stage_dir / IMPORTANCE_FILE, model=ctx.model)
        elif self.das.mask == "grad":  # its hooks go on before deepspeed.initialize
            self.importance = self._score(ctx, ctx.model, ctx.stage.domain, "proxy")
        if self.das.mask == "grad":
            self.handles = register_grad_masks(ctx.model, self._masks(ctx.model))

    def on_engine_ready(self, ctx: StageContext) -> None:
        if self.importance is None:  # what the initial model knows, scored on the engine
            self.importance = self._score(ctx, ctx.engine, ctx.stage.domain, "proxy")
        if self.das.mask == "update":
            masks = self._masks(ctx.engine.module)
            self.handles = [attach_update_masks(ctx.engine, masks)]

    def extra_loss(self, ctx: StageContext, batch: dict[str, torch.Tensor], logits: torch.Tensor,
                   labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The DAS contrastive term (``das.contrastive``), see :mod:`cltk.methods.das.contrastive`.

        Three extra forwards of the micro-batch through ``ctx.engine`` (the same number on every
        rank, as ZeRO-3 needs): two with dropout ``proxy_dropout`` on every block's output (the
        positive pair), one with the units gated by the accumulated importance (the hard negative;
        dropout on as well, as in the reference, where all passes run in train mode). Each pass is
        mean-pooled over the last hidden state; the pools of all ranks are gathered, so every
        rank computes the same loss over the global micro-batch.
        """
        c = self.das.contrastive
        if c is None or c.weight <= 0 or self.importance is None:
            return {}
        engine = ctx.engine
        module = engine.module
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        kwargs: dict[str, Any] = {"input_ids": ids, "output_hidden_states": True}
        if mask is not None:
            kwargs["attention_mask"] = mask
        if keeps_logits(module):  # only the hidden states are needed: one logits row suffices
            kwargs["logits_to_keep"] = 1

        def pooled() -> torch.Tensor:
            return mean_pool(engine(**kwargs).hidden_states[-1], mask)

        drop = [
            b.register_forward_hook(dropout_hook(self.das.proxy_dropout))
            for b in block_modules(module)
        ]
        try:
            view1, view2 = pooled(), pooled()
            if self._umap is None:
                self._umap = build_unit_map(module)
            dev = ids.device
            gates = attach_gates(
                module,
                self._umap,
                heads=self.importance["heads"].to(dev, torch.float32),
                ffn=self.importance["ffn"].to(dev, torch.float32),
            )
            try:
                gated = pooled()
            finally:
                for h in gates:
                    h.remove()
        finally:
            for h in drop:
                h.remove()
        loss = contrastive_loss(
            gather_with_grad(view1),
            gather_with_grad(view2),
            gather_with_grad(gated),
            c.temperature,
        )
        return {"das_contrastive": c.weight * loss}

    def on_stage_end(self, ctx: StageContext) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        assert self.importance is not None
        stage = ctx.stage
        if stage.block == stage.blocks - 1:  # the domain is done: score the engine just trained
            self.importance = accumulate(
                self.importance, self._score(ctx, ctx.engine, stage.domain, "lm")
            )
        if dist.is_main():
            save_importance(ctx.stage_dir / IMPORTANCE_FILE, self.importance)
        dist.barrier()
