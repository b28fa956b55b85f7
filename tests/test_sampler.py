import numpy as np
import pytest

from cltk.data.sampler import Pool, StageSchedule, split_blocks


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
    return StageSchedule(
        Pool(0, np.arange(n)), [Pool(d, np.arange(m)) for d, m in replay], share, **args
    )


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
    assert s.n_replay == 2 and s.n_new == 6
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
