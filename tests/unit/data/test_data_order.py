"""The seeded sample order: world-size independent, reshuffled per epoch by (seed, epoch)."""

from __future__ import annotations

import numpy as np

from raypod.data.order import SampleOrder


def test_same_seed_same_batches_and_every_sample_once_per_epoch():
    a, b = SampleOrder(100, 16, seed=3), SampleOrder(100, 16, seed=3)
    assert a.steps_per_epoch == 6
    for step in range(1, 13):
        assert np.array_equal(a.ids(step), b.ids(step))
    epoch0 = np.concatenate([a.ids(s) for s in range(1, 7)])
    assert len(set(epoch0.tolist())) == 96  # no repeats; the 4 left over are dropped


def test_new_epoch_reshuffles_by_seed_and_epoch():
    o = SampleOrder(100, 16, seed=3)
    assert o.epoch_of(6) == 0 and o.epoch_of(7) == 1
    assert not np.array_equal(o.ids(1), o.ids(7))
    again = SampleOrder(100, 16, seed=3)
    again.ids(7)  # epoch 1 first: the order does not depend on what was asked before
    assert np.array_equal(again.ids(1), o.ids(1)) and np.array_equal(again.ids(7), o.ids(7))
    assert not np.array_equal(SampleOrder(100, 16, seed=4).ids(1), o.ids(1))


def test_rank_shares_partition_the_step_at_any_world_size():
    o = SampleOrder(1000, 16, seed=0)
    ids = o.ids(5)
    for world in (1, 2, 3, 5):
        shares = [SampleOrder.rank_share(ids, r, world) for r in range(world)]
        assert sorted(np.concatenate(shares).tolist()) == sorted(ids.tolist())
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
