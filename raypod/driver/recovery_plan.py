"""What the driver decides when a rank dies (or hangs, or must leave, or a loss is bad).

This module is the whole decision, as pure functions of facts the driver gathered; it
imports no Ray and calls no worker. The driver then has the group carry the plan out
(:mod:`raypod.driver.controller`, :mod:`raypod.driver.recovery`).

A rank died, hung or raised (:func:`plan_recovery`)
    0. Without in-memory snapshots (``checkpoint.memory_every_steps: 0``) every rank
       restarts from the persistent checkpoint (:func:`keeps_survivors`). A rank that only
       looks lost because it missed a ping gets a second, longer one when its loss would
       also take the copy of another lost rank (:func:`needs_second_ping`).
    1. The lost ranks are killed, the survivors drained; each survivor reports the steps
       it holds in memory (its own snapshots, the replicas it keeps for its peer).
    2. Memory can restore step ``S`` when every survivor holds its own snapshot of ``S``
       and, for every lost rank, the holder of its replica (its HSDP twin's own snapshot
       on HSDP) is alive and holds ``S``, and every rank finished ``S``. If a lost rank's
       holder is lost too, memory is out ("rank d's in-memory replica was lost with it").
    3. Replacements: the live warm spares. Fewer spares than lost ranks: the job shrinks
       in place to ``world - lost + spares`` ranks when the scaling policy allows it
       (:meth:`raypod.policies.scaling.ScalingPolicy.shrink_to`; never below
       ``min_workers``, never on HSDP); then the lost slots come back later as joiners.
    4. Memory at ``S`` or the newest committed checkpoint, whichever resumes training
       soonest (:mod:`raypod.policies.recovery_source`; a checkpoint load costs a group
       start as well unless it happens in place: survivors left and no shrink).
    5. The plan: :attr:`Action.MEMORY` (re-form in place from memory at ``S``),
       :attr:`Action.SHRINK` (reshard onto fewer ranks at ``S``), :attr:`Action.LOAD`
       (load the checkpoint in place), :attr:`Action.FRESH` (no snapshot and no checkpoint
       yet, a failure in the first steps: every rank starts afresh in place) or
       :attr:`Action.RESTART` (every rank restarts from the persistent checkpoint). A plan
       the group fails to carry out becomes a restart.

Ranks must leave but still work (preemption, a draining node, a replaced straggler;
:func:`plan_hand_over`): the steps in flight finish, every rank snapshots the last step
and its peer receives it; the leaving ranks are replaced in place from the newest step
that survivors and the leaving ranks' replica holders all hold (:attr:`Action.MEMORY`),
else it is handled as a failure (:attr:`Action.RECOVER`, then :func:`plan_recovery`).

A bad loss at step ``B`` (:func:`plan_roll_back`): every rank goes back to the newest own
snapshot before ``B`` that all hold (:attr:`Action.ROLL_BACK`), or loads the checkpoint
in place when that resumes sooner (:attr:`Action.LOAD`), or restarts (:attr:`Action.RESTART`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from raypod.policies.recovery_source import CHECKPOINT, MEMORY, SourceChoice, choose_source, estimate

if TYPE_CHECKING:
    from raypod.protocol import MemoryReport

DEFAULT_LOAD_S = 30.0
"""Assumed seconds to load a checkpoint when this job has measured neither a load nor a save."""


class Action(enum.Enum):
    """What the group does to resume."""

    MEMORY = "memory"
    """Replace the lost ranks in place, every rank restoring step ``step`` from memory
    (``group.recover_in_place``)."""
    SHRINK = "shrink"
    """Continue with fewer ranks: ``spares`` warm spares come in, the state of step
    ``step`` is resharded in memory (``group.reshard``)."""
    LOAD = "load"
    """Replace the lost ranks in place and load checkpoint step ``step`` on every rank
    (``group.load_in_place``)."""
    ROLL_BACK = "roll_back"
    """Every rank restores its own snapshot of step ``step`` in the same group (``group.rollback``)."""
    FRESH = "fresh"
    """Replace the lost ranks in place; every rank starts afresh (the model initialised from
    the seed, step 0): the job has no snapshot and no checkpoint yet, so a restart would
    start from scratch as well, only with new processes (``group.load_in_place`` without a
    checkpoint)."""
    RESTART = "restart"
    """Shut the group down; a new one starts from the newest verified checkpoint (or scratch)."""
    RECOVER = "recover"
    """A hand-over that cannot keep the leaving ranks' state: recover as from a failure."""


