"""Checkpoint commit, latest, retention; the sample order; the LR schedule."""

from __future__ import annotations

import numpy as np

from raypod.checkpoint import CheckpointStore
from raypod.config import TrainConfig
from raypod.data.order import SampleOrder
from raypod.worker.trainer import lr_at, micro_batches


def _fake_save(store: CheckpointStore, step: int) -> None:
    from pathlib import Path

    p = Path(store.path_for(step))
    p.mkdir(parents=True)
    (p / ".metadata").write_bytes(b"x")


def test_uncommitted_checkpoint_is_never_latest(tmp_path):
    store = CheckpointStore(str(tmp_path / "job"), keep=2)
    assert store.latest() is None
    _fake_save(store, 5)
    assert store.latest() is None  # shards without a manifest do not count
    store.commit(5, world_size=2)
    _fake_save(store, 10)
    assert store.latest().step == 5


def test_retention_keeps_last_k_and_sweeps_dead_saves(tmp_path):
    store = CheckpointStore(str(tmp_path / "job"), keep=2)
    for s in (5, 10):
        _fake_save(store, s)
        store.commit(s, world_size=2)
    _fake_save(store, 12)  # cut short by a failure
    for s in (15, 20):
        _fake_save(store, s)
        store.commit(s, world_size=2)
    assert [c.step for c in store.committed()] == [15, 20]
    assert sorted(p.name for p in (tmp_path / "job" / "checkpoints").iterdir()) == [
        "step_00000015", "step_00000020"]
    assert store.latest().manifest["world_size"] == 2


def test_sample_order_is_seeded_and_world_size_independent():
    a, b = SampleOrder(100, 8, seed=1), SampleOrder(100, 8, seed=1)
    assert np.array_equal(a.ids(3), b.ids(3))
    assert not np.array_equal(a.ids(3), SampleOrder(100, 8, seed=2).ids(3))
    epoch0 = np.concatenate([a.ids(s) for s in range(1, a.steps_per_epoch + 1)])
    assert len(set(epoch0.tolist())) == len(epoch0)  # no repeats within an epoch
    assert not np.array_equal(a.ids(1), a.ids(1 + a.steps_per_epoch))  # reshuffled next epoch
    for world in (1, 2, 3):
        shares = [SampleOrder.rank_share(a.ids(4), r, world) for r in range(world)]
        assert sorted(np.concatenate(shares).tolist()) == sorted(a.ids(4).tolist())


def test_micro_batches_match_across_ranks():
    # 16 samples on 3 ranks: shares 6, 5, 5 -> every rank runs 2 micro-batches of <= 4.
    ids = np.arange(16)
    counts = [len(micro_batches(SampleOrder.rank_share(ids, r, 3), 6, 4)) for r in range(3)]
    assert counts == [2, 2, 2]


def test_lr_schedule_follows_global_step():
    t = TrainConfig(max_steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(5, t) == 0.5
    assert lr_at(10, t) == 1.0
    assert abs(lr_at(100, t) - 0.1) < 1e-9
    assert lr_at(50, t) < lr_at(20, t)
