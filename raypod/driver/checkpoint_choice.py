"""Which committed checkpoint a group restores: the newest whose files match its manifest.

Verification runs here, on the driver, before any rank touches a file; a newer checkpoint
that fails is recorded once as a ``checkpoint_corrupt`` alert naming the file, and an older
one is used instead. Checkpoints exist but none passes: the job refuses to start from
scratch over them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from raypod.callbacks import FailureEvent
from raypod.checkpoint import CheckpointStore, CommittedCheckpoint
from raypod.driver.accounting import JobAccounting

log = logging.getLogger("raypod.driver")


class CheckpointChoice:
    """Chooses (and verifies) the checkpoint each new or rebuilt group restores.

    Args:
        store: the job's checkpoint store.
        acct: the job's accounting (``checkpoint_corrupt`` events).
        fire: calls a callback hook.
    """

    def __init__(self, store: CheckpointStore, acct: JobAccounting, fire: Callable[..., None]) -> None:
        self.store, self.acct, self.fire = store, acct, fire
        self.first: tuple[CommittedCheckpoint | None, list[Any]] | None = None
        """The choice verified at start, used by the first group (one verification per choice)."""
        self._corrupt_seen: set[tuple[int, str]] = set()

    def start(self) -> CommittedCheckpoint | None:
        """Verify at job start; the first group restores this choice."""
        self.first = self.store.latest_verified()
        return self.first[0]

    def latest(self) -> CommittedCheckpoint | None:
        """The newest committed checkpoint a recovery may load (the one place that asks)."""
        return self.choose()[0]

    def choose(self) -> tuple[CommittedCheckpoint | None, str | None]:
        """The newest verified checkpoint (None: start from scratch), or ``(None, why)`` when
        checkpoints exist but none passes."""
        chosen, rejected = self.first or self.store.latest_verified()
        self.first = None
        source = f"checkpoint step {chosen.step}" if chosen else "scratch"
        for bad in rejected:
            if (bad.step, bad.reason) in self._corrupt_seen:
                continue
            self._corrupt_seen.add((bad.step, bad.reason))
            now = self.acct.now()
            ev = FailureEvent(kind="checkpoint_corrupt", step=bad.step, rank=None, detected_s=now,
                              message=f"{bad.reason}; using {source} instead", resumed_s=now,
                              lost_steps=0, restored_from=source,
                              extra={"alert": True, "file": bad.file, "checkpoint": bad.path})
            self.acct.failure(ev)
            log.warning("%s", ev.message)
            self.fire("after_failure", ev)
            self.fire("after_recovery", ev)
        if chosen is None and rejected:
            return None, (f"{rejected[0].reason}, and no older committed checkpoint passes "
                          f"verification: not starting from scratch over them (move {self.store.root} "
                          "aside to start afresh)")
        return chosen, None
