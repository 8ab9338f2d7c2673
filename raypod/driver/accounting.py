"""The job's books: step times, failures, world sizes, the sample ledger, goodput.

Everything in ``summary.json`` comes from here, built from what the ranks reported
(the sample ids they consumed), not from arithmetic on step counts.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import Any

import numpy as np

from raypod.callbacks import FailureEvent
from raypod.data.order import SampleOrder
from raypod.storage import join_uri, write_json_atomic

log = logging.getLogger("raypod.driver")


class JobAccounting:
    """Records a job as it runs.

    Args:
        start_time: ``time.time()`` at driver start.
        start_step: the step the job resumed after (0 when fresh).
    """

    def __init__(self, start_time: float, start_step: int = 0) -> None:
        self.start_time = start_time
        self.start_step = start_step
        self.world_sizes: list[int] = []
        self.events: list[FailureEvent] = []
        self.step_s: dict[int, float] = {}
        """Kept steps -> wall seconds the step took (from the previous step or group start)."""
        self.ids: dict[int, list[tuple[int, np.ndarray]] | None] = {}
        """Kept steps -> ``(epoch, ids)`` per rank, or None when they were exactly the step's
        share of the seeded order (the usual case; counted from the order, so the driver's
        memory does not grow with the samples: 3.5 MiB a step at 10,000 ranks otherwise)."""
        self.first_step_s: float | None = None
        self.last_step_s: float | None = None
        """Seconds since start when the latest step completed."""
        self.last_step = start_step
        self.completed_ever = start_step
        self.order: SampleOrder | None = None
        self.bad_steps: set[int] = set()
        """Steps whose batch was skipped on purpose (a NaN or spiking loss)."""

    def now(self) -> float:
        return time.time() - self.start_time

    def resumed_after(self, step: int) -> None:
        """The job resumes after committed step ``step`` (before anything is recorded)."""
        self.start_step = self.last_step = self.completed_ever = step

    # ---- recording ---------------------------------------------------------------
    def group_started(self, world_size: int) -> None:
        self.world_sizes.append(world_size)

    def step_done(self, step: int, duration_s: float, ids: list[tuple[int, np.ndarray]],
                  resolve: bool = True, finished_s: float | None = None) -> tuple[bool, list[FailureEvent]]:
        """Record a completed step.

        ``resolve=False`` is for a step that finished before a failure but is only
        counted during its recovery: it does not mark the failure as recovered.
        ``finished_s``: when every rank had finished it (job seconds; a step counts a little
        later, once its replicas are acknowledged); default now.

        Returns:
            Whether the step number is a replay, and the failure events this step
            resolves (the first step completed after them).
        """
        replay = step <= self.completed_ever
        self.step_s[step] = duration_s
        self.ids[step] = None if self._as_ordered(step, ids) else ids
        self.last_step = step
        self.completed_ever = max(self.completed_ever, step)
        self.last_step_s = self.now() if finished_s is None else finished_s
        if self.first_step_s is None:
            self.first_step_s = self.last_step_s
        resolved = [ev for ev in self.events if ev.resumed_s is None] if resolve else []
        for ev in resolved:
            ev.resumed_s = max(self.last_step_s, ev.detected_s)
        return replay, resolved

    def failure(self, event: FailureEvent) -> None:
        event.last_step_s = self.last_step_s
        self.events.append(event)

    def rolled_back(self, event: FailureEvent, to_step: int, world_size: int, source: str) -> None:
        """Steps after ``to_step`` are thrown away and will be done again."""
        event.lost_steps = max(0, self.last_step - to_step)
        event.world_size_after = world_size
        event.restored_from = source
        for s in [s for s in self.step_s if s > to_step]:
            del self.step_s[s]
            del self.ids[s]
        self.last_step = to_step

    def _as_ordered(self, step: int, ids: list[tuple[int, np.ndarray]]) -> bool:
        """The ranks consumed exactly the seeded order's samples of ``step``, once each."""
        if self.order is None or not ids:
            return False
        epoch = self.order.epoch_of(step)
        if any(e != epoch for e, _ in ids):
            return False
        got = np.sort(np.concatenate([np.asarray(a) for _, a in ids]))
        return bool(np.array_equal(got, np.sort(self.order.ids(step))))

    def _reported(self, step: int) -> list[tuple[int, np.ndarray]]:
        kept = self.ids[step]
        if kept is not None:
            return kept
        assert self.order is not None
        return [(self.order.epoch_of(step), self.order.ids(step))]

    # ---- results -----------------------------------------------------------------
    def samples(self) -> dict[str, int]:
        """Consumed, duplicated and skipped samples, from the ids the ranks reported.

        Duplicated: an ``(epoch, id)`` consumed more than once. Skipped: an id that the
        seeded order puts in a step this job ran (after its resume step) that no rank
        reported consuming; a batch left out on purpose (a bad loss) is ``skipped_bad``.
        """
        seen: Counter[tuple[int, int]] = Counter()
        for step in self.ids:
            for epoch, ids in self._reported(step):
                seen.update((epoch, int(i)) for i in ids)
        consumed = sum(seen.values())
        duplicated = sum(c - 1 for c in seen.values() if c > 1)
        skipped = 0
        if self.order is not None:  # every step this job ran, including any never reported
            for step in range(self.start_step + 1, self.last_step + 1):
                if step in self.bad_steps:
                    continue  # counted in skipped_bad
                epoch = self.order.epoch_of(step)
                skipped += sum(1 for i in self.order.ids(step) if (epoch, int(i)) not in seen)
        out = {"consumed": consumed, "duplicated": duplicated, "skipped": skipped}
        if self.bad_steps and self.order is not None:  # not lost: left out on purpose
            out["skipped_bad"] = sum(len(self.order.ids(s)) for s in self.bad_steps)
        return out

    def productive_s(self) -> float:
        """Wall time of the kept steps after the first one (replayed work is not productive)."""
        first = min(self.step_s) if self.step_s else None
        return sum(d for s, d in self.step_s.items() if s != first)

    def summary(self, status: str, final_step: int, run_id: str | None, digest: str | None,
                error: str | None = None) -> dict[str, Any]:
        wall = self.now()
        productive = self.productive_s()
        after_first = wall - self.first_step_s if self.first_step_s is not None else 0.0
        goodput = min(1.0, productive / after_first) if after_first > 0 else 0.0
        out: dict[str, Any] = {
            "status": status,
            "final_step": final_step,
            "mlflow_run_id": run_id,
            "world_sizes": list(self.world_sizes),
            "failures": sum(1 for e in self.events if not e.extra.get("alert") and e.kind != "stop"),
            "events": [e.to_summary() for e in self.events],
            "goodput": round(goodput, 4),
            "wall_s": round(wall, 3),
            "productive_s": round(productive, 3),
            "samples": self.samples(),
            "final_state_sha256": digest,
            "first_step_s": None if self.first_step_s is None else round(self.first_step_s, 3),
            "started_at": self.start_time,
            "resumed_from_step": self.start_step,
        }
        if error:
            out["error"] = error
        return out


def write_summary(job_dir: str, name: str, start_time: float, summary: dict[str, Any]) -> str:
    """Write ``summary.json`` into the job's folder or, where that fails, to a local file beside
    the driver's other state (``~/.raypod/summary/<name>-<start>.json``, named in the log);
    returns where it went."""
    path = join_uri(job_dir, "summary.json")
    try:
        write_json_atomic(path, summary)
    except OSError as e:
        fallback = os.path.join(os.path.expanduser("~/.raypod/summary"), f"{name}-{int(start_time)}.json")
        try:
            write_json_atomic(fallback, summary)
            log.error("could not write %s (%s): the job's summary is in %s instead", path, e, fallback)
            path = fallback
        except OSError as e2:
            log.error("could not write %s (%s) nor %s (%s)", path, e, fallback, e2)
    return path
