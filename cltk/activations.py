"""Activation checkpointing (``train.activation_checkpointing``) and the attention kernel of a model.

Checkpointing is transformers' gradient checkpointing, non-reentrant (``torch.utils.checkpoint`` with
``use_reentrant=False``): each decoder layer keeps only its input and recomputes the rest in backward.
transformers checkpoints a layer's ``forward``, not its ``__call__``, so hooks on a decoder block run
once, outside the checkpoint; hooks on modules *inside* a block run again in the recomputation. A method
whose hooks on inner modules live for one forward only (and are gone when backward recomputes the
block) must run that forward under :func:`checkpointing_suspended`, or its gradient is computed without
its hooks.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from typing import Iterator

import torch

from cltk.errors import UserError

ATTENTION = ("eager", "sdpa", "flash_attention_2")


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def enable_activation_checkpointing(model: torch.nn.Module) -> int:
    """Turn on non-reentrant gradient checkpointing for ``model`` (a transformers model, PEFT-wrapped
    or not) before ``deepspeed.initialize``.

    With a frozen base (LoRA), the embedding output is made to require grad
    (``enable_input_require_grads``), so a checkpointed block always has an input with a gradient path.
    Returns how many layers checkpoint (the model that holds them is flagged too, and not counted).
    """
    base = base_model(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise UserError(
            f"train.activation_checkpointing: {type(base).__name__} does not support gradient "
            "checkpointing in transformers; set train.activation_checkpointing: false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x: the new name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if any(not p.requires_grad for p in model.parameters()):
        base.enable_input_require_grads()
    flagged = [m for m in base.modules() if getattr(m, "gradient_checkpointing", False) is True]
    return sum(not any(c is not m and c in flagged for c in m.modules()) for m in flagged)


def checkpointing_on(model: torch.nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


@contextmanager
def checkpointing_suspended(model: torch.nn.Module) -> Iterator[None]:
    """Forwards inside run without checkpointing (their activations are kept), then it comes back.

    For passes whose hooks on inner modules are removed before backward (a recomputation would run
    without them).
    """
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in layers:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in layers:
            m.gradient_checkpointing = True


def check_attention(name: str | None) -> None:
    """Refuse an attention kernel that cannot run here (before any work)."""
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise UserError(
            "model.attn_implementation: flash_attention_2 needs the flash-attn package, which is not "
            "importable here: pip install flash-attn (CUDA only), or use sdpa"
        )
