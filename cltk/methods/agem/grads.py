"""This rank's reduced gradient between the last backward of a step and ``engine.step()``, laid out like
the partitions of :class:`cltk.methods.kit.zero_view.ZeroView`, and how to drop a gradient the engine reduced
outside an optimizer step.

After the backward at an accumulation boundary DeepSpeed holds the gradient averaged over ranks,
each rank the elements of its own partitions, until ``engine.step()`` flattens it into the fp32
partitions:

- ZeRO 0 (fp32): every rank holds all of it in ``param.grad``.
- ZeRO 1/2: ``param._hp_mapping.get_lp_grad_fragment(param._index_in_param_group)``, the tensor that
  ``deepspeed.utils.safe_get_full_grad`` reads before it all-reduces (a view into the optimizer's
  ``averaged_gradients``, which ``step()`` flattens, so writes to it reach the step).
- ZeRO 3: ``deepspeed.utils.safe_get_local_grad`` / ``safe_set_local_grad`` (public).

:func:`discard_grads` follows DeepSpeed's own path for a step it skips on overflow (clear the
gradient buffers and the micro-step counter, touch neither weights nor optimizer state), so the next
micro-batches accumulate from zero as after a real step. These are DeepSpeed internals, read in
0.19.8 and tested per ZeRO stage (tests/scripts/agem_zero.py); fp16, bf16 without ZeRO and optimizer
offload are refused.
"""

from __future__ import annotations

import torch

from cltk.methods.kit.zero_view import LayoutError, ZeroView

SUPPORTED = ("plain", "zero1/2", "zero3")


def check_layout(view: ZeroView) -> None:
    """Raise :class:`LayoutError` for an engine whose gradient this module cannot reach."""
    if view.layout not in SUPPORTED:
        raise LayoutError(
            "A-GEM reads the reduced gradient under fp32 ZeRO 0 or ZeRO 1, 2, 3; this engine steps with "
            "DeepSpeed's BF16_Optimizer (bf16 without ZeRO, or bf16 at ZeRO 1 with fp32 gradient "
            "accumulation): use ZeRO 2 or 3 for bf16, or drop data_types.grad_accum_dtype"
        )
    if len(view.optimizers) > 1:
        raise LayoutError("A-GEM does not support ZeRO 3 with a partial optimizer offload")


def _zero12_grad(p: torch.nn.Parameter, start: int, numel: int) -> torch.Tensor:
    """The flat view of this rank's reduced gradient fragment of ``p`` (ZeRO 1/2)."""
    t = p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group)
    if t.numel() == numel:
        return t
    if t.numel() == p.numel():  # a buffer of the whole parameter: this rank's fragment of it
        return t.reshape(-1).narrow(0, start, numel)
    raise LayoutError(
        f"ZeRO 1/2 holds {t.numel()} gradient elements for a fragment of {numel}: this DeepSpeed version "
        "lays gradients out differently (tested: 0.19.8)"
    )


def read_grads(engine, view: ZeroView) -> list[torch.Tensor]:
    """This rank's reduced gradient as one flat fp32 tensor per partition of ``view`` (a copy, on the
    partition's device; zeros where the partition holds padding). Call between the boundary backward
    and ``engine.step()``."""
    from deepspeed.utils import safe_get_local_grad

    out = []
    for part in view.partitions:
        flat = torch.zeros(part.numel, dtype=torch.float32, device=part.tensor.device)
        for f in part.fragments:
            if view.layout == "plain":
                g = f.param.grad
                if g is None:
                    continue  # an unused parameter: a zero gradient
                src = g.reshape(-1)
            elif view.layout == "zero1/2":
                src = _zero12_grad(f.param, f.start, f.numel).reshape(-1)
            else:
                src = safe_get_local_grad(f.param).reshape(-1)[: f.numel]
            flat[f.offset : f.offset + f.numel] = src.to(flat.device, torch.float32)
        out.append(flat)
    return out


def write_grads(engine, view: ZeroView, flats: list[torch.Tensor]) -> None:
    """Write per-partition flat tensors (as from :func:`read_grads`) back into DeepSpeed's reduced
    gradient, so that ``engine.step()`` steps on them."""
    from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

    for part, flat in zip(view.partitions, flats, strict=True):
        for f in part.fragments:
            values = flat[f.offset : f.offset + f.numel]
            if view.layout == "plain":
                if f.param.grad is not None:
                    f.param.grad.copy_(values.reshape(f.param.grad.shape))
            elif view.layout == "zero1/2":
                dst = _zero12_grad(f.param, f.start, f.numel)
                dst.copy_(values.reshape(dst.shape).to(dst.dtype))
            else:
                local = safe_get_local_grad(f.param).clone()
                local.reshape(-1)[: f.numel] = values.to(local.device, local.dtype)
                safe_set_local_grad(f.param, local)


def discard_grads(engine, view: ZeroView) -> None:
    """Drop the gradient a boundary backward left, without a step: afterwards the engine accumulates the
    next micro-batches from zero, as after ``engine.step()``. Weights, optimizer state and the
    engine's step counters are not touched."""
    opt = engine.optimizer
    if view.layout == "plain":
        engine.zero_grad()
    elif view.layout == "zero1/2":
        from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

        # DeepSpeedZeroOptimizer.step() on overflow: clear the gradients, then the micro-step counter
        opt.zero_grad(set_to_none=True)
        opt._release_preflattened_grad_buffers()
        for k in list(opt.averaged_gradients):
            opt.averaged_gradients[k] = None
            opt.all_grad_tensors[k] = None
        opt.micro_step_id = INITIAL_MICRO_STEP_ID
    else:
        # DeepSpeedZeroOptimizer_Stage3._overflow_clean_up (zero_grad also resets micro_step_id)
        opt.zero_grad(set_to_none=True)
        opt.averaged_gradients = {}
