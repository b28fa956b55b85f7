"""EWC's per-sample Fisher: which sequences it draws (a pure function of seed and stage)."""

from __future__ import annotations

from cltk.methods.ewc.sample_fisher import pick_sequences


def test_the_sequences_are_a_seeded_subset_in_order():
    items = [(0, i) for i in range(100)]
    a = pick_sequences(items, 10, seed=7, stage_index=1)
    assert a == pick_sequences(items, 10, seed=7, stage_index=1)  # a redone stage end draws the same
    assert len(set(a)) == 10 and set(a) <= set(items) and a == sorted(a)
    assert a != pick_sequences(items, 10, seed=7, stage_index=2)
    assert a != pick_sequences(items, 10, seed=8, stage_index=1)
    assert pick_sequences(items[:5], 10, seed=7, stage_index=1) == items[:5]  # all, when fewer