@dataclass(frozen=True)
class Plan:
    """A decision and why.

    Attributes:
        action: what the group does.
        step: the step restored (memory, shrink, roll back) or loaded (load); for a restart,
            the checkpoint chosen, if one was.
        choice: the recovery-source decision (recorded in the failure event), if one was made.
        spares: warm spares taken in (shrink).
        world_size: the group's size once the plan is carried out (shrink).
        lost_replica: a lost rank whose replica was lost with it.
        no_memory: why memory could not be used (logged), if it could not.
    """

    action: Action
    step: int | None = None
    choice: SourceChoice | None = None
    spares: int = 0
    world_size: int | None = None
    lost_replica: int | None = None
    no_memory: str | None = None

    @property
    def uses_checkpoint(self) -> bool:
        """Whether the plan loads the checkpoint that was chosen (then it is verified first)."""
        return self.choice is not None and self.choice.chosen is not None and self.choice.chosen.kind == CHECKPOINT


@dataclass(frozen=True)
class SourceFacts:
    """What the recovery-source choice weighs (:mod:`raypod.policies.recovery_source`).

    Attributes:
        checkpoint_step: the newest committed checkpoint, None when there is none.
        step_s: the median recent step time (0 when none is known).
        load_s: seconds the last checkpoint load took, when this job did one.
        save_s: seconds the slowest rank's last persistent save took, when known.
        group_start_s: seconds the last group start took, when known.
    """

    checkpoint_step: int | None
    step_s: float = 0.0
    load_s: float | None = None
    save_s: float | None = None
    group_start_s: float | None = None

    def load_estimate(self) -> float:
        """A checkpoint load takes what the last load took, else the slowest last save, else
        :data:`DEFAULT_LOAD_S`."""
        if self.load_s is not None:
            return self.load_s
        if self.save_s is not None:
            return self.save_s
        return DEFAULT_LOAD_S

    def choose(self, memory_step: int | None, target: int, in_place: bool) -> SourceChoice:
        """Memory at ``memory_step`` or the checkpoint, whichever is back at ``target`` soonest."""
        cands = []
        if memory_step is not None:
            cands.append(estimate(MEMORY, memory_step, target, self.step_s))
        if self.checkpoint_step is not None:
            restart_s = 0.0 if in_place else (self.group_start_s or DEFAULT_LOAD_S)
            cands.append(estimate(CHECKPOINT, self.checkpoint_step, target, self.step_s,
                                  self.load_estimate(), restart_s))
        return choose_source(cands)


@dataclass(frozen=True)
class RecoveryFacts:
    """What the driver knows once the lost ranks are gone and the survivors answered.

    Attributes:
        world_size: the group's size before the failure.
        lost: the ranks lost (dead, killed, or failed to drain).
        reports: each survivor's :class:`~raypod.protocol.MemoryReport`.
        holders: per lost rank, the rank holding its replica (``group.holder_of``).
        twins: HSDP: a rank's twin holds the same state as its own snapshots.
        finished: the last step every rank finished (counted or not).
        live_spares: warm spares that answer (0 when no rank survived).
        sources: what a checkpoint would cost.
    """

    world_size: int
    lost: frozenset[int]
    reports: Mapping[int, MemoryReport]
    holders: Mapping[int, int | None]
    twins: bool
    finished: int
    live_spares: int
    sources: SourceFacts

    @property
    def survivors(self) -> list[int]:
        return [r for r in range(self.world_size) if r not in self.lost]


def keeps_survivors(world_size: int, snapshots_enabled: bool) -> bool:
    """Whether a failure is recovered by the surviving processes at all (else every rank
    restarts from the persistent checkpoint): a group is up and it takes in-memory snapshots."""
    return world_size > 0 and snapshots_enabled


def needs_second_ping(blamed: set[int], suspects: set[int], holder_of: Callable[[int], int | None]) -> bool:
    """Whether ranks found dead only by a missed ping (``suspects``) get a second, longer one:
    when a lost rank and the holder of its copy would both be lost, leaving only storage."""
    lost = blamed | suspects
    return bool(suspects) and any(holder_of(d) in lost for d in lost)


def sole_copies(world_size: int, lost: set[int], holder_of: Callable[[int], int | None]) -> set[int]:
    """The live ranks that hold the only in-memory copy of some rank's state once ``lost`` are
    gone: the holder of a lost rank's copy (its replica, or its HSDP twin), and a rank whose
    own copy was held by a lost rank (its state is left in its own process only). Giving one
    of them up as well leaves memory nothing to recover from."""
    out: set[int] = set()
    for r in range(world_size):
        holder = holder_of(r)
        if holder is None:
            continue
        if r in lost and holder not in lost:
            out.add(holder)
        elif r not in lost and holder in lost:
            out.add(r)
    return out


