"""The step ledger: which steps are in flight, what each rank has acknowledged, which step
counts and which checkpoint may be committed.

A step counts (``done_step`` moves past it) once every rank returned its result and, when
the step's snapshot is replicated, every rank's replica is in place; a checkpoint step is
committed once every rank finished saving it *and* the step itself counted, so a
checkpoint of a step that is then rolled back is never committed. :meth:`StepLedger.reset`
is the one place the per-group bookkeeping starts again (a new or re-formed group, a roll
back).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator

from raypod.protocol import StepResult

STEPS_IN_FLIGHT = 3
"""Steps submitted beyond the last counted one. A snapshot step's replica acknowledgement
rides in the rank's next result, so step ``s`` counts only once step ``s + 1`` returned:
with 3, step ``s + 2`` is already queued then and a rank never idles waiting for the driver
(ranks keep ``raypod.worker.snapshot.KEEP_STEPS`` = 4 snapshots to cover them all)."""


class StepLedger:
    """Per-group step bookkeeping; ``committed_step`` is the job's (it survives resets)."""

    def __init__(self, committed_step: int = 0) -> None:
        self.committed_step = committed_step
        """The newest committed checkpoint step."""
        self.next_step = 1
        """The next step to submit."""
        self.done_step = 0
        """The last step that counted (or was skipped on purpose)."""
        self.rank_step: dict[int, int] = {}
        """Per rank: the last step it returned a result for."""
        self.partial: dict[int, list[StepResult]] = defaultdict(list)
        """Per step: the results that arrived so far."""
        self.save_acks: dict[int, set[int]] = defaultdict(set)
        """Per step: the ranks that finished saving its checkpoint."""
        self.replica_acks: dict[int, set[int]] = defaultdict(set)
        """Per step: the ranks whose snapshot of it reached its replica holder."""
        self.replica_waits: set[int] = set()
        """Steps whose explicit replica wait (the fallback) was submitted to this group."""
        self.last_progress = time.monotonic()
        """When the last result arrived (the hang clock)."""
        self.last_completion = time.time()
        """When the last step counted (step times are measured between completions)."""

    def reset(self, step: int, world_size: int, same_group: bool = False) -> None:
        """Training resumes after ``step`` with ``world_size`` ranks.

        With ``same_group`` (a roll back: the same ranks go back to their own snapshot),
        acknowledgements of steps up to ``step`` stay valid (a save every rank finished
        may still be committed); those of later steps, which are redone, are dropped.
        Otherwise (a new or re-formed group) every acknowledgement is dropped.
        """
        self.next_step, self.done_step = step + 1, step
        self.rank_step = dict.fromkeys(range(world_size), step)
        self.partial.clear()
        self.replica_waits.clear()
        for acks in (self.save_acks, self.replica_acks):
            for s in [s for s in acks if not same_group or s > step]:
                del acks[s]
        self.last_progress = time.monotonic()
        self.last_completion = time.time()

    # ---- submitting ------------------------------------------------------------------
    def has_room(self) -> bool:
        """Whether another step may be queued (at most :data:`STEPS_IN_FLIGHT` ahead)."""
        return self.next_step - self.done_step <= STEPS_IN_FLIGHT

    @property
    def in_flight(self) -> int:
        """Steps submitted that have not counted yet."""
        return max(0, self.next_step - 1 - self.done_step)

    # ---- acknowledgements ------------------------------------------------------------
    def record(self, result: StepResult) -> None:
        """One rank's result of one step."""
        self.partial[result.step].append(result)
        self.rank_step[result.rank] = result.step
        self.last_progress = time.monotonic()
        self.ack_saves(result.rank, result.saved)

    def ack_saves(self, rank: int, steps: list[int]) -> None:
        for s in steps:
            self.save_acks[s].add(rank)

    def ack_replica(self, rank: int, step: int) -> None:
        if step > self.done_step:  # a late acknowledgement of a counted step is not kept
            self.replica_acks[step].add(rank)

    def stalled_s(self) -> float:
        """Seconds since the last result arrived."""
        return time.monotonic() - self.last_progress

    # ---- the commit rule -------------------------------------------------------------
    def ready(self, step: int, world_size: int, replicated: bool) -> bool:
        """Every rank returned ``step`` and, when it is ``replicated``, every replica is in place."""
        if len(self.partial.get(step, ())) != world_size:
            return False
        return not replicated or len(self.replica_acks.get(step, ())) == world_size

    def take(self, step: int) -> list[StepResult]:
        """The results of a ready step, by rank (its acknowledgements are done with)."""
        self.replica_acks.pop(step, None)
        return sorted(self.partial.pop(step), key=lambda r: r.rank)

    def finished_through(self, world_size: int) -> int:
        """The last step every rank finished, counted or not (replicas may still be on their way)."""
        finished = self.done_step
        while len(self.partial.get(finished + 1, ())) == world_size:
            finished += 1
        return finished

    def committable(self, world_size: int) -> Iterator[int]:
        """Checkpoint steps that may be committed now, oldest first: every rank saved them,
        the step counted, and it is newer than the last commit."""
        for s in sorted(self.save_acks):
            if s > self.done_step:
                return
            if len(self.save_acks[s]) == world_size and s > self.committed_step:
                yield s

    def committed(self, step: int) -> None:
        self.committed_step = step
        del self.save_acks[step]
