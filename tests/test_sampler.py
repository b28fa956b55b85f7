import numpy as np
import pytest

from cltk.data.sampler import Mix, Pool, StageSchedule, split_blocks


def test_blocks_are_disjoint_cover_and_reproducible():
    blocks = split_blocks(103, 4, seed=7)
    allidx = np.concatenate(blocks)
    assert sorted(allidx.tolist()) == list(range(103))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    assert all((a == b).all() for a, b in zip(blocks, split_blocks(103, 4, seed=7)))
    assert any((a != b).any() for a, b in zip(blocks, split_blocks(103, 4, seed=8)))
    with pytest.raises(ValueError, match="blocks.k"):
        split_blocks(3, 4, 0)


def sched(n=40, share=0.0, replay=(), **kw):
    args = dict(global_batch=8, epochs=1.0, max_steps=None, seed=1, stage=0)
    args.update(kw)
    mixes = [Mix("replay", [Pool(d, np.arange(m)) for d, m in replay], share)] if replay else []
    return StageSchedule(Pool(0, np.arange(n)), mixes, **args)


def test_ranks_get_disjoint_slices_covering_the_global_batch():
    s = sched(n=64, global_batch=8)
    for step in range(len(s)):
        per_rank = [s.micro_batches(step, r, 2, 2) for r in range(2)]
        flat = [x for mbs in per_rank for mb in mbs for x in mb]
        assert sorted(flat) == sorted(s.global_step(step))
        assert len(set(flat)) == 8


def test_one_epoch_visits_every_sequence_once_and_order_is_seeded():
    s = sched(n=40, global_batch=8)
    seen = [i for step in range(len(s)) for _, i in s.global_step(step)]
    assert sorted(seen) == list(range(40))
    assert seen != list(range(40))
    assert seen == [i for step in range(5) for _, i in sched(n=40).global_step(step)]
    assert seen != [i for step in range(5) for _, i in sched(n=40, seed=2).global_step(step)]


def test_steps_epochs_and_cap():
    assert len(sched(n=40, epochs=2.0)) == 10
    assert len(sched(n=40, max_steps=3)) == 3
    two = sched(n=40, epochs=2.0)
    ids = [i for st in range(10) for _, i in two.global_step(st)]
    assert sorted(ids) == sorted(list(range(40)) * 2)


def test_replay_share_mixes_old_domains_per_batch():
    s = sched(n=40, share=0.25, replay=[(1, 30), (2, 30)], global_batch=8)
    assert s.n_mixed == 2 and s.n_new == 6
    olds = [d for st in range(len(s)) for d, _ in s.global_step(st) if d != 0]
    assert len(olds) == 2 * (len(s) - 1) + 1  # the short last step replays in proportion
    assert {1, 2} == set(olds)
    assert len(s) == 7  # ceil(40 / 6): the 4 left over train in a shorter last step
    last = s.global_step(6)
    assert sum(d == 0 for d, _ in last) == 4 and sum(d != 0 for d, _ in last) == 1
    assert sorted(i for st in range(7) for d, i in s.global_step(st) if d == 0) == list(range(40))


