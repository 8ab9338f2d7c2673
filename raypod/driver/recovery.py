"""The driver's RECOVERING, ROLLING_BACK and HANDING_OVER states: gather the facts, let
:mod:`raypod.driver.recovery_plan` decide, have the group carry the plan out.

What is decided (in place from memory, shrink, load the checkpoint in place, restart;
roll back; hand over) is all in :mod:`raypod.driver.recovery_plan`; this module does the
asking (kill, drain, memory reports, spares) and the doing (``group.recover_in_place``,
``group.reshard``, ``group.load_in_place``, ``group.rollback``, a restart), and books the
result (events, the ledger's reset, resizes).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from raypod.callbacks import FailureEvent
from raypod.checkpoint import CommittedCheckpoint
from raypod.driver.outcomes import GroupStartError
from raypod.driver.recovery_plan import (
    Action,
    Plan,
    RecoveryFacts,
    SourceFacts,
    keeps_survivors,
    needs_second_ping,
    patience_s,
    plan_hand_over,
    plan_recovery,
    plan_roll_back,
    sole_copies,
)
from raypod.driver.state import (
    ErroredState,
    HandingOverState,
    RecoveringState,
    RollingBackState,
    RunningState,
    State,
)
from raypod.policies.failures import Failure, FailureDecision
from raypod.protocol import ErrorKind, WorkerError, WorkerGroupProtocol
from raypod.storage import write_json_atomic

if TYPE_CHECKING:
    from raypod.driver.controller import Driver

log = logging.getLogger("raypod.driver")

_SECOND_PING_S = 3.0
"""How long a rank that missed the first ping gets to answer when its loss would cost the in-memory copy."""

Marks = list[tuple[str, float]]
"""``(phase, perf_counter)`` of a recovery, for the event's ``recovery_phases_s``."""


