"""Model forwards shared by training, evaluation, teachers and methods: next-token logits of packed
batches through a model or a DeepSpeed engine, without a ``[b, T, V]`` copy where the model allows."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch


@functools.lru_cache(maxsize=64)
def _takes_logits_to_keep(forward: Callable[..., Any]) -> bool:
    return "logits_to_keep" in inspect.signature(forward).parameters


def keeps_logits(module: torch.nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (read once per forward function)."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module  # PEFT
    return _takes_logits_to_keep(getattr(base.forward, "__func__", base.forward))


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


def engine_forward(engine) -> Callable[[torch.Tensor], torch.Tensor]:
    """``ids [b, T] -> next-token logits [b, T-1, V]`` through a DeepSpeed engine."""
    return lambda ids: next_token_logits(engine, engine.module, ids)


def model_forward(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``ids [b, T] -> next-token logits [b, T-1, V]`` through a plain model."""
    return lambda ids: next_token_logits(model, model, ids)