@pytest.mark.parametrize(
    "n, batch, epochs, world, micro",
    [(21, 4, 1.0, 2, 1), (3, 8, 1.0, 2, 2), (13, 8, 2.0, 2, 2), (13, 8, 1.0, 1, 4), (29, 6, 1.0, 3, 1)],
)
def test_every_sequence_trains_exactly_once_per_epoch_whatever_the_batch(
    n, batch, epochs, world, micro
):
    s = sched(n=n, global_batch=batch, epochs=epochs)
    per_rank = [
        [x for st in range(len(s)) for mb in s.micro_batches(st, r, world, micro) for x in mb]
        for r in range(world)
    ]
    trained = sorted(i for ids in per_rank for _, i in ids)
    assert trained == sorted(list(range(n)) * int(epochs))  # no tail dropped, nothing repeated
    for st in range(len(s)):
        step = s.global_step(st)
        if epochs == 1:  # a block smaller than the batch is not repeated within a step
            assert len(set(step)) == len(step)
        assert len(step) == (batch if st < len(s) - 1 else s.step_size(st))
        mbs = [s.micro_batches(st, r, world, micro) for r in range(world)]
        assert all(len(m) == batch // (world * micro) for m in mbs)  # same accumulation everywhere
        flat = [x for m in mbs for mb in m for x in mb]
        assert sorted(flat) == sorted(step) and all(len(mb) <= micro for m in mbs for mb in m)


def test_a_mixture_draws_each_part_in_proportion_every_step():
    from cltk.data.sampler import mixture_pool

    a, b = np.arange(0, 50), np.arange(50, 450)  # rows of part A (small, upsampled) and part B
    pool = mixture_pool(0, np.arange(450), [(0, 50), (50, 450)], [0.7, 0.3])
    s = StageSchedule(pool, [Mix("r", [Pool(1, np.arange(30))], 0.2)], 10, 1.0, 12, seed=3, stage=1)
    assert len(s) == 12
    steps = [s.global_step(t) for t in range(len(s))]
    for items in steps:
        new = [i for d, i in items if d == 0]
        # 8 new sequences a step (2 replayed): round(0.7 x 8) = 6 from A, 2 from B, every step
        assert sum(i < 50 for i in new) == 6 and sum(i >= 50 for i in new) == 2
        assert sum(d == 1 for d, _ in items) == 2
    # each part walks its own seeded epochs: A's first 50 draws are A once each
    a_draws = [i for items in steps for d, i in items if d == 0 and i < 50]
    assert sorted(a_draws[:48]) == sorted(set(a_draws[:48])) and set(a_draws) <= set(a.tolist())
    # the order is a function of the step alone (resume), and ranks get disjoint slices
    again = StageSchedule(pool, [Mix("r", [Pool(1, np.arange(30))], 0.2)], 10, 1.0, 12, seed=3, stage=1)
    assert [again.global_step(t) for t in reversed(range(12))][::-1] == steps
    per_rank = [again.micro_batches(5, r, 2, 5) for r in range(2)]
    assert sorted(x for mbs in per_rank for mb in mbs for x in mb) == sorted(steps[5])
    # a single part (or a block holding one part only) is a plain pool
    assert mixture_pool(0, b, [(0, 50), (50, 450)], [0.7, 0.3]).parts == ()


def _counts(items, ids):
    return [sum(d in ids for d, _ in items) for ids in ids]


def test_several_mixes_each_take_their_own_share_drawn_independently():
    old, web, memory = Mix("old", [Pool(1, np.arange(30)), Pool(2, np.arange(10))], 0.2), Mix(
        "web", [Pool(3, np.arange(50))], 0.1), Mix("memory", [Pool(4, np.arange(5))], 0.3)
    s = StageSchedule(Pool(0, np.arange(40)), [old, web, memory], 10, 1.0, None, seed=5, stage=2)
    assert s.n_mix == [2, 1, 3] and s.n_new == 4 and len(s) == 10  # 40 own sequences, 4 a step
    steps = [s.global_step(t) for t in range(len(s))]
    for items in steps:
        assert len(items) == 10 and _counts(items, [{0}, {1, 2}, {3}, {4}]) == [4, 2, 1, 3]
    # the order is a function of the step alone: built afresh and read backwards (a resume) it agrees
    again = StageSchedule(Pool(0, np.arange(40)), [old, web, memory], 10, 1.0, None, seed=5, stage=2)
    assert [again.global_step(t) for t in reversed(range(10))][::-1] == steps
    # independent draws: the first mix's rows of every step are the same without the other mixes,
    # though the stage's own share of each step differs (8 instead of 4)
    alone = StageSchedule(Pool(0, np.arange(40)), [old], 10, 1.0, None, seed=5, stage=2)
    assert len(alone) == 5
    for t in range(4):  # (the last of its 5 steps is a short one)
        mine = sorted(x for x in steps[t] if x[0] in (1, 2))
        assert mine == sorted(x for x in alone.global_step(t) if x[0] in (1, 2))
    # another stage or seed draws otherwise
    other = StageSchedule(Pool(0, np.arange(40)), [old, web, memory], 10, 1.0, None, seed=5, stage=3)
    assert [other.global_step(t) for t in range(10)] != steps
    # over many steps a mix draws its pools' sequences uniformly: pool 1 holds 3/4 of "old"
    long = StageSchedule(Pool(0, np.arange(4200)), [old, web], 10, 1.0, None, seed=5, stage=2)
    drawn = [d for t in range(len(long)) for d, _ in long.global_step(t) if d in (1, 2)]
    assert len(drawn) == 2 * len(long) and abs(drawn.count(1) / len(drawn) - 0.75) < 0.03


def test_a_short_last_step_scales_every_mix_and_an_empty_mix_is_dropped():
    mixes = [Mix("a", [Pool(1, np.arange(30))], 0.2), Mix("b", [Pool(2, np.arange(30))], 0.1),
             Mix("empty", [Pool(3, np.arange(0))], 0.3), Mix("off", [Pool(4, np.arange(9))], 0.0)]
    s = StageSchedule(Pool(0, np.arange(40)), mixes, 10, 1.0, None, seed=1, stage=1)
    assert [m.name for m in s.mixes] == ["a", "b"] and s.n_new == 7 and len(s) == 6
    assert s.new_in_step(5) == 5  # 40 - 5 x 7
    # round(2 x 5/7) = 1 and round(1 x 5/7) = 1: each scaled on its own, never below one
    assert s.mix_in_step(5) == [1, 1] and s.mix_in_step(0) == [2, 1]
    assert _counts(s.global_step(5), [{0}, {1}, {2}]) == [5, 1, 1] and s.step_size(5) == 7
    assert sorted(i for t in range(6) for d, i in s.global_step(t) if d == 0) == list(range(40))


def test_shares_that_leave_no_room_are_refused_naming_the_mixes():
    from cltk.errors import UserError

    mixes = [Mix("earlier", [Pool(1, np.arange(9))], 0.3), Mix("general", [Pool(2, np.arange(9))], 0.3)]
    with pytest.raises(UserError, match=r"earlier 0.3 \(1\), general 0.3 \(1\).*batch of 2"):
        StageSchedule(Pool(0, np.arange(40)), mixes, 2, 1.0, None, seed=1, stage=1)


def test_pools_with_their_own_rows_and_the_trained_sequences_of_a_stage():
    rows = np.arange(5 * 3).reshape(5, 3)
    memory = Mix("memory", [Pool(7, np.arange(5), rows=rows)], 0.25)
    s = StageSchedule(Pool(0, np.arange(20)), [memory], 4, 1.0, 4, seed=1, stage=1)
    assert s.rows(7) is rows and s.rows(0) is None
    assert {i for t in range(len(s)) for d, i in s.global_step(t) if d == 7} <= set(range(5))
    # max_steps cuts the stage to 4 steps of 3 own sequences: 12 distinct ones, step by step
    trained = s.trained_new()
    for t in range(4):
        assert sorted(trained[3 * t : 3 * t + 3]) == sorted(x for x in s.global_step(t) if x[0] == 0)
    assert len(trained) == len(set(trained)) == 12
    two = StageSchedule(Pool(0, np.arange(6)), [], 4, 2.0, None, seed=1, stage=1)
    assert sorted(two.trained_new()) == [(0, i) for i in range(6)]  # each once, over two epochs
    clash = [memory, Mix("other", [Pool(7, np.arange(5), rows=rows.copy())], 0.25)]
    with pytest.raises(ValueError, match="share the id 7"):
        StageSchedule(Pool(0, np.arange(20)), clash, 8, 1.0, None, seed=1, stage=1)
