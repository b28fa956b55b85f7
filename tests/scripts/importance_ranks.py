"""DAS importance on real ranks: each rank scores its share, all ranks must agree with one process.

Run by tests/test_importance.py::test_two_ranks_equal_one_process as
``deepspeed --num_gpus 2 tests/scripts/importance_ranks.py OUT.safetensors`` (CPU, gloo).
Rank r takes batches r, r + world, ...; rank 0 writes the raw scores of both modes to OUT.
"""

from __future__ import annotations

import sys

import torch
import transformers as T

NUM_BATCHES, LM_SAMPLES = 8, 11


def build() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """The tiny dropout-free Llama and the batches both sides of the test use."""
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = T.AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randint(0, 64, (2, 12), generator=gen)} for _ in range(NUM_BATCHES)
    ]
    return model, batches


def scores(model, batches) -> dict[str, torch.Tensor]:
    """Raw importance of both modes; ``lm`` stops at LM_SAMPLES sequences over all ranks."""
    from cltk.methods.das.importance import estimate_importance

    proxy = estimate_importance(model, batches, mode="proxy", proxy_dropout=0.1)
    lm = estimate_importance(model, batches, mode="lm", num_samples=LM_SAMPLES)
    return {
        "proxy_heads": proxy["heads"],
        "proxy_ffn": proxy["ffn"],
        "lm_heads": lm["heads"],
        "lm_ffn": lm["ffn"],
    }


def main(out: str) -> None:
    import deepspeed
    import torch.distributed as dist
    from safetensors.torch import save_file

    from cltk import distributed as cltk_dist

    deepspeed.init_distributed("gloo")
    cltk_dist.release_shm_names()  # leave /dev/shm as it was, whatever happens next
    rank, world = dist.get_rank(), dist.get_world_size()
    model, batches = build()
    result = scores(model, batches[rank::world])
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    for other in gathered:  # every rank must hold the same result, not only rank 0
        for k, v in other.items():
            torch.testing.assert_close(v, result[k], rtol=0, atol=0)
    if rank == 0:
        save_file(result, out)
    dist.barrier()


if __name__ == "__main__":
    # The deepspeed launcher passes --local_rank=N before the script's own arguments.
    main([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0])
