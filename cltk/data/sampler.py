"""Which sequences each rank trains at each step: seeded, disjoint across ranks, resumable by step number.

The order of a stage is a pure function of (seed, stage index, step), so resuming needs only the number of
optimizer steps already taken, and every rank computes the same global batch and takes its own disjoint
slice of it. Mixes (replay of earlier stages, general data) each take their share of every global batch,
drawn independently of one another, seeded by (seed, stage, step, mix). Every sequence of a stage is
trained exactly once per epoch: when the stage's size is not a multiple of the global batch, its last step is
shorter (its micro-batches are padded with ignored rows), rather than dropping the tail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from cltk.data.windows import apportion
from cltk.errors import UserError


def split_blocks(n: int, k: int, seed: int) -> list[np.ndarray]:
    """Split ``range(n)`` into ``k`` disjoint, seeded random blocks of near-equal size (sorted inside).

    Raises:
        ValueError: if there are fewer sequences than blocks.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1 block, got {k}")
    if n < k:
        raise UserError(
            f"cannot split {n} training sequences into {k} blocks: lower blocks.k or add data"
        )
    perm = np.random.default_rng([seed, 0xB10C]).permutation(n)
    return [np.sort(b) for b in np.array_split(perm, k)]


@dataclass(frozen=True, eq=False)
class Pool:
    """Training sequences of one source that a stage may draw: ``indices`` into that source's rows.

    ``domain`` is the source's id: a configured domain's index, then the extra sources the methods
    declare (``StageContext.sources`` names them in id order). A pool of rows that no prepared source
    holds (a reservoir kept on disk) brings them in ``rows`` (``rows[i]["input_ids"]``, e.g. a
    :class:`~cltk.data.windows.TokenWindows`) under an id outside the prepared sources.

    A domain that mixes sources has ``parts`` (the indices of each source, together ``indices``) and
    ``weights``: every step then draws each part's share of its new sequences (see ``mixture_pool``).
    """

    domain: int
    indices: np.ndarray
    parts: tuple[np.ndarray, ...] = ()
    weights: tuple[float, ...] = ()
    rows: Any = None


@dataclass
class Mix:
    """Sequences mixed into every step of a stage: ``share`` of each global batch drawn from
    ``pools``, uniformly over all their sequences. ``name`` labels it in errors and logs.

    ``pools`` may be a callable returning them, called only when the stage runs (a reservoir the
    stage before writes): the steps of stages planned ahead count such a mix as drawing.
    """

    name: str
    pools: list[Pool] | Callable[[], list[Pool]]
    share: float

    def built(self) -> Mix:
        """This mix with its pools at hand."""
        return Mix(self.name, self.pools() if callable(self.pools) else self.pools, self.share)

    def draws(self) -> bool:
        """It takes sequences: a positive share, and pools not all empty (or not built yet)."""
        return self.share > 0 and (callable(self.pools) or any(len(p.indices) for p in self.pools))


def step_shape(
    new: int, mixes: list[Mix], global_batch: int, epochs: float, max_steps: int | None, stage: int
) -> tuple[list[int], int, int, int]:
    """How a stage of ``new`` own sequences and ``mixes`` (only those that draw) splits into steps:
    ``(mixed per full step of each mix, own per full step, own sequences in all, steps)``.

    Raises:
        UserError: the mixes leave no room for the stage's own sequences in a step.
    """
    # a positive share never silently rounds to nothing
    n_mix = [max(1, int(round(m.share * global_batch))) for m in mixes]
    n_new = global_batch - sum(n_mix)
    if n_new <= 0:
        shares = ", ".join(f"{m.name} {m.share:g} ({n})" for m, n in zip(mixes, n_mix))
        raise UserError(
            f"stage {stage}: the mixed shares ({shares}) leave no room for new data in a batch "
            f"of {global_batch} sequences; lower them or raise the global batch"
        )
    # every sequence of the stage is trained exactly once per epoch: the last step takes what is left
    # (a shorter step) instead of dropping the tail or repeating sequences within a step
    new_total = max(1, int(math.floor(epochs * new + 1e-9)))
    steps = math.ceil(new_total / n_new)
    return n_mix, n_new, new_total, max(1, steps if max_steps is None else min(steps, max_steps))


