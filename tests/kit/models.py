"""The one tiny Llama of the tests."""

from __future__ import annotations

from typing import Any

import torch

# a 2-layer Llama with grouped KV heads: the inline ``model.config`` of tests/tiny_run.py's run config
TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}

# head_dim != hidden / heads and biases of odd length (45): ZeRO 3 pads them on 2 ranks, and ZeRO 1/2
# fragments straddle the ranks (what the ZeRO-equivalence checks need)
ODD_SIZES: dict[str, Any] = {
    "hidden_size": 36,
    "head_dim": 10,
    "intermediate_size": 45,
    "attention_bias": True,
    "mlp_bias": True,
}


def model_sets(**overrides: Any) -> list[str]:
    """:data:`TINY_LLAMA`'s sizes (updated by ``overrides``) as ``model.config.KEY=VALUE`` overrides
    of a run config (``cltk train --set``), for a config whose model is bigger."""
    sizes = {**TINY_LLAMA, **overrides}
    return [f"model.config.{k}={v}" for k, v in sizes.items()
            if k not in ("model_type", "max_position_embeddings")]


def tiny_llama(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A freshly initialised ``LlamaForCausalLM`` (fp32, vocabulary 64) of :data:`TINY_LLAMA`'s sizes
    updated by ``overrides`` (any ``LlamaConfig`` field), its weights drawn after
    ``torch.manual_seed(seed)``: equal arguments give equal weights."""
    import transformers as T

    fields = {**TINY_LLAMA, "vocab_size": 64, **overrides}
    fields.pop("model_type")
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(T.LlamaConfig(**fields))