class Recovery:
    """Carries out the driver's recovery states for ``driver`` (its group, ledger, policies)."""

    def __init__(self, driver: Driver) -> None:
        self.d = driver

    # ---- RECOVERING --------------------------------------------------------------
    def recover(self, state: RecoveringState) -> State:
        d, f = self.d, state.failure
        d.failures += 1
        d.policies.cadence.failure()
        event = FailureEvent(kind=f.kind, step=f.step, rank=f.rank, detected_s=f.time_s, message=f.message)
        d.acct.failure(event)
        d._fire("after_failure", event)
        self.count_node_failures(f)
        decision = d.policies.failure.decide(f, d.failures)
        if decision is FailureDecision.RAISE and f.kind == "storage":
            d.storage_failed = True
            return ErroredState(f.message)
        if decision is FailureDecision.RAISE:
            budget = d.cfg.fault.max_failures
            return ErroredState(f"{f.message} (fault.max_failures={budget} exhausted)" if f.retryable
                                else f.message)
        d.attempt += 1
        if d.group is not None and self.in_place(f, event):
            return RunningState()
        return d.restart()

    def count_node_failures(self, f: Failure) -> None:
        """Blame the nodes of lost ranks; one that failed ``fault.max_node_failures`` times goes."""
        d = self.d
        nodes = d.group.nodes if d.group is not None else []
        gone = ("worker_died", "kill", "freeze", "freeze_node", "unresponsive")
        lost = set(d.dead_ranks) | ({f.rank} if f.kind in gone and f.rank is not None else set())
        for node in {nodes[r] for r in lost if r < len(nodes)}:  # once per failure, however many ranks
            d.node_failures[node] += 1
            if d.node_failures[node] >= d.cfg.fault.max_node_failures and node not in d.excluded_nodes:
                if not d.alive_nodes() - set(d.excluded_nodes) - {node}:
                    log.warning("node %s lost ranks %d times, but it is the only node left: keeping it",
                                node, d.node_failures[node])
                    continue
                d.excluded_nodes[node] = f"lost ranks {d.node_failures[node]} times (fault.max_node_failures)"
                log.warning("node %s lost ranks %d times (fault.max_node_failures): the job no longer "
                            "uses it", node, d.node_failures[node])
        if d.group is not None:
            d.group.excluded_nodes = set(d.excluded_nodes)

    def in_place(self, f: Failure, event: FailureEvent) -> bool:
        """Keep the surviving processes and resume as :func:`~raypod.driver.recovery_plan.plan_recovery`
        decides (the source decision goes in the event).

        Returns False (the caller restarts every rank from the persistent checkpoint) when the
        plan is a restart or carrying it out fails.
        """
        d, group = self.d, self.d.group
        assert group is not None
        if not keeps_survivors(group.world_size, d.policies.cadence.enabled):
            return False
        if not d.group_formed:
            # The group's own start failed: its ranks may still be inside their set-up call,
            # where no reload or regroup can reach them (one would wait on that call): every
            # rank starts again, from the checkpoint if there is one.
            return False
        marks: Marks = [("start", time.perf_counter())]
        lost = self._take_down(group, f)
        alive = [r for r in range(group.world_size) if r not in lost]
        marks.append(("drain", time.perf_counter()))
        try:
            reports = group.memory_reports(alive) if alive else {}
        except Exception as e:  # noqa: BLE001 - a survivor that cannot answer is lost too
            log.warning("in-memory recovery: a survivor did not answer (%s)", e)
            return False
        facts = RecoveryFacts(world_size=group.world_size, lost=frozenset(lost), reports=reports,
                              holders={r: group.holder_of(r) for r in lost}, twins=bool(group.twins),
                              finished=d.ledger.finished_through(group.world_size),
                              live_spares=group.live_spares() if alive else 0, sources=SourceFacts(None))
        plan, ckpt = self._plan(lambda s: plan_recovery(dataclasses.replace(facts, sources=s),
                                                        d.policies.scaling.shrink_to))
        assert plan.choice is not None
        event.extra["source_choice"] = plan.choice.record()
        if plan.lost_replica is not None:
            event.message += f"; rank {plan.lost_replica}'s in-memory replica was lost with it"
        if plan.no_memory is not None:
            log.warning("in-memory recovery: %s", plan.no_memory)
        if plan.action is Action.LOAD:
            assert ckpt is not None
            return self.load_in_place(event, lost, ckpt, marks)
        if plan.action is Action.FRESH:
            assert ckpt is None
            return self.load_in_place(event, lost, None, marks)
        if plan.action is Action.RESTART:
            if plan.uses_checkpoint:
                assert plan.choice.chosen is not None
                log.warning("recovering from %s: every rank restarts (%s)", plan.choice.chosen.label,
                            plan.choice.reason)
            return False
        return self._from_memory(plan, lost, f, event, marks)

    def _take_down(self, group: WorkerGroupProtocol, f: Failure) -> set[int]:
        """Kill the failed rank (one whose step raised holds its peers in a collective until its
        process ends) and every rank found dead; the others finish or fail their calls in
        flight. Returns the ranks lost."""
        d = self.d
        culprit = {f.rank} if f.rank is not None else set()
        suspects = set(d.dead_ranks) - culprit
        if needs_second_ping(culprit, suspects, group.holder_of):
            # A rank that merely missed the 0.5 s ping (a busy host) gets one longer ping
            # before it is given up.
            silent = group.unresponsive_ranks(sorted(suspects), timeout=_SECOND_PING_S)
            if suspects - silent:
                log.info("ranks %s answered a second ping: not lost", sorted(suspects - silent))
            d.dead_ranks -= suspects - silent
        culprit |= d.dead_ranks  # every rank found dead, not only the one blamed
        group.kill(culprit)
        # A survivor left holding the only copy of a state is waited for longer if its call
        # does not end (giving it up would leave memory nothing to recover from).
        keep = sole_copies(group.world_size, culprit, group.holder_of)

        def patience() -> float:
            try:
                ckpt = d.store.latest()
            except Exception as e:  # noqa: BLE001 - storage unreadable now: as if none were committed
                log.warning("recovery: the newest checkpoint could not be read (%s)", e)
                ckpt = None
            return patience_s(self._sources(ckpt), d.ledger.finished_through(group.world_size),
                              d.cfg.fault.hang_timeout_s)

        # The ranks are still in the attempt before this recovery's (counted already).
        return group.drain(timeout=min(5.0, d.cfg.fault.pg_timeout_s), attempt=d.attempt - 1,
                           keep=keep, patience=patience, gone=culprit) | culprit

    def _from_memory(self, plan: Plan, lost: set[int], f: Failure, event: FailureEvent, marks: Marks) -> bool:
        """Re-form the group at the plan's step from memory, in place or shrunk."""
        d, group = self.d, self.d.group
        assert group is not None and plan.step is not None
        restore_step = plan.step
        # Steps every rank finished whose replicas were still on their way count now.
        while d.ledger.done_step < restore_step and d.completion.health_next is None:
            d.completion.complete(group, d.ledger.done_step + 1, resolve=False)
        if d.ledger.done_step < restore_step:
            # One of them had a bad loss: the snapshot of restore_step holds its update. Every
            # rank restarts from the last committed checkpoint (before it), and the step's loss
            # is checked again as it is replayed (then rolled back and skipped as usual).
            log.warning("in-memory recovery: step %d had a bad loss, so memory step %d is not "
                        "restored: using the persistent checkpoint", d.ledger.done_step + 1, restore_step)
            d.completion.health_next = None
            return False
        marks.append(("plan", time.perf_counter()))
        try:
            if plan.action is Action.SHRINK:
                info = self._shrink(group, plan, lost, f)
            else:
                info = group.recover_in_place(lost, restore_step, d.attempt, d.pending_faults())
        except GroupStartError as e:
            log.warning("in-memory recovery failed (%s): using the persistent checkpoint", e)
            return False
        self.rebuilt(event, info, marks, restore_step, f"memory step {restore_step}")
        log.info("attempt %d: recovered in place from memory step %d in %.2f s (replaced %s, "
                 "%d bytes from peers; slowest rank %s)", d.attempt, restore_step,
                 info["recover_s"], info["replaced"], info["received_bytes"],
                 {k: round(v, 3) for k, v in info["slowest_rank_phases_s"].items()})
        return True

    def _shrink(self, group: WorkerGroupProtocol, plan: Plan, lost: set[int], f: Failure) -> dict[str, Any]:
        """Not enough warm spares: continue with fewer ranks now (state resharded in memory)
        and bring the lost slots back as joiners, added once they are warm."""
        d = self.d
        assert plan.step is not None
        before = group.world_size
        info = group.reshard(lost, group.take_spares(plan.spares), plan.step, d.attempt, d.pending_faults())
        d.membership.rejoin(group, info["freed"])
        d.resizes.append({"kind": "shrink", "step": plan.step, "from": before, "to": group.world_size,
                          "at_s": round(f.time_s, 3), "took_s": round(info["recover_s"], 3)})
        d._fire("after_resize", d.resizes[-1])
        return info

    def load_in_place(self, event: FailureEvent, lost: set[int], ckpt: CommittedCheckpoint | None,
                      marks: Marks) -> bool:
        """Replace ``lost`` ranks and load ``ckpt`` on every rank of the group, in place
        (``ckpt`` None: every rank starts afresh, :attr:`Action.FRESH`).

        Returns False (every rank then restarts from the checkpoint, or from scratch) when
        that fails.
        """
        d, group = self.d, self.d.group
        assert group is not None
        source = f"checkpoint step {ckpt.step}" if ckpt is not None else "scratch"
        marks.append(("plan", time.perf_counter()))
        try:
            info = group.load_in_place(lost, ckpt, d.attempt, d.pending_faults())
        except GroupStartError as e:
            log.warning("recovering in place from %s failed (%s): every rank restarts", source, e)
            return False
        if ckpt is not None and info["slowest_rank_phases_s"].get("restore") is not None:
            d.load_s = info["slowest_rank_phases_s"]["restore"]
        self.rebuilt(event, info, marks, ckpt.step if ckpt is not None else 0, source)
        log.info("attempt %d: recovered in place from %s in %.2f s (replaced %s)",
                 d.attempt, source, info["recover_s"], info["replaced"])
        return True

    def rebuilt(self, event: FailureEvent, info: dict[str, Any], marks: Marks, step: int, source: str) -> None:
        """Book a group rebuilt in place at ``step`` from ``source``: phases into the event, progress reset."""
        d, group = self.d, self.d.group
        assert group is not None
        d.dead_ranks = set()
        marks.append(("rebuild", time.perf_counter()))
        phases = {name: round(t - marks[i][1], 3) for i, (name, t) in enumerate(marks[1:])}
        phases.update({f"rebuild_{k}": round(v, 3) for k, v in info.get("driver_phases_s", {}).items()})
        phases.update({f"rank_{k}": round(v, 3) for k, v in info["slowest_rank_phases_s"].items()})
        event.extra["recovery_phases_s"] = phases
        d.acct.group_started(group.world_size)
        d.acct.rolled_back(event, step, group.world_size, source)
        d.reset(step)

    # ---- where to restore from -------------------------------------------------------
    def _sources(self, ckpt: CommittedCheckpoint | None) -> SourceFacts:
        d = self.d
        durs, saves = d.completion.step_durs, d.completion.save_s
        return SourceFacts(checkpoint_step=ckpt.step if ckpt else None,
                           step_s=statistics.median(durs) if durs else 0.0, load_s=d.load_s,
                           save_s=max(saves.values()) if saves else None, group_start_s=d.group_start_s)

    def _plan(self, decide: Callable[[SourceFacts], Plan],
              first: Callable[[Plan], None] | None = None) -> tuple[Plan, CommittedCheckpoint | None]:
        """Plan on the newest committed checkpoint as its manifest says (cheap); when the plan
        loads it, its files are verified, and a checkpoint that fails gives way to the one
        verification picks (the plan is then made again). ``first`` sees the first plan."""
        ckpt = self.d.store.latest()
        plan = decide(self._sources(ckpt))
        if first is not None:
            first(plan)
        assert plan.choice is not None
        log.info("recovery source: %s", plan.choice.reason)
        if plan.uses_checkpoint:
            verified = self.d.checkpoints.latest()
            if verified is None or ckpt is None or verified.step != ckpt.step:
                ckpt = verified
                plan = decide(self._sources(ckpt))
                assert plan.choice is not None
                log.info("recovery source: %s", plan.choice.reason)
        return plan, ckpt

    # ---- ROLLING_BACK ------------------------------------------------------------
    def roll_back(self, state: RollingBackState) -> State:
        """A bad loss at ``state.step``: back to the last snapshot before it, skip its batch.

        Nothing is lost or replaced: the calls in flight finish (their work is thrown
        away), every rank restores its own snapshot in the group it is in, and the
        step's samples go to the ledger's ``skipped_bad``.
        """
        d, f = self.d, self.d.cfg.fault
        event = self._bad_loss(state)
        if len(d.bad_steps) > f.max_bad_steps:
            return ErroredState(f"{event.message}; {len(d.bad_steps)} batches skipped "
                                f"(fault.max_bad_steps={f.max_bad_steps} exhausted)")
        group = d.group
        assert group is not None
        result = group.quiesce(timeout=f.hang_timeout_s)
        for rank, steps in result.saved + [(r.rank, r.saved) for r in result.steps]:
            d.completion.ack_saves(group, rank, [s for s in steps if s < state.step])
        if result.errors or group.in_flight:
            errors = result.errors or [WorkerError(rank=-1, step=state.step, kind=ErrorKind.EXCEPTION,
                                                   message="calls did not finish")]
            return RecoveringState(d.diagnosis.failure_from(group, errors))
        reports = group.memory_reports(list(range(group.world_size)))

        def no_memory(plan: Plan) -> None:
            if plan.no_memory is not None:
                log.warning("%s", plan.no_memory)

        plan, ckpt = self._plan(lambda s: plan_roll_back(state.step, reports, d.done_step, s), first=no_memory)
        assert plan.choice is not None
        event.extra["source_choice"] = plan.choice.record()
        if plan.action is not Action.ROLL_BACK:
            d.attempt += 1
            if (plan.action is Action.LOAD and ckpt is not None
                    and self.load_in_place(event, set(), ckpt, [("start", time.perf_counter())])):
                log.warning("step %d: %s", state.step, event.message)
                return RunningState()
            return d.restart()
        assert plan.step is not None
        for rank, steps in group.rollback(plan.step, timeout=f.hang_timeout_s):
            d.completion.ack_saves(group, rank, steps)
        d.acct.rolled_back(event, plan.step, group.world_size, f"memory step {plan.step}")
        d.reset(plan.step, same_group=True)
        log.warning("step %d: %s", state.step, event.message)
        return RunningState()

    def _bad_loss(self, state: RollingBackState) -> FailureEvent:
        """Record the bad loss (event, skipped step) and return its event."""
        d, f = self.d, self.d.cfg.fault
        what = "NaN or infinite" if state.reason == "nan" else f"above {f.loss_spike_factor:g}x the running median"
        event = FailureEvent(kind=state.reason, step=state.step, rank=None, detected_s=state.time_s,
                             message=f"loss {state.loss:.4g} at step {state.step} is {what}: "
                                     f"rolled back and its batch skipped")
        for marker in d.diagnosis.refresh_fired().values():  # an injected nan names its rank
            if marker["kind"] == "nan" and marker["step"] == state.step:
                event.kind, event.rank = "nan", marker["rank"]
        d.acct.failure(event)
        d._fire("after_failure", event)
        d.bad_steps.add(state.step)
        d.policies.cadence.failure()
        try:
            write_json_atomic(d._bad_steps_path, {"steps": sorted(d.bad_steps)})
        except OSError as e:
            log.warning("could not record the skipped steps: %s", e)
        return event

    # ---- HANDING_OVER ------------------------------------------------------------
    def hand_over(self, state: HandingOverState) -> State:
        """Ranks that must go but still work hand over: no step is lost.

        The steps in flight finish and count, every rank's replica exchange completes
        (so the peers hold the leaving ranks' latest shards), then the leaving ranks
        are replaced in place (spares first) from that step.
        """
        d = self.d
        event = FailureEvent(kind=state.reason, step=state.step, rank=state.ranks[0],
                             detected_s=state.time_s, message=state.message)
        failure = Failure(kind=state.reason, rank=state.ranks[0], step=state.step, time_s=state.time_s,
                          message=state.message)
        d.diagnosis.refresh_fired()
        if state.reason == "straggler":  # a replaced straggler counts against the budget
            d.failures += 1
            if d.policies.failure.decide(failure, d.failures) is FailureDecision.RAISE:
                return ErroredState(f"{state.message} (fault.max_failures={d.cfg.fault.max_failures} exhausted)")
        group, lost = d.group, set(state.ranks)
        assert group is not None
        plan = self._hand_over_plan(group, lost, event)
        d.attempt += 1
        if plan.action is Action.RECOVER:
            return RunningState() if self.in_place(failure, event) else d.restart()
        assert plan.step is not None
        try:
            info = group.recover_in_place(lost, plan.step, d.attempt, d.pending_faults())
        except GroupStartError as e:
            log.warning("hand-over failed (%s): using the persistent checkpoint", e)
            return d.restart()
        d.acct.group_started(group.world_size)
        d.acct.rolled_back(event, plan.step, group.world_size, f"memory step {plan.step}")
        d.reset(plan.step)
        log.info("attempt %d: rank(s) %s handed over at step %d (%s) in %.2f s", d.attempt,
                 sorted(lost), plan.step, state.reason, info["recover_s"])
        return RunningState()

    def _hand_over_plan(self, group: WorkerGroupProtocol, lost: set[int], event: FailureEvent) -> Plan:
        """Let the steps in flight finish and count, record the event, flush every rank's
        latest snapshot to its peer and plan from what the ranks then hold."""
        d = self.d
        d.completion.health_next = None
        result = group.quiesce(timeout=d.cfg.fault.hang_timeout_s)
        d.completion.absorb(group, result)  # these steps count (the event is recorded after them)
        d.completion.health_next = None  # the leaving ranks are replaced now; later checks start afresh
        d.acct.failure(event)
        d._fire("after_failure", event)
        if result.errors or group.in_flight:
            return Plan(Action.RECOVER)
        try:
            # Every rank snapshots the last step (if the cadence skipped it) and its peer
            # receives it: the leaving ranks' latest state stays in memory.
            reports = group.flush_replicas(timeout=d.cfg.fault.hang_timeout_s, latest=True)
            # Steps every rank finished whose acknowledgement was to ride in a later result
            # count now: every rank's latest snapshot has just reached its peer.
            while d.ledger.done_step < d.ledger.finished_through(group.world_size) and d.completion.health_next is None:
                d.completion.complete(group, d.ledger.done_step + 1, resolve=False)
            return plan_hand_over(lost, reports, {r: group.holder_of(r) for r in lost}, d.done_step)
        except Exception as e:  # noqa: BLE001 - fall back to the ordinary recovery
            log.warning("hand-over: %s", e)
            return Plan(Action.RECOVER)
