"""Diagnosis: what the ranks' errors, heartbeats and the fault markers say went wrong.

Everything here turns observations into a :class:`~raypod.policies.failures.Failure` (or
the ranks to hand over); what to do about it is decided elsewhere
(:mod:`raypod.policies.failures`, :mod:`raypod.driver.recovery_plan`).

- a failed call: :meth:`Diagnosis.failure_from` finds the root cause among the errors;
- no step finished for a while: :meth:`Diagnosis.hang_failure` blames the rank the others
  wait for (:func:`raypod.policies.health.hung_rank`), early when the heartbeats already
  show it (:meth:`Diagnosis.quick_hang_failure`);
- a rank that no longer answers its liveness ping (frozen, or its node cut off):
  :meth:`Diagnosis.silent_failure`, within ``fault.silent_s`` at any moment;
- a node Ray drains: :meth:`Diagnosis.draining_ranks`;
- while running, :meth:`Diagnosis.watch` looks for all three and names the state to go to;
- an injected fault (``fault.inject``) leaves a marker saying exactly where it fired
  (:mod:`raypod.faults`), which names the rank and step better than any symptom.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

from raypod import console, faults
from raypod.config import JobConfig
from raypod.driver.ledger import StepLedger
from raypod.driver.liveness import busy
from raypod.driver.state import HandingOverState, RecoveringState, State
from raypod.policies.failures import Failure
from raypod.policies.health import hung_rank
from raypod.protocol import LATE_FACTOR, ErrorKind, Phase, WorkerError, WorkerGroupProtocol
from raypod.worker.node_agent import RUNNING

log = logging.getLogger("raypod.driver")

HANG_HISTORY = 3
"""Steps timed before ``fault.hang_factor`` applies."""
TRAINING_PHASES = frozenset({Phase.START, Phase.FORWARD_BACKWARD, Phase.OPTIMIZER, Phase.SNAPSHOT})
"""Phases in which a rank works on its step, so the others may be waiting on it (in
``sync`` it waits itself; in ``done`` it is between steps)."""
BUSY_READ_S = 0.25
"""While a rank is silent past the limit, how often its process is read on its node."""
BUSY_CAP = 10.0
"""A silent rank whose process keeps working is waited for up to this many times
``fault.silent_s``; past that it is lost, working or not."""
FROZEN = frozenset({"freeze", "freeze_node"})
"""Injected fault kinds that leave a rank silent (stopped with SIGSTOP)."""
_ROOT_CAUSE = {ErrorKind.WORKER_DIED: 0, ErrorKind.INJECTED: 1, ErrorKind.EXCEPTION: 2, ErrorKind.PEER_LOST: 4}
"""Which error is the root cause when several ranks fail (lowest first, then the earliest step)."""


def dead_ranks(errors: Iterable[WorkerError]) -> set[int]:
    """The ranks whose process is gone."""
    return {e.rank for e in errors if e.kind == ErrorKind.WORKER_DIED}


class Diagnosis:
    """Reads one job's symptoms. ``fired`` holds the indices of ``fault.inject`` entries
    whose marker the driver has seen (they never fire again).

    Args:
        config: the job's config (``fault`` section, ``job_dir`` for the markers).
        ledger: the step ledger (where each rank was).
        now: seconds since the job started (a failure's ``time_s``).
    """

    def __init__(self, config: JobConfig, ledger: StepLedger, now: Callable[[], float]) -> None:
        self.cfg = config
        self.ledger = ledger
        self.now = now
        self.fired: set[int] = set()
        self.next_hang_probe = 0.0
        self.next_health_check = 0.0
        self.silent: set[int] = set()
        """The ranks the last :meth:`silent_failure` found silent (all lost with the one blamed)."""
        self._reads: dict[int, tuple[float, int | None, bool, bool]] = {}
        """Silent ranks' processes as last read on their nodes: (when, ticks or RUNNING, working,
        whether the log said so)."""

    def watch(self, group: WorkerGroupProtocol, step_durs: Iterable[float], excluded_nodes: dict[str, str],
              draining_nodes: Callable[[], set[str]]) -> State | None:
        """While running: a silent rank, a hang (no step finished for a while) or a draining
        node, as the state to go to; None when all is well."""
        silent = self.silent_failure(group)
        if silent is not None:
            return RecoveringState(silent)
        stalled = self.ledger.stalled_s()
        if stalled > self.cfg.fault.hang_timeout_s:
            return RecoveringState(self.hang_failure(group))
        quick = self.quick_hang_s(step_durs)
        if quick is not None and stalled > quick and time.monotonic() >= self.next_hang_probe:
            self.next_hang_probe = time.monotonic() + self.cfg.fault.heartbeat_s
            failure = self.quick_hang_failure(group, stalled)
            if failure is not None:
                return RecoveringState(failure)
        if time.monotonic() >= self.next_health_check:
            self.next_health_check = time.monotonic() + self.cfg.fault.heartbeat_s
            draining = self.draining_ranks(group, excluded_nodes, draining_nodes)
            if draining:
                return HandingOverState(ranks=tuple(draining), reason="drain", step=self.ledger.done_step + 1,
                                        time_s=self.now(), message=f"the node of rank(s) {draining} is draining")
        return None

    def refresh_fired(self) -> dict[int, dict[str, Any]]:
        """Markers of injected faults that fired since the driver last looked."""
        new = {i: m for i, m in faults.fired(self.cfg.job_dir).items() if i not in self.fired}
        self.fired |= set(new)
        return new

    # ---- errors --------------------------------------------------------------------
    def failure_from(self, group: WorkerGroupProtocol, errors: list[WorkerError]) -> Failure:
        """The root cause among the errors: storage that cannot be written, a dead rank, then an
        injected fault, then the rest."""
        full = [x for x in errors if x.kind == ErrorKind.STORAGE]
        if full:  # full, read-only or forbidden storage: no restart makes room (never retried)
            e = min(full, key=lambda x: x.step)
            return Failure(kind="storage", rank=e.rank, step=e.step, time_s=self.now(),
                           message=e.message, retryable=False)
        e = min(errors, key=lambda e: (_ROOT_CAUSE.get(ErrorKind(e.kind), 3), e.step))
        if e.kind == ErrorKind.EXCEPTION and any(
                x.kind == ErrorKind.EXCEPTION and "timed out" in x.message.lower() for x in errors):
            blamed = self._collective_timeout(group, errors)
            if blamed is not None:
                return blamed
        # A raising call names its step; a dead rank was in the step after its last result.
        died = e.kind == ErrorKind.WORKER_DIED
        step = e.step if not died else self.ledger.rank_step.get(e.rank, self.ledger.done_step) + 1
        kind = "worker_died" if died else "exception"
        # An injected fault says exactly where it fired (its result may never have arrived).
        for marker in self.refresh_fired().values():
            if marker["rank"] == e.rank and marker["kind"] != "slow":  # a slow rank fails nothing
                kind, step = marker["kind"], marker["step"]
        what = e.message
        if died:  # name the node; Ray's guess at the cause stays in driver.log
            what += f" on {group.node_of(e.rank)}"
            if kind == "kill":
                what += " (fault.inject)"
            elif console.get() is not None:
                what += f" (Ray's report of the exit: {console.LOG_NAME})"
        return Failure(kind=kind, rank=e.rank, step=step, time_s=self.now(),
                       message=f"rank {e.rank} at step {step}: {what}")

    def _collective_timeout(self, group: WorkerGroupProtocol, errors: list[WorkerError]) -> Failure | None:
        """A collective timed out (``fault.pg_timeout_s``): blame the rank the others waited
        for, which is usually not one of those whose call raised; None when that is not clear."""
        rank, why = hung_rank(group.heartbeats(timeout=self.cfg.fault.heartbeat_s))
        if rank is None or rank in {x.rank for x in errors}:
            return None
        step = self.ledger.rank_step.get(rank, self.ledger.done_step) + 1
        for marker in self.refresh_fired().values():
            if marker["rank"] == rank:
                step = marker["step"]
        return Failure(kind="hang", rank=rank, step=step, time_s=self.now(),
                       message=f"a collective timed out after {self.cfg.fault.pg_timeout_s:g} s "
                               f"(fault.pg_timeout_s): rank {rank} {why}")

    # ---- silent ranks --------------------------------------------------------------
    def silent_failure(self, group: WorkerGroupProtocol) -> Failure | None:
        """A rank whose liveness ping has gone unanswered for ``fault.silent_s`` (pinged every
        quarter of it; never waits). Ranks silent for half of it are lost with it (a frozen
        node stops its ranks within moments): they are left in :attr:`silent`."""
        silent_s = self.cfg.fault.silent_s
        self.silent = set()
        if silent_s <= 0:
            return None
        quiet = group.probe(every_s=min(0.25, silent_s / 4))
        # A host that answers late (busy) gets more time (see protocol.Silence).
        limit = max(silent_s, LATE_FACTOR * getattr(quiet, "slowest_s", 0.0))
        over = {r: s for r, s in quiet.items() if s >= limit}
        working = self._working(group, over, silent_s)
        worst = max(set(over) - working, key=lambda r: quiet[r], default=None)
        if worst is None:
            return None
        self.silent = {r for r, s in quiet.items() if s >= limit / 2} - working
        rank, kind = worst, "unresponsive"
        step = self.ledger.rank_step.get(rank, self.ledger.done_step) + 1
        for marker in self.refresh_fired().values():  # an injected freeze says where it fired
            if marker["kind"] in FROZEN and marker["rank"] in self.silent:
                rank, kind, step = marker["rank"], marker["kind"], marker["step"]
        others = sorted(self.silent - {rank})
        also = f" (also silent: rank(s) {others})" if others else ""
        return Failure(kind=kind, rank=rank, step=step, time_s=self.now(),
                       message=f"rank {rank} at step {step}: no answer to a ping for {quiet[rank]:.1f} s "
                               f"(fault.silent_s) on {group.node_of(rank)}{also}"
                               + (f"; allowed {limit:.1f} s, as answers came up to {limit / LATE_FACTOR:.1f} s late"
                                  if limit > silent_s + 0.05 else ""))

    def _working(self, group: WorkerGroupProtocol, over: dict[int, float], silent_s: float) -> set[int]:
        """Of the ranks silent past the limit (``over``: rank -> seconds), those whose process
        its node reads as running, waiting for a CPU or the disk, or using CPU: alive on a
        host too loaded to answer (measured on 2 cores: pings unanswered 1.3-2.7 s while a
        new MLflow store migrated and a spare imported torch), not frozen. A process read as
        stopped or gone (SIGSTOP, a zombie), asleep without using CPU since the last read,
        or not readable at all (its node is cut off) is not working; neither is one silent
        for :data:`BUSY_CAP` x ``fault.silent_s``. A group that cannot read processes (the
        simulator's) has none working."""
        for r in [r for r in self._reads if r not in over]:
            del self._reads[r]  # answered again
        read = getattr(group, "process_ticks", None)
        ask = [r for r, s in over.items() if s < BUSY_CAP * silent_s]
        if read is None or not ask:
            return set()
        now = time.monotonic()
        due = [r for r in ask if r not in self._reads or now - self._reads[r][0] >= BUSY_READ_S]
        if due:
            got: dict[int, int | None] = read(due)
            for r in due:
                t, before = got.get(r), self._reads.get(r)
                last = before[1] if before is not None else None
                told = before is not None and before[3]
                if r in busy({r: last}, {r: t}):  # running now, or used CPU since the last read
                    works = True
                    if not told:
                        log.info("rank %d has not answered a ping for %.1f s, but its process is working "
                                 "(a loaded host): waiting on", r, over[r])
                        told = True
                else:  # asleep with nothing to compare yet: the next read says whether it used CPU
                    works = t is not None and last in (None, RUNNING)
                self._reads[r] = (now, t, works, told)
        return {r for r in ask if r in self._reads and self._reads[r][2]}

    # ---- hangs ---------------------------------------------------------------------
    def quick_hang_s(self, step_durs: Iterable[float]) -> float | None:
        """The stall after which the heartbeats are asked for a hung rank (``fault.hang_factor``
        x the median recent step, at least ``fault.hang_min_s``); None until steps are known."""
        f = self.cfg.fault
        durs = list(step_durs)
        if f.hang_factor <= 0 or len(durs) < HANG_HISTORY:
            return None
        return max(f.hang_min_s, f.hang_factor * statistics.median(durs))

    def quick_hang_failure(self, group: WorkerGroupProtocol, stalled: float) -> Failure | None:
        """A hang, when one rank is silent or behind every other inside its training step."""
        beats = group.heartbeats(timeout=self.cfg.fault.heartbeat_s)
        rank, why = hung_rank(beats)
        hb = beats.get(rank) if rank is not None else None
        if rank is None or (hb is not None and hb.phase not in TRAINING_PHASES):
            return None  # a wait every rank shares, or a rank between steps (a save): not a hang
        f = self.cfg.fault
        return self.hang_failure(
            group, (rank, why), f"no step finished for {stalled:.1f} s ({f.hang_factor:g}x the median step, "
                                f"at least {f.hang_min_s:g} s: fault.hang_factor, fault.hang_min_s)")

    def hang_failure(self, group: WorkerGroupProtocol, blamed: tuple[int | None, str] | None = None,
                     after: str | None = None) -> Failure:
        """No step finished for ``fault.hang_timeout_s`` (or ``after`` says for how long): find
        the rank the others wait for (``blamed``, when the heartbeats were just read)."""
        timeout = self.cfg.fault.hang_timeout_s
        rank, why = blamed or hung_rank(group.heartbeats(timeout=self.cfg.fault.heartbeat_s))
        step = self.ledger.finished_through(group.world_size) + 1  # every rank finished the ones before
        for marker in self.refresh_fired().values():
            if marker["kind"] == "hang" and (rank is None or marker["rank"] == rank):
                rank, step = marker["rank"], marker["step"]
        who = f"rank {rank} {why}" if rank is not None else f"no single rank to blame ({why})"
        return Failure(kind="hang", rank=rank, step=step, time_s=self.now(),
                       message=f"{after or f'no step finished for {timeout:g} s (fault.hang_timeout_s)'}: {who}")

    # ---- nodes going away ----------------------------------------------------------
    @staticmethod
    def draining_ranks(group: WorkerGroupProtocol, excluded_nodes: dict[str, str],
                       draining_nodes: Callable[[], set[str]]) -> list[int]:
        """Ranks on nodes that Ray is draining (preemption, autoscaler scale-down); each such
        node is handled once (added to ``excluded_nodes``: the next placements avoid it)."""
        nodes = group.nodes
        if not nodes:
            return []
        new = draining_nodes() & set(nodes) - set(excluded_nodes)
        for node in new:
            excluded_nodes[node] = "drain: Ray is draining the node"
        return [r for r, node in enumerate(nodes) if node in new]
