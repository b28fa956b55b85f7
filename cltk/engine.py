"""One stage's DeepSpeed engine and one optimizer step: forward, loss, backward, transforms, step.

The loop over stages (``cltk.continual``) owns the schedule, checkpoints and evaluation; this module owns
what happens to one accumulated batch.
"""

from __future__ import annotations

import gc
import math
from typing import Any, Callable

import deepspeed
import torch

from cltk import distributed as dist
from cltk.ds_config import EngineConfig, deepspeed_config
from cltk.errors import UserError
from cltk.extensions import check_build_locks
from cltk.forward import forward_logits
from cltk.losses import IGNORE_INDEX, causal_lm_loss
from cltk.method import Method, StageContext
from cltk.schedules import stage_lr_lambda


class NonFiniteLossError(UserError, RuntimeError):  # a RuntimeError for callers that catch one
    """A NaN/inf loss: training stops before the step, so no checkpoint ever holds the damage."""


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
    cfg: EngineConfig,
    model: torch.nn.Module,
    total_steps: int,
    load_universal: bool = False,
    lr_fn: Callable[[int], float] | None = None,
):
    """``deepspeed.initialize`` with cltk's AdamW and LR schedule; returns the engine.

    ``cfg`` is the run config or another mode's (:class:`cltk.ds_config.EngineConfig`: its
    ``train`` section gives lr, betas and weight_decay). ``lr_fn`` maps the stage's step to the LR
    multiplier (see :func:`cltk.schedules.stage_lr_lambda`);
    default: the configured schedule over ``total_steps`` alone. ``load_universal`` prepares the engine
    to load a universal checkpoint (resume at another world size).
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

        check_build_locks()
        optimizer = DeepSpeedCPUAdam(
            groups, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay, adamw_mode=True
        )
    else:
        # on CUDA, torch's fused AdamW: one kernel for every parameter instead of a loop of them
        fused = dist.device().type == "cuda"
        optimizer = torch.optim.AdamW(
            groups, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay,
            **({"fused": True} if fused else {}),
        )
    lr_fn = lr_fn or stage_lr_lambda(t, [total_steps], 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_fn)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg
    )
    return engine


def describe_optimizer(engine) -> str:
    """The optimizer kernel an engine steps with, for ``stage.json`` (``torch AdamW fused``...)."""
    opt = getattr(engine, "basic_optimizer", None) or engine.optimizer
    kind = type(opt).__name__
    if isinstance(opt, torch.optim.AdamW):
        return "torch AdamW " + ("fused" if opt.defaults.get("fused") else
                                 "foreach" if opt.defaults.get("foreach") else "for-loop")
    return kind


def frozen_engine(model: torch.nn.Module, ds_cfg: dict[str, Any]):
    """``deepspeed.initialize`` of a model that only runs forward (no optimizer; its parameters
    frozen), in eval mode; ``ds_cfg`` from :func:`cltk.ds_config.frozen_deepspeed_config`."""
    model.requires_grad_(False)
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_cfg)
    engine.eval()
    return engine


def release_engine(engine) -> None:
    """Destroy an engine, empty every tensor it owns, drop what DeepSpeed keeps of it, collect.

    The engine's model must not be used again (every caller built it for this engine alone).
    ``engine.destroy()`` alone does not free a ZeRO-3 engine in DeepSpeed 0.19.8: each ZeRO-3 engine
    pushes its model on ``deepspeed.runtime.zero.parameter_offload.FWD_MODULE_STACK`` (a module
    global) and never pops it, and its optimizer is still held from outside Python's garbage
    collector after that is cleared (not found yet; tests/test_release_engine.py marks it). So the
    memory is freed whatever holds the objects: the model's parameters (their ZeRO partitions too)
    and buffers, the ZeRO optimizer's flat partitions and gradient buffers and the inner optimizer's
    state are each swapped for an empty tensor before the objects are let go.
    """
    module = engine.module
    optimizer = getattr(engine, "optimizer", None)
    engine.destroy()
    _empty_tensors(module, optimizer)
    try:
        from deepspeed.runtime.zero import parameter_offload
    except ImportError:  # pragma: no cover - a DeepSpeed without ZeRO 3
        parameter_offload = None
    stack = getattr(parameter_offload, "FWD_MODULE_STACK", None)
    if isinstance(stack, list) and stack:
        mine = {id(m) for m in module.modules()}
        stack[:] = [m for m in stack if id(m) not in mine]
    del engine, module, optimizer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _empty_tensors(module: torch.nn.Module, optimizer: Any) -> None:
    """Swap every tensor a released engine owns for an empty one: the model's parameters, their
    ZeRO-3 partitions (``ds_tensor``) and buffers; the ZeRO optimizer's own tensors (flat
    partitions, gradient buffers: its attributes and the lists and dicts in them, two levels down);
    the inner torch optimizer's parameters and state."""

    def empty(value: Any, depth: int) -> None:
        if isinstance(value, torch.Tensor):
            if value.numel():
                value.data = torch.empty(0, dtype=value.dtype, device=value.device)
        elif depth and isinstance(value, (list, tuple)):
            for v in value:
                empty(v, depth - 1)
        elif depth and isinstance(value, dict):
            for v in value.values():
                empty(v, depth - 1)

    with torch.no_grad():
        for p in module.parameters():
            empty(getattr(p, "ds_tensor", None), 0)
            empty(p, 0)
        for b in module.buffers():
            empty(b, 0)
        if optimizer is None:
            return
        inner = getattr(optimizer, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            for state in inner.state.values():
                empty(state, 1)
            for group in inner.param_groups:
                empty(group["params"], 1)
        for value in vars(optimizer).values():
            empty(value, 2)


def compute_dtype(engine) -> torch.dtype:
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32


def train_step(
    ctx: StageContext,
    methods: list[Method],
    micro_batches: list[torch.Tensor],
    valid_rows: list[int] | None = None,
    step_rows: int | None = None,
) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches ([b, T] token ids each): the methods'
    ``before_step``, then per micro-batch forward, loss, backward, and ``engine.step()``.

    Args:
        micro_batches: this rank's micro-batches, one per accumulation step.
        valid_rows: how many leading rows of each micro-batch are trained (default: all). The other rows
            pad a short last step to the micro-batch size: their labels are ignored, so they add nothing
            to the loss or the gradient.
        step_rows: the rows trained in this step over all ranks (default: a full global batch).

    Every micro-batch loss is a mean over its trained tokens (packed sequences have equal token counts).
    DeepSpeed averages the micro-batch losses over accumulation steps and ranks; each is weighted by its
    share of the step's rows, so that average is the mean over the step's rows (weight 1 in a full step).

    The non-finite guard and the logged figures cost one all-reduce and one device-to-host copy per
    optimizer step, after the last backward and before ``engine.step()`` applies the update: a NaN/inf
    term in any micro-batch on any rank stops every rank before the weights change. Returns the global
    mean of each loss term (equal on every rank) and each method metric (this rank's mean).
    """
    engine = ctx.engine
    world, n = dist.world_size(), len(micro_batches)
    valid_rows = valid_rows or [int(mb.shape[0]) for mb in micro_batches]
    step_rows = step_rows or sum(valid_rows) * world
    names: list[str] = []
    terms_sum: torch.Tensor | None = None
    metric_sums: dict[str, torch.Tensor] = {}
    for m in methods:
        m.before_step(ctx)
    for i, (ids, rows) in enumerate(zip(micro_batches, valid_rows)):
        ids = ids.to(engine.device)
        batch = {"input_ids": ids, "valid_rows": rows}
        logits, labels = forward_logits(engine, ids)
        if rows < ids.shape[0]:
            labels = labels.clone()
            labels[rows:] = IGNORE_INDEX
        replaced = None
        for m in methods:
            replaced = m.loss(ctx, batch, logits, labels)
            if replaced is not None:
                break
        if replaced is None:
            loss, metrics = causal_lm_loss(logits, labels), {}
        else:
            loss, metrics = replaced
        terms = {"loss_main": loss}
        for m in methods:
            for name, term in m.extra_loss(ctx, batch, logits, labels).items():
                loss = loss + term
                terms[name] = term
        terms["loss"] = loss
        weight = rows * n * world / step_rows
        if weight != 1.0:
            loss = loss * weight
        vec = torch.stack([t.detach().float().reshape(()) for t in terms.values()]) * weight
        names = list(terms)
        terms_sum = vec if terms_sum is None else terms_sum + vec
        for k, v in metrics.items():
            v = torch.as_tensor(v, dtype=torch.float32).detach().reshape(()).to(engine.device)
            metric_sums[k] = metric_sums.get(k, 0.0) + v
        engine.backward(loss)
        if i == n - 1:
            totals = _reduce_and_check(ctx, names, terms_sum, metric_sums, n * world)
        if engine.is_gradient_accumulation_boundary():
            for m in methods:
                m.after_backward(ctx)
            lr = float(engine.get_lr()[0])  # the LR this update applies (the scheduler steps in step())
        engine.step()
    return {**totals, "lr": lr}


def _reduce_and_check(
    ctx: StageContext,
    names: list[str],
    terms_sum: torch.Tensor,
    metric_sums: dict[str, torch.Tensor],
    count: int,
) -> dict[str, float]:
    """One all-reduce of the step's weighted loss terms and one host copy of them with this rank's
    method metrics; raises :class:`NonFiniteLossError` on every rank if any term is NaN/inf anywhere."""
    reduced = dist.all_reduce_sum(terms_sum) / count
    per_rank = count // dist.world_size()  # this rank's micro-batches
    local = [v.reshape(()) / per_rank for v in metric_sums.values()]
    values = torch.cat([reduced, *(v.reshape(1) for v in local)]).double().cpu().tolist()
    terms = dict(zip(names, values[: len(names)]))
    if not all(math.isfinite(v) for v in terms.values()):
        raise NonFiniteLossError(
            f"non-finite loss at stage {ctx.stage.name} step {ctx.step} ({terms}); stopped before the "
            "update: the last checkpoint is intact. Lower train.lr, check the data, or resume from the "
            "last checkpoint"
        )
    terms.update(zip(metric_sums, values[len(names) :]))
    return terms
