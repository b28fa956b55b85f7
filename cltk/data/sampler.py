"""Which sequences each rank trains at each step: seeded, disjoint across ranks, resumable by step number.

The order of a stage is a pure function of (seed, stage index, step), so resuming needs only the number of
optimizer steps already taken, and every rank computes the same global batch and takes its own disjoint
slice of it. Replay mixes a share of each global batch from earlier domains' training data. Every sequence of a stage is
trained exactly once per epoch: when the stage's size is not a multiple of the global batch, its last step is
shorter (its micro-batches are padded with ignored rows), rather than dropping the tail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cltk.errors import UserError


def split_blocks(n: int, k: int, seed: int) -> list[np.ndarray]:
    """Split ``range(n)`` into ``k`` disjoint, seeded random blocks of near-equal size (sorted inside).

    Raises:
        ValueError: if there are fewer sequences than blocks.
    """
    if k < 1:
        raise ValueError(f"blocks.k must be >= 1, got {k}")
    if n < k:
        raise UserError(
            f"cannot split {n} training sequences into {k} blocks: lower blocks.k or add data"
        )
    perm = np.random.default_rng([seed, 0xB10C]).permutation(n)
    return [np.sort(b) for b in np.array_split(perm, k)]


@dataclass(frozen=True)
class Pool:
    """Training sequences of one domain that a stage may draw: ``indices`` into that domain's train set."""

    domain: int
    indices: np.ndarray


class StageSchedule:
    """Deterministic global batches of one stage.

    Args:
        new: the stage's own training sequences.
        replay: pools of earlier domains to draw replay sequences from.
        replay_share: share r of every global batch drawn from ``replay`` (0 = none).
        global_batch: sequences per optimizer step over all ranks.
        epochs: passes over ``new`` (may be fractional).
        max_steps: optional cap on the number of optimizer steps.
        seed, stage: fix the order.
    """

    def __init__(
        self,
        new: Pool,
        replay: list[Pool],
        replay_share: float,
        global_batch: int,
        epochs: float,
        max_steps: int | None,
        seed: int,
        stage: int,
    ):
        if len(new.indices) == 0:
            raise ValueError(f"stage {stage} has no training sequences")
        self.new, self.replay, self.seed, self.stage = (
            new,
            [p for p in replay if len(p.indices)],
            seed,
            stage,
        )
        self.global_batch = global_batch
        self.n_replay = int(round(replay_share * global_batch)) if self.replay else 0
        if replay_share > 0 and self.replay and self.n_replay == 0:
            self.n_replay = 1  # a positive share never silently rounds to no replay at all
        self.n_new = global_batch - self.n_replay
        if self.n_new <= 0:
            raise UserError(
                f"replay.share leaves no room for new data in a batch of {global_batch}"
            )
        # every sequence of the stage is trained exactly once per epoch: the last step takes what is left
        # (a shorter step) instead of dropping the tail or repeating sequences within a step
        self.new_total = max(1, int(math.floor(epochs * len(new.indices) + 1e-9)))
        steps = math.ceil(self.new_total / self.n_new)
        self.steps = max(1, steps if max_steps is None else min(steps, max_steps))
        self._epoch_cache: dict[int, np.ndarray] = {}
        self._replay_flat = (
            np.concatenate(
                [np.stack([np.full(len(p.indices), p.domain), p.indices], 1) for p in self.replay]
            )
            if self.replay
            else np.zeros((0, 2), dtype=np.int64)
        )

    def __len__(self) -> int:
        return self.steps

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._epoch_cache:
            rng = np.random.default_rng([self.seed, self.stage, epoch])
            self._epoch_cache = {epoch: self.new.indices[rng.permutation(len(self.new.indices))]}
        return self._epoch_cache[epoch]

    def new_in_step(self, step: int) -> int:
        """How many of the stage's own sequences step ``step`` trains (fewer in a short last step)."""
        return min(self.n_new, self.new_total - step * self.n_new)

    def replay_in_step(self, step: int) -> int:
        """Replay sequences of step ``step``: ``n_replay``, scaled down with a short last step."""
        if not self.n_replay:
            return 0
        new = self.new_in_step(step)
        return self.n_replay if new == self.n_new else max(1, round(self.n_replay * new / self.n_new))

    def step_size(self, step: int) -> int:
        """Sequences of step ``step`` over all ranks: ``global_batch``, or fewer in a short last step."""
        return self.new_in_step(step) + self.replay_in_step(step)

    def global_step(self, step: int) -> list[tuple[int, int]]:
        """The ``(domain, sequence index)`` pairs of optimizer step ``step``, in a fixed order."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} outside stage of {self.steps} steps")
        n = len(self.new.indices)
        out = []
        start = step * self.n_new
        for pos in range(start, start + self.new_in_step(step)):
            epoch, i = divmod(pos, n)
            out.append((self.new.domain, int(self._epoch_order(epoch)[i])))
        n_replay = self.replay_in_step(step)
        if n_replay:
            rng = np.random.default_rng([self.seed, self.stage, step, 0x5E91])
            pick = rng.choice(
                len(self._replay_flat),
                size=n_replay,
                replace=len(self._replay_flat) < n_replay,
            )
            out += [(int(d), int(i)) for d, i in self._replay_flat[pick]]
            # interleave so replay is spread over micro-batches and ranks, not all on the last one
            out = [
                out[j]
                for j in np.random.default_rng([self.seed, self.stage, step, 7]).permutation(
                    len(out)
                )
            ]
        return out

    def micro_batches(
        self, step: int, rank: int, world_size: int, micro_batch: int
    ) -> list[list[tuple[int, int]]]:
        """This rank's micro-batches of step ``step``: disjoint from every other rank's.

        A full step gives every micro-batch ``micro_batch`` items. A short last step spreads its items
        as evenly as possible over the ranks' micro-batches, so some hold fewer items, or none: the
        trainer pads them to full size with rows whose loss is ignored (see :func:`cltk.engine.train_step`).
        """
        items = self.global_step(step)
        accum = self.global_batch // (world_size * micro_batch)
        if accum * world_size * micro_batch != self.global_batch:
            raise ValueError(
                f"global batch {self.global_batch} != micro batch {micro_batch} x world size {world_size} x "
                "accumulation"
            )
        if len(items) == self.global_batch:
            bounds = [(s * micro_batch, (s + 1) * micro_batch) for s in range(accum * world_size)]
        else:
            cuts = np.cumsum([0] + [len(p) for p in np.array_split(items, accum * world_size)])
            bounds = list(zip(cuts[:-1].tolist(), cuts[1:].tolist()))
        return [items[slice(*bounds[a * world_size + rank])] for a in range(accum)]
