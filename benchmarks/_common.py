"""Shared by the benchmark scripts (run as ``python benchmarks/X.py``: this folder is on sys.path)."""


class VocabOnly:
    """Stands in for a tokenizer where a model built from an inline config needs only its length."""

    eos_token_id = bos_token_id = pad_token_id = None

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n
