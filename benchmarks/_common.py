"""Shared by the benchmark scripts (run as ``python benchmarks/X.py``: this folder is on sys.path)."""

import argparse
from pathlib import Path

QUICKSTART = str(Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml")


def timed_command(sub, name: str, help: str, steps: int, rounds: int) -> argparse.ArgumentParser:
    """A subcommand that times training steps of a run config: ``--config`` (default the
    quickstart's), ``--set`` overrides, ``--steps`` per arm and round, ``--rounds``, and the
    ``--local_rank`` the deepspeed launcher passes."""
    s = sub.add_parser(name, help=help)
    s.add_argument("--config", default=QUICKSTART)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--steps", type=int, default=steps, help="steps per arm per round")
    s.add_argument("--rounds", type=int, default=rounds, help="timed rounds (after a warm-up)")
    s.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return s


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


class PeakMemory:
    """Peak memory above the level at entry: the GPU's allocated bytes, or this process's RSS
    (sampled every millisecond on a thread: a CPU has no allocator statistics)."""

    def __enter__(self):
        import ctypes
        import gc
        import threading

        import torch

        gc.collect()
        self.cuda = torch.cuda.is_available()
        if not self.cuda:  # give memory freed earlier back to the OS, or it hides the next peak
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        self.added = self.peak - self.start
