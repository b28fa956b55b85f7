"""ZeRO-equivalence helpers: what a check that compares a DeepSpeed engine on real ranks with a plain
single-process torch reference needs on every rank."""

from __future__ import annotations

from typing import Any

import torch


def ds_config(stage: int, micro_batch: int = 4, accumulation: int = 1, **extra: Any) -> dict:
    """A DeepSpeed config for a client-built engine: ZeRO ``stage``, the torch optimizer handed over
    (``zero_allow_untested_optimizer``), no step prints; ``extra`` adds keys (``gradient_clipping``,
    ``bf16``, ``optimizer``...) and ``offload=True`` moves the optimizer to the CPU."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if extra.pop("offload", False):  # DeepSpeedCPUAdam steps on the CPU, as cltk.engine builds it
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if extra.pop("bf16", False):  # bf16 weights, fp32 gradient accumulation
        config.update(bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})
    return {**config, **extra}


def full_weights(engine) -> dict[str, torch.Tensor]:
    """Every parameter of the engine's model, whole and fp32 (gathered from the ranks under ZeRO 3)."""
    import deepspeed

    params = dict(engine.module.named_parameters())
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().float().clone() for n, p in params.items()}
    return {n: p.detach().float().clone() for n, p in params.items()}


def place_fragments(full: dict[str, torch.Tensor], partitions, tensors) -> None:
    """Copy each of this rank's partition tensors (laid out like ``partitions``, a
    :func:`cltk.methods.kit.zero_view.zero_view`'s) into the flat whole parameters ``full[name]``."""
    for part, t in zip(partitions, tensors, strict=True):
        flat = t.detach().float().cpu().reshape(-1)
        for f in part.fragments:
            full[f.name][f.start : f.start + f.numel] = flat[f.offset : f.offset + f.numel]


def gather_partitions(view, tensors, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Whole parameters from every rank's partition tensors (each element sits on exactly one rank
    under ZeRO 1-3, so a sum over ranks puts each in place; under the plain layout every rank holds
    all)."""
    from cltk import distributed as dist
    from cltk.methods.kit.zero_view import full_shape

    shapes = {n: full_shape(p) for n, p in module.named_parameters() if p.requires_grad}
    full = {n: torch.zeros(s.numel()) for n, s in shapes.items()}
    place_fragments(full, view.partitions, tensors)
    if view.layout != "plain":
        for t in full.values():
            dist.all_reduce_sum(t)
    return {n: t.view(shapes[n]) for n, t in full.items()}


def rel_err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """The worst element error over every tensor, relative to the largest element of ``want``."""
    num = max(float((got[n] - want[n]).abs().max()) for n in want)
    return num / max(float(w.abs().max()) for w in want.values())
