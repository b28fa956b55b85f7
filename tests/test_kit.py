"""The test kit itself: the tiny Llama and the in-process 2-rank runner (a failure on one rank must
reach the test with that rank's traceback, and no rank may outlive the call)."""

from __future__ import annotations

import pytest
import torch

from tests.kit import TINY_LLAMA, run_distributed, tiny_llama
from tests.kit.distributed import RankFailure


def test_tiny_llama_is_seeded_and_takes_overrides():
    a, b = tiny_llama(), tiny_llama()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(tiny_llama(seed=1).lm_head.weight, a.lm_head.weight)
    assert a.config.hidden_size == TINY_LLAMA["hidden_size"] and a.config.vocab_size == 64
    small = tiny_llama(hidden_size=16, num_hidden_layers=1, attention_bias=True)
    assert len(small.model.layers) == 1 and small.model.layers[0].self_attn.q_proj.bias is not None


def sum_ranks(base: int) -> tuple[int, int, float]:
    from cltk import distributed as dist

    t = torch.tensor([float(base + dist.rank())])
    return dist.rank(), dist.world_size(), float(dist.all_reduce_sum(t))


def fail_on_rank_1():
    """Yields one item, then fails on rank 1 (what the shared launch reads to name the failed check)."""
    from cltk import distributed as dist

    yield "first"
    if dist.rank() == 1:
        raise ValueError("rank one broke")
    dist.barrier()  # rank 0 waits on rank 1 in a collective: it must be killed, not left hanging


@pytest.mark.multirank
def test_run_distributed_returns_every_rank_and_raises_a_rank_s_failure():
    assert run_distributed(sum_ranks, 10) == [(0, 2, 21.0), (1, 2, 21.0)]
    with pytest.raises(RankFailure, match=r"(?s)fail_on_rank_1 failed on rank 1.*rank one broke") as e:
        run_distributed(fail_on_rank_1)
    assert e.value.streamed[1] == ["first"]
