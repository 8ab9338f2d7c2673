"""The driver's side of step windows (``train.step_window``; the ranks' side:
:mod:`raypod.worker.grants`).

A window is one ``train_window`` call per rank; within it the driver grants each step once,
for all ranks, by writing the step's key to the job's store (which lives in the driver's
process, :mod:`raypod.worker.rendezvous`): a few microseconds, where a call per rank and step
costs the driver about half a millisecond each and makes each rank wait for its next call to
be dispatched. The driver still grants no step more than
:data:`raypod.driver.ledger.STEPS_IN_FLIGHT` beyond the last counted one, so everything the
ledger guarantees (snapshots kept, a roll back's step in memory) holds as with one call per
step. A window ends where the driver needs the ranks for another call (a save, a drain, a
regroup, the end of the job): :meth:`StepWindows.end` writes the end marker after the last
step granted, and each rank's call returns once it has trained that far.
"""

from __future__ import annotations

import uuid

from raypod.driver.ledger import STEPS_IN_FLIGHT
from raypod.worker.grants import END, step_key
from raypod.worker.rendezvous import RendezvousStore

KEEP_KEYS = 2 * STEPS_IN_FLIGHT + 2
"""Grants kept in the store behind the newest one: when step ``s`` is granted every rank has
returned step ``s - STEPS_IN_FLIGHT`` (so has read its grant), and the grant of
``s - KEEP_KEYS`` is deleted: a window's keys stay few however long it runs."""


class StepWindows:
    """Which window is open, and the last step granted in it."""

    def __init__(self, store: RendezvousStore) -> None:
        self.store = store
        self.key: str | None = None
        """The open window's key prefix (``None``: no window open)."""
        self.first = self.granted = 0

    def start(self, first: int) -> str:
        """Open a window whose first step is ``first``; its key prefix."""
        self.key = f"raypod/grant/{uuid.uuid4().hex[:12]}"
        self.first, self.granted = first, first - 1
        return self.key

    def grant(self, step: int, snapshot: bool) -> None:
        """Let every rank run ``step`` (the next one), snapshotting it when ``snapshot``."""
        assert self.key is not None and step == self.granted + 1, (self.key, step, self.granted)
        self.store.set(step_key(self.key, step), b"1" if snapshot else b"0")
        self.granted = step
        if step - KEEP_KEYS >= self.first:
            self.store.delete(step_key(self.key, step - KEEP_KEYS))

    def end(self) -> None:
        """End the open window after the last step granted (nothing when none is open)."""
        if self.key is not None:
            self.store.set(step_key(self.key, self.granted + 1), END)
            self.key = None
