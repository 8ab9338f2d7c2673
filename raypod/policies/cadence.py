"""Which steps take an in-memory snapshot (``checkpoint.memory_every_steps``).

A snapshot after every step makes a lost rank cost at most the step it was in, but
its price depends on the machine: on a GPU the copy to host runs on a copy engine
beside the next step's compute and costs next to nothing; on a CPU node whose cores
all train, copying the shard and sending it to the peer takes those same cores.
``memory_every_steps: auto`` (the default) snapshots every step while that costs at
most ``checkpoint.memory_stall_budget`` of the step time, and otherwise every ``k``
steps with the smallest ``k`` that keeps the amortised cost within the budget (at most
``checkpoint.memory_max_every``). A lost rank then replays at most ``k`` steps.

Failures make snapshots worth more: once the job has seen some, ``auto`` also bounds
the interval by Young's optimum, ``sqrt(2 x cost x MTBF)`` of training time, with the
MTBF measured over the job so far. That is the interval that loses the least time to
snapshots and replays together, so a job that keeps failing snapshots more often than
the budget alone would allow (a chaos run, a flaky node), and one that never fails
stays within the budget.

A group that was just re-formed (a recovery, a resize) holds no replicas: they are keyed
by the old group's ranks. So its first step always snapshots, whatever the interval, and
a second failure soon after the first still finds every rank's state in memory.

The cost of a snapshot is what the ranks report for it: the time the step spent
taking it (``snapshot_s``), waiting for the previous exchange (``replica_wait_s``),
the GPU's wait for its copy to host before the next update (``snapshot_stall_s``),
and, on CPU ranks, the exchange itself (``exchange_s``, run beside the next step on
the same cores). The step time is the median of the ranks' ``compute_s``. The driver
decides for each step when it submits it, so every rank of a step agrees.
"""

from __future__ import annotations

import collections
import math
import statistics
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raypod.protocol import StepResult

CALIBRATION_SNAPSHOTS = 4
"""Snapshots taken every step at the start, before the interval is first worked out."""
WINDOW = 32
"""Recent steps the figures are taken over."""


class SnapshotCadence:
    """Decides, step by step, whether a step snapshots (and so is replicated).

    Args:
        every: ``checkpoint.memory_every_steps``: an interval (0: never) or ``"auto"``.
        budget: the share of the step time that snapshots may take (``auto``).
        max_every: the longest interval ``auto`` picks.
    """

    def __init__(self, every: int | str, budget: float = 0.01, max_every: int = 20) -> None:
        self.auto = every == "auto"
        self.every = 1 if self.auto else int(every)
        self.budget, self.max_every = budget, max_every
        self.flagged: set[int] = set()
        self.last_flagged = 0
        self.regrouped = False
        self._costs: collections.deque[float] = collections.deque(maxlen=WINDOW)
        self._steps: collections.deque[float] = collections.deque(maxlen=WINDOW)
        self._snaps_seen = 0
        self._t0 = time.monotonic()
        self.failures = 0

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def decide(self, step: int) -> bool:
        """Whether submitted step ``step`` snapshots (called once per step, in order)."""
        if not self.enabled:
            return False
        if self.regrouped:
            take, self.regrouped = True, False
        elif self.auto:
            take = step - self.last_flagged >= self.every
        else:
            take = step % self.every == 0
        if take:
            self.flagged.add(step)
            self.last_flagged = step
            for s in [s for s in self.flagged if s < step - 4 * self.max_every]:
                self.flagged.discard(s)
        return take

    def snapshots(self, step: int) -> bool:
        """Whether ``step`` was submitted with a snapshot."""
        return step in self.flagged

    def restart(self, step: int, regrouped: bool = True) -> None:
        """Training goes on from ``step``: count the interval from it. After a new group
        (``regrouped``: a recovery or resize, not a rollback in the same group, which keeps
        its replicas) the next step snapshots."""
        self.last_flagged = step
        self.flagged = {s for s in self.flagged if s <= step}
        self.regrouped = regrouped

    def observe(self, step: int, results: list[StepResult]) -> None:
        """Learn from a completed step's per-rank results."""
        if not self.auto or not results:
            return
        self._steps.append(statistics.median(r.compute_s for r in results))
        cost = max(r.snapshot_s + r.replica_wait_s + r.exchange_s + r.snapshot_stall_s for r in results)
        if step in self.flagged:
            self._snaps_seen += 1
            self._costs.append(cost)
        elif cost and self._costs:  # an exchange reported after its step: part of the last snapshot's cost
            self._costs[-1] += cost
        if self._snaps_seen >= CALIBRATION_SNAPSHOTS:
            self.every = self.interval()

    def failure(self) -> None:
        """The job lost work to a failure (a recovery or a rollback): counted for Young's bound."""
        self.failures += 1
        if self.auto and self._costs and self._steps:
            self.every = self.interval()

    def interval(self) -> int:
        """The smallest interval whose amortised snapshot cost fits the budget, and after
        failures at most Young's optimum for the failure rate seen so far."""
        if not self._costs or not self._steps:
            return self.every
        cost = statistics.median(self._costs)
        step = max(1e-6, statistics.median(self._steps))
        k = max(1, min(self.max_every, math.ceil(cost / (self.budget * step) - 1e-9)))
        if self.failures:
            mtbf = (time.monotonic() - self._t0) / self.failures
            k = min(k, max(1, round(math.sqrt(2 * cost * mtbf) / step)))
        return k

    def figures(self) -> dict[str, float]:
        """For the summary: the interval in use and what it was worked out from."""
        out: dict[str, float] = {"every": float(self.every), "failures": float(self.failures)}
        if self._costs:
            out["snapshot_cost_s"] = round(statistics.median(self._costs), 4)
        if self._steps:
            out["step_s"] = round(statistics.median(self._steps), 4)
        return out