def count_steps(
    new: int, mixes: list[Mix], global_batch: int, epochs: float, max_steps: int | None, stage: int
) -> int:
    """The optimizer steps of a stage, without building its schedule (a stage planned ahead)."""
    return step_shape(new, [m for m in mixes if m.draws()], global_batch, epochs, max_steps,
                      stage)[3]


def mixture_pool(
    domain: int, indices: np.ndarray, sources: list[tuple[int, int]], weights: list[float]
) -> Pool:
    """``Pool(domain, indices)`` split by the row ranges ``sources`` of a mixture's parts (one range:
    a plain pool). Parts with no sequence in ``indices`` or a zero weight are left out."""
    parts = [(indices[(indices >= a) & (indices < b)], w) for (a, b), w in zip(sources, weights)]
    parts = [(p, w) for p, w in parts if len(p) and w > 0]
    if len(parts) < 2:
        return Pool(domain, indices)
    return Pool(domain, indices, tuple(p for p, _ in parts), tuple(w for _, w in parts))


class StageSchedule:
    """Deterministic global batches of one stage.

    Args:
        new: the stage's own training sequences.
        mixes: sequences mixed into every step (e.g. replay): each mix takes ``round(share x
            global_batch)`` sequences of every full step (at least one when its share is positive
            and its pools are not empty), drawn from its pools independently of the other mixes.
        global_batch: sequences per optimizer step over all ranks.
        epochs: passes over ``new`` (may be fractional).
        max_steps: optional cap on the number of optimizer steps.
        seed, stage: fix the order.

    Raises:
        UserError: the mixes leave no room for the stage's own sequences in a step.
    """

    def __init__(
        self,
        new: Pool,
        mixes: list[Mix],
        global_batch: int,
        epochs: float,
        max_steps: int | None,
        seed: int,
        stage: int,
    ):
        if len(new.indices) == 0:
            raise ValueError(f"stage {stage} has no training sequences")
        self.new, self.seed, self.stage = new, seed, stage
        self.global_batch = global_batch
        # mixes with nothing to draw are dropped; each keeps its own count per full step
        self.mixes = [
            Mix(m.name, [p for p in m.pools if len(p.indices)], m.share)
            for m in (mix.built() for mix in mixes)
        ]
        self.mixes = [m for m in self.mixes if m.draws()]
        self.n_mix, self.n_new, self.new_total, self.steps = step_shape(
            len(new.indices), self.mixes, global_batch, epochs, max_steps, stage
        )
        self._epoch_cache: dict[int, np.ndarray] = {}
        self._part_orders: dict[int, tuple[int, np.ndarray]] = {}
        self._flat = [
            np.concatenate(
                [np.stack([np.full(len(p.indices), p.domain), p.indices], 1) for p in m.pools]
            )
            for m in self.mixes
        ]
        self._rows: dict[int, Any] = {}
        for m in self.mixes:
            for p in m.pools:
                if p.rows is not None:
                    if self._rows.get(p.domain, p.rows) is not p.rows:
                        raise ValueError(f"two pools with their own rows share the id {p.domain}")
                    self._rows[p.domain] = p.rows

    @property
    def n_mixed(self) -> int:
        """Mixed sequences of a full step, all mixes together."""
        return sum(self.n_mix)

    def __len__(self) -> int:
        return self.steps

    def rows(self, source: int) -> Any:
        """The rows a pool brought for source id ``source`` (None: a prepared source's)."""
        return self._rows.get(source)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch not in self._epoch_cache:
            rng = np.random.default_rng([self.seed, self.stage, epoch])
            self._epoch_cache = {epoch: self.new.indices[rng.permutation(len(self.new.indices))]}
        return self._epoch_cache[epoch]

    def new_in_step(self, step: int) -> int:
        """How many of the stage's own sequences step ``step`` trains (fewer in a short last step)."""
        return min(self.n_new, self.new_total - step * self.n_new)

    def mix_in_step(self, step: int) -> list[int]:
        """Sequences of each mix in step ``step``: its full count, scaled down with a short last step."""
        new = self.new_in_step(step)
        if new == self.n_new:
            return list(self.n_mix)
        return [max(1, round(n * new / self.n_new)) for n in self.n_mix]

    def mixed_in_step(self, step: int) -> int:
        """Mixed sequences of step ``step``, all mixes together."""
        return sum(self.mix_in_step(step))

    def step_size(self, step: int) -> int:
        """Sequences of step ``step`` over all ranks: ``global_batch``, or fewer in a short last step."""
        return self.new_in_step(step) + self.mixed_in_step(step)

    def new_items(self, step: int) -> list[tuple[int, int]]:
        """The stage's own ``(domain, sequence index)`` pairs of step ``step`` (before shuffling in
        the mixes)."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} outside stage of {self.steps} steps")
        if self.new.parts:
            return self._mixed(step)
        n = len(self.new.indices)
        out = []
        start = step * self.n_new
        for pos in range(start, start + self.new_in_step(step)):
            epoch, i = divmod(pos, n)
            out.append((self.new.domain, int(self._epoch_order(epoch)[i])))
        return out

    def trained_new(self) -> list[tuple[int, int]]:
        """Every distinct sequence of the stage's own that its steps train, in the order first
        trained (fewer than the pool when ``max_steps`` cuts the stage short)."""
        seen: dict[tuple[int, int], None] = {}
        for step in range(self.steps):
            seen.update(dict.fromkeys(self.new_items(step)))
        return list(seen)

    def global_step(self, step: int) -> list[tuple[int, int]]:
        """The ``(source, sequence index)`` pairs of optimizer step ``step``, in a fixed order."""
        out = self.new_items(step)
        counts = self.mix_in_step(step)
        for k, (flat, n) in enumerate(zip(self._flat, counts)):
            # each mix its own seeded draw (the first keeps the seed of the single mix of old)
            rng = np.random.default_rng([self.seed, self.stage, step, 0x5E91] + ([k] if k else []))
            pick = rng.choice(len(flat), size=n, replace=len(flat) < n)
            out += [(int(d), int(i)) for d, i in flat[pick]]
        if self.mixes:
            # interleave so mixed rows spread over micro-batches and ranks, not all on the last one
            perm = np.random.default_rng([self.seed, self.stage, step, 7]).permutation(len(out))
            out = [out[j] for j in perm]
        return out

    def _mixed(self, step: int) -> list[tuple[int, int]]:
        """A mixture's new sequences of ``step``: each part's share (``apportion`` of the step's count by
        weight), each part walking its own seeded epochs; shuffled so parts spread over ranks."""
        full = apportion(self.new.weights, self.n_new)
        counts = apportion(self.new.weights, self.new_in_step(step))
        out = []
        for j, (part, k) in enumerate(zip(self.new.parts, counts)):
            for pos in range(step * full[j], step * full[j] + k):
                epoch, i = divmod(pos, len(part))
                if self._part_orders.get(j, (None,))[0] != epoch:  # keep one epoch's order per part
                    rng = np.random.default_rng([self.seed, self.stage, epoch, j + 1])
                    self._part_orders[j] = (epoch, rng.permutation(len(part)))
                out.append((self.new.domain, int(part[self._part_orders[j][1][i]])))
        perm = np.random.default_rng([self.seed, self.stage, step, 11]).permutation(len(out))
        return [out[i] for i in perm]

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
