"""A-GEM's episodic memory as pure functions of the seed: which sequences each finished stage leaves in
the memory, and which of them each rank trains its reference gradient on at each step.

The memory is a list of ``(domain, index)`` pairs into the domains' training sequences, kept in the
method's JSON state (every checkpoint and ``stage.json``), so a resumed run uses the same memory;
the draws depend only on (seed, stage, step), so a resumed step draws the same memory batch.
"""

from __future__ import annotations

import numpy as np

_SALT = 0xA6E5  # keeps these draws apart from the other seeded draws of a run


def stage_sample(seed: int, stage_index: int, indices: np.ndarray, size: int) -> np.ndarray:
    """``size`` of a stage's training sequences ``indices``, drawn without replacement, sorted.

    Raises:
        ValueError: ``size`` exceeds the stage's sequences (refused before training: see
            :func:`too_small`).
    """
    indices = np.asarray(indices, dtype=np.int64)
    if size > len(indices):
        raise ValueError(f"a memory of {size} sequences from a stage of {len(indices)}")
    rng = np.random.default_rng([seed, _SALT, stage_index])
    return np.sort(rng.choice(indices, size=size, replace=False))


def too_small(stage_sizes: dict[str, int], size: int) -> tuple[str, int] | None:
    """The first stage (name, sequences) with fewer training sequences than ``size``; None if none."""
    for name, n in stage_sizes.items():
        if n < size:
            return name, n
    return None


def memory_batch(
    pool: int, seed: int, stage_index: int, step: int, rank: int, world: int, batch: int
) -> np.ndarray:
    """Positions in a memory of ``pool`` sequences that ``rank`` trains g_ref on at ``step``.

    One draw of ``batch * world`` positions per step (without replacement while the memory holds
    that many, with replacement otherwise), split in rank order: the ranks' shares are disjoint, and
    together they are the global memory batch whatever the world size.
    """
    if pool < 1:
        raise ValueError("an empty memory")
    total = batch * world
    rng = np.random.default_rng([seed, _SALT, stage_index, step])
    drawn = rng.choice(pool, size=total, replace=total > pool)
    return drawn[rank * batch : (rank + 1) * batch]
