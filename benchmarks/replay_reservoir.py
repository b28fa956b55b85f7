"""What a replay reservoir (``replay.memory``) costs at a stage end: time and disk of writing it.

    python benchmarks/replay_reservoir.py --memory 20000 --seq-len 256 --stage 40000

writes the reservoir after two stages of ``--stage`` random sequences each
(:func:`cltk.methods.replay.reservoir.absorb`, rows read from memory, so the figure is the reservoir's
own work: sampling, copying the previous reservoir, writing the new one) into a temporary directory,
and prints the seconds of each and the size of the token file (``memory x seq_len x 4`` bytes).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from cltk.methods.replay import reservoir as res

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", type=int, default=20000)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--stage", type=int, default=40000, help="sequences each stage trains")
    a = ap.parse_args()
    data = np.random.default_rng(0).integers(0, 50000, (a.stage, a.seq_len), dtype=np.int64)

    def read(items):
        return data[[i for _, i in items]]

    with tempfile.TemporaryDirectory() as d:
        prev, times = None, []
        for s in range(2):
            t = time.perf_counter()
            prev = res.absorb(Path(d), prev, s, f"s{s}", [(s, i) for i in range(a.stage)], read,
                              a.memory, a.seq_len, seed=1)
            times.append(time.perf_counter() - t)
        mib = (prev.path / "tokens.npy").stat().st_size / 2**20
    print(f"memory {a.memory:,} x seq_len {a.seq_len} (stages of {a.stage:,} sequences): "
          f"stage 0 {times[0]:.2f} s, stage 1 {times[1]:.2f} s, tokens {mib:.1f} MiB on disk")


if __name__ == "__main__":
    main()
