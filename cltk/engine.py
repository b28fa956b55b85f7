"""One stage's DeepSpeed engine and one optimizer step: forward, loss, backward, transforms, step.

The loop over stages (``cltk.continual``) owns the schedule, checkpoints and evaluation; this module owns
what happens to one accumulated batch.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import deepspeed
import torch

from cltk import distributed as dist
from cltk.config import RunConfig
from cltk.errors import UserError
from cltk.losses import causal_lm_loss
from cltk.methods.base import Method, StageContext
from cltk.validate import deepspeed_config


class NonFiniteLossError(UserError, RuntimeError):  # a RuntimeError for callers that catch one
    """A NaN/inf loss: training stops before the step, so no checkpoint ever holds the damage."""


def lr_lambda(cfg: RunConfig, total_steps: int):
    """LR multiplier per step: linear warmup, then cosine/linear decay to ``min_lr_ratio`` (per stage)."""
    t = cfg.train
    warm = min(t.warmup_steps, max(total_steps - 1, 0))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if t.schedule == "constant" or total_steps <= warm + 1:
            return 1.0
        frac = min(1.0, (step - warm) / (total_steps - warm - 1))
        decay = 0.5 * (1 + math.cos(math.pi * frac)) if t.schedule == "cosine" else 1 - frac
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay

    return f


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices, not biases or norm weights (1-D)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_engine(
    cfg: RunConfig, model: torch.nn.Module, total_steps: int, load_universal: bool = False
):
    """``deepspeed.initialize`` with cltk's AdamW and per-stage LR schedule; returns the engine.

    ``load_universal`` prepares the engine to load a universal checkpoint (resume at another world size).
    """
    t = cfg.train
    ds_cfg = deepspeed_config(cfg, dist.world_size(), dist.bf16_available())
    if load_universal:
        ds_cfg.setdefault("checkpoint", {})["load_universal"] = True
    groups = param_groups(model, t.weight_decay)
    offload = ds_cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload in ("cpu", "nvme"):
        # the optimizer step runs on the CPU: DeepSpeed's vectorised CPU Adam is several times faster than
        # torch's there (compiled on first use, like the shm op)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(
            groups, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, adamw_mode=True
        )
    else:
        optimizer = torch.optim.AdamW(
            groups, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg
    )
    return engine


def compute_dtype(engine) -> torch.dtype:
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


def keeps_logits(module: torch.nn.Module) -> bool:
    base = module.get_base_model() if hasattr(module, "get_base_model") else module  # PEFT
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def next_token_logits(
    forward: Callable[..., Any], module: torch.nn.Module, input_ids: torch.Tensor
) -> torch.Tensor:
    """Logits [b, T-1, V] of positions 0..T-2 of ``input_ids`` [b, T] (row t predicts token t+1).

    The LM head runs on those T-1 positions only (``logits_to_keep``), so the result is contiguous and
    no [b, T, V] tensor is sliced and copied; models without ``logits_to_keep`` fall back to a slice.
    ``forward`` is the engine (or model) called; ``module`` the model inside it.
    """
    if keeps_logits(module):
        keep = torch.arange(input_ids.shape[1] - 1, device=input_ids.device)
        return forward(input_ids=input_ids, logits_to_keep=keep).logits
    return forward(input_ids=input_ids).logits[:, :-1].contiguous()


def forward_logits(engine, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned (logits [b, T-1, V], labels [b, T-1]) of a packed batch [b, T]."""
    return next_token_logits(engine, engine.module, input_ids), input_ids[:, 1:]


def train_step(
    ctx: StageContext, methods: list[Method], micro_batches: list[torch.Tensor]
) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches ([b, T] token ids each).

    Every micro-batch loss is a mean over its tokens; packed sequences have equal token counts, so the mean
    of micro-batch means (DeepSpeed divides by the accumulation steps) is the mean over the global batch.
    Returns the global mean of each loss term, equal on every rank.
    """
    engine = ctx.engine
    sums: dict[str, float] = {}
    for ids in micro_batches:
        ids = ids.to(engine.device)
        batch = {"input_ids": ids}
        logits, labels = forward_logits(engine, ids)
        replaced = None
        for m in methods:
            replaced = m.loss(ctx, batch, logits, labels)
            if replaced is not None:
                break
        if replaced is None:
            loss, metrics = causal_lm_loss(logits, labels), {}
        else:
            loss, metrics = replaced
        terms = {"loss_main": loss.detach()}
        for m in methods:
            for name, term in m.extra_loss(ctx, batch, logits, labels).items():
                loss = loss + term
                terms[name] = term.detach()
        terms["loss"] = loss.detach()
        check = torch.stack([v.float().reshape(()) for v in terms.values()])
        check = dist.all_reduce_sum(check.cpu().clone())
        if not torch.isfinite(check).all():
            raise NonFiniteLossError(
                f"non-finite loss at stage {ctx.stage.name} step {ctx.step} "
                f"({dict(zip(terms, check.tolist()))}); stopped before the update: the last checkpoint is "
                "intact. Lower train.lr, check the data, or resume from the last checkpoint"
            )
        for (name, _), v in zip(terms.items(), check.tolist()):
            sums[name] = sums.get(name, 0.0) + v / dist.world_size()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary():
            for m in methods:
                m.after_backward(ctx)
        engine.step()
    n = len(micro_batches)
    out = {k: v / n for k, v in sums.items()}
    out["lr"] = float(engine.get_lr()[0])
    return out
