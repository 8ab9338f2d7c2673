"""A rank's ``reload`` in place, on an actor that is not warm yet (a new actor in a lost
rank's slot, no spare left): its trainer exists only once the rejoin has warmed it."""

from __future__ import annotations

import types

from raypod.worker.actor import TrainWorker


def test_starting_afresh_in_place_works_on_an_actor_without_a_trainer_yet(monkeypatch):
    worker = TrainWorker(num_threads=1)
    assert worker.trainer is None
    restored = []
    trainer = types.SimpleNamespace(restore_initial=lambda: restored.append("initial") or 0)

    def rejoin(self, spec, restore, initialize=False):
        self.trainer = trainer  # what warm() does first
        return {"received": restore(), "initialize": initialize}

    monkeypatch.setattr(TrainWorker, "_rejoin", rejoin)
    assert worker.reload(spec=None, path=None, step=0) == {"received": 0, "initialize": True}
    assert restored == ["initial"]