def patience_s(sources: SourceFacts, target: int, hang_timeout_s: float) -> float:
    """How long a recovery waits, in all, for a rank of :func:`sole_copies` whose call has not
    ended after its groups were aborted, before giving it up: what the way back without it
    would take (every rank restarts, loads the newest committed checkpoint, or starts from
    scratch, then redoes the steps up to ``target``), at most ``fault.hang_timeout_s``.

    Giving such a rank up throws away every step since the checkpoint; waiting on a rank that
    never answers costs the wait. Waiting as long as the alternative would take (the ski-rental
    rule) never costs more than twice the better of the two choices, whichever it turns out to be.
    """
    restart = sources.group_start_s or DEFAULT_LOAD_S
    if sources.checkpoint_step is not None:
        alt = estimate(CHECKPOINT, sources.checkpoint_step, target, sources.step_s,
                       sources.load_estimate(), restart)
    else:
        alt = estimate(CHECKPOINT, 0, target, sources.step_s, 0.0, restart)
    return min(hang_timeout_s, alt.est_s)


def _common(steps: Iterable[Iterable[int]]) -> set[int] | None:
    """The steps in every set (None for no set at all)."""
    out: set[int] | None = None
    for s in steps:
        out = set(s) if out is None else out & set(s)
    return out


def plan_recovery(facts: RecoveryFacts, shrink_to: Callable[[int, int, int], int | None]) -> Plan:
    """The plan after a failure (steps 2-5 of the module docstring).

    Args:
        facts: what the driver found.
        shrink_to: the scaling policy's ``shrink_to(world_size, lost, spares)``.
    """
    steps = _common(facts.reports[r].own for r in facts.survivors)
    lost_replica = no_memory = None
    for d in sorted(facts.lost):
        holder = facts.holders.get(d)
        if holder is None or holder in facts.lost:
            lost_replica, no_memory = d, f"rank {d} and the holder of its replica are both lost"
            steps = set()
            break
        # An HSDP twin's own snapshots are the lost rank's state; else the replica it holds.
        report = facts.reports[holder]
        held = set(report.own if facts.twins else report.replicas.get(d, []))
        steps = held if steps is None else steps & held
    usable = [s for s in steps or () if s <= facts.finished]
    if not usable and no_memory is None:
        no_memory = "no finished step is held in memory by every rank"
    spares, n_lost = facts.live_spares, len(facts.lost)
    shrink = shrink_to(facts.world_size, n_lost, spares) if spares < n_lost else None
    in_place = bool(facts.survivors) and shrink is None
    choice = facts.sources.choose(max(usable) if usable else None, facts.finished, in_place)
    common = {"choice": choice, "lost_replica": lost_replica, "no_memory": no_memory}
    chosen = choice.chosen
    if chosen is None:
        fresh = in_place and facts.sources.checkpoint_step is None
        return Plan(Action.FRESH, 0, **common) if fresh else Plan(Action.RESTART, **common)
    if chosen.kind == CHECKPOINT:
        return Plan(Action.LOAD if in_place else Action.RESTART, chosen.step, **common)
    if shrink is not None:
        return Plan(Action.SHRINK, chosen.step, spares=spares, world_size=shrink, **common)
    return Plan(Action.MEMORY, chosen.step, **common)


def plan_hand_over(lost: set[int], reports: Mapping[int, MemoryReport], holders: Mapping[int, int | None],
                   done_step: int) -> Plan:
    """Replace ranks that must leave from the newest step every survivor holds and every
    leaving rank's replica holder holds for it (``reports`` after ``group.flush_replicas``);
    :attr:`Action.RECOVER` when there is none."""
    steps = _common(reports[r].own for r in reports if r not in lost) or set()
    for d in lost:
        holder = holders.get(d)
        if holder is None or holder in lost or holder not in reports:
            return Plan(Action.RECOVER, no_memory=f"rank {d} has no live replica holder")
        steps &= set(reports[holder].replicas.get(d, []))
    steps = {s for s in steps if s <= done_step}
    if not steps:
        return Plan(Action.RECOVER, no_memory="no step is held in memory for every rank")
    return Plan(Action.MEMORY, max(steps))


def plan_roll_back(bad_step: int, reports: Mapping[int, MemoryReport], done_step: int,
                   sources: SourceFacts) -> Plan:
    """Go back to the newest own snapshot before ``bad_step`` that every rank holds, or load
    the checkpoint in place when that resumes sooner; restart when neither exists."""
    held = _common(r.own for r in reports.values()) or set()
    good = [s for s in held if s < bad_step]
    no_memory = None if good else f"no snapshot before step {bad_step} in memory"
    choice = sources.choose(max(good) if good else None, done_step, in_place=True)
    chosen = choice.chosen
    if chosen is None:
        return Plan(Action.RESTART, choice=choice, no_memory=no_memory)
    if chosen.kind == CHECKPOINT:
        return Plan(Action.LOAD, chosen.step, choice=choice, no_memory=no_memory)
    return Plan(Action.ROLL_BACK, chosen.step, choice=choice, no_memory=no_memory)
