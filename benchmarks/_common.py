"""Shared by the benchmark scripts (run as ``python benchmarks/X.py``: this folder is on sys.path)."""


class VocabOnly:
    """Stands in for a tokenizer where a model built from an inline config needs only its length."""

    eos_token_id = bos_token_id = pad_token_id = None

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def random_batches(rng, vocab: int, cfg) -> list:
    """One optimizer step of random token ids for this rank: ``gradient_accumulation_steps`` tensors of
    ``[micro_batch_size, seq_len]`` (step time does not depend on the text)."""
    import torch

    t = cfg.train
    return [
        torch.as_tensor(rng.integers(0, vocab, (t.micro_batch_size, cfg.data.seq_len)))
        for _ in range(t.gradient_accumulation_steps)
    ]
