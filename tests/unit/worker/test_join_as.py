"""A regroup's call relayed by a node agent (``TrainWorker.join_as``): the spec every rank
shares becomes this rank's, and a regroup's call that reaches a rank twice (through its agent
and directly) is answered once."""

from __future__ import annotations

import types

import pytest

from raypod.protocol import GroupSpec
from raypod.worker.actor import TrainWorker


def _shared() -> GroupSpec:
    return GroupSpec(config=types.SimpleNamespace(name="cfg"), recipe=types.SimpleNamespace(name="recipe"),
                     rank=0, world_size=4, init_method="tcp://10.0.0.1:29500/abc", injections=[(0, "f")],
                     attempt=3)


def test_join_as_makes_the_shared_spec_this_rank_s_and_runs_the_regroup_call(monkeypatch):
    worker = TrainWorker(num_threads=1)
    seen = []
    monkeypatch.setattr(TrainWorker, "reconfigure",
                        lambda self, spec, step, moves: seen.append((spec, step, moves)) or {"rank": spec.rank})
    shared = _shared()
    assert worker.join_as("reconfigure", shared, 2, (3, 1), 3, 7, [(3, 2, 2)]) == {"rank": 2}
    (spec, step, moves), = seen
    assert (spec.rank, spec.peers, spec.link_first, step, moves) == (2, (3, 1), 3, 7, [(3, 2, 2)])
    # Everything else is the shared spec's, which is left as it was.
    assert (spec.world_size, spec.init_method, spec.attempt, spec.injections) == (4, shared.init_method, 3, [(0, "f")])
    assert spec.config is shared.config and shared.rank == 0 and shared.peers == (None, None)


def test_join_as_runs_only_the_regroup_calls():
    worker = TrainWorker(num_threads=1)
    with pytest.raises(ValueError, match="'close' is not a regroup call"):
        worker.join_as("close", _shared(), 1, (2, 0), None)


def test_a_regroup_s_call_that_arrives_twice_is_answered_once(monkeypatch):
    worker = TrainWorker(num_threads=1)
    warmed = []
    monkeypatch.setattr(TrainWorker, "warm", lambda self, config, recipe: warmed.append(config))
    worker.trainer = types.SimpleNamespace(leave=lambda: None, join_phases={"rendezvous": 0.1})
    monkeypatch.setattr(TrainWorker, "_join", lambda self, spec, initialize=True: None)
    spec = _shared()
    first = worker._rejoin(spec, lambda: 123)
    assert first["received_bytes"] == 123 and len(warmed) == 1
    assert worker._rejoin(spec, lambda: 456) is first  # the same regroup again: not joined twice
    assert len(warmed) == 1
    other = GroupSpec(**{**spec.__dict__, "init_method": "tcp://10.0.0.1:29500/def"})
    assert worker._rejoin(other, lambda: 789)["received_bytes"] == 789  # the next regroup joins
    assert len(warmed) == 2
