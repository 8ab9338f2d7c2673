"""What the driver decides when a rank dies, hangs, must leave or a loss is bad:
:mod:`raypod.driver.recovery_plan` on its own (pure functions of the facts, no Ray)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from raypod.config import ScalingConfig
from raypod.driver import recovery_plan as rp
from raypod.driver.recovery_plan import Action, RecoveryFacts, SourceFacts
from raypod.policies.scaling import ScalingPolicy
from raypod.protocol import MemoryReport

RING = {0: 1, 1: 2, 2: 3, 3: 0}
"""Rank -> the rank holding its replica (a ring of 4)."""


def _reports(ranks, own, replicas=None) -> dict[int, MemoryReport]:
    """Every rank in ``ranks`` holds ``own`` and, for the rank whose replica it keeps, ``replicas``."""
    keeps = {holder: rank for rank, holder in RING.items()}
    return {r: MemoryReport(own=list(own), replicas={keeps[r]: list(own if replicas is None else replicas)})
            for r in ranks}


def _facts(lost, spares=1, own=(7, 8), replicas=None, finished=8, checkpoint=None, step_s=0.1,
           holders=None, **sources) -> RecoveryFacts:
    survivors = [r for r in range(4) if r not in lost]
    return RecoveryFacts(world_size=4, lost=frozenset(lost), reports=_reports(survivors, own, replicas),
                         holders=holders or {d: RING[d] for d in lost}, twins=False, finished=finished,
                         live_spares=spares, sources=SourceFacts(checkpoint, step_s=step_s, **sources))


def _shrink_to(min_workers=1, replicas=1):
    return ScalingPolicy(ScalingConfig(min_workers=min_workers, max_workers=4), replicas).shrink_to


def test_memory_held_by_survivors_and_the_replica_holder_recovers_in_place():
    plan = rp.plan_recovery(_facts({1}, checkpoint=4), _shrink_to())
    assert plan.action is Action.MEMORY and plan.step == 8
    assert plan.choice is not None and plan.choice.chosen.kind == "memory" and plan.no_memory is None
    assert plan.choice.record()["checkpoint_step"] == 4


def test_only_steps_every_rank_finished_are_restored():
    plan = rp.plan_recovery(_facts({1}, own=(7, 8, 9), finished=8), _shrink_to())
    assert plan.action is Action.MEMORY and plan.step == 8


def test_a_lost_replica_holder_leaves_the_checkpoint():
    # Rank 1's replica is on rank 2: losing both leaves only the persistent checkpoint.
    plan = rp.plan_recovery(_facts({1, 2}, spares=2, checkpoint=4), _shrink_to())
    assert plan.action is Action.LOAD and plan.step == 4 and plan.uses_checkpoint
    assert plan.lost_replica == 1 and "both lost" in plan.no_memory


def test_no_memory_and_a_shrink_restarts_from_the_checkpoint():
    # A shrink re-forms every rank anyway: the checkpoint is loaded by a new group.
    plan = rp.plan_recovery(_facts({1, 2}, spares=0, checkpoint=4), _shrink_to())
    assert plan.action is Action.RESTART and plan.uses_checkpoint and plan.step == 4
    # Too few spares but no shrink allowed: the lost ranks are replaced and the checkpoint loads in place.
    assert rp.plan_recovery(_facts({1, 2}, spares=0, checkpoint=4), _shrink_to(min_workers=4)).action is Action.LOAD


def test_too_few_spares_shrinks_in_memory():
    plan = rp.plan_recovery(_facts({1}, spares=0, checkpoint=4), _shrink_to())
    assert plan.action is Action.SHRINK and plan.step == 8 and plan.spares == 0 and plan.world_size == 3


def test_no_shrink_below_min_workers_or_on_hsdp_replaces_in_place():
    assert rp.plan_recovery(_facts({1}, spares=0), _shrink_to(min_workers=4)).action is Action.MEMORY
    assert rp.plan_recovery(_facts({1}, spares=0), _shrink_to(replicas=2)).action is Action.MEMORY


def test_no_survivor_restarts():
    lost = {0, 1, 2, 3}
    facts = RecoveryFacts(world_size=4, lost=frozenset(lost), reports={}, holders={d: RING[d] for d in lost},
                          twins=False, finished=8, live_spares=0, sources=SourceFacts(4))
    plan = rp.plan_recovery(facts, _shrink_to())
    assert plan.action is Action.RESTART and plan.step == 4
    nothing = rp.plan_recovery(RecoveryFacts(4, frozenset(lost), {}, {}, False, 8, 0, SourceFacts(None)),
                            _shrink_to())
    assert nothing.action is Action.RESTART and nothing.step is None and not nothing.uses_checkpoint


def test_a_newer_checkpoint_loads_in_place_when_it_resumes_sooner():
    # Memory holds step 1 only; checkpoint step 8 loads in 0.5 s: redoing 7 steps of 1 s costs more.
    plan = rp.plan_recovery(_facts({1}, own=(1,), finished=9, checkpoint=8, step_s=1.0, save_s=0.5), _shrink_to())
    assert plan.action is Action.LOAD and plan.step == 8
    assert plan.choice.record()["est_checkpoint_s"] == 1.5
    # Not in place (a shrink restarts every rank): the group start is part of the cost.
    slow = rp.plan_recovery(_facts({1}, spares=0, own=(1,), finished=9, checkpoint=8, step_s=1.0, save_s=0.5,
                                group_start_s=20.0), _shrink_to())
    assert slow.action is Action.SHRINK and slow.step == 1


def test_the_load_estimate_prefers_a_measured_load_then_a_save():
    assert SourceFacts(4).load_estimate() == rp.DEFAULT_LOAD_S
    assert SourceFacts(4, save_s=2.0).load_estimate() == 2.0
    assert SourceFacts(4, load_s=1.0, save_s=2.0).load_estimate() == 1.0


def test_hsdp_twins_restore_from_their_own_snapshots():
    facts = _facts({1}, replicas=[])  # nothing kept as replicas: the twin's own state is the copy
    twin = dataclasses.replace(facts, twins=True)
    assert rp.plan_recovery(facts, _shrink_to()).action is Action.FRESH  # no checkpoint either
    assert rp.plan_recovery(twin, _shrink_to()).action is Action.MEMORY


def test_nothing_to_restore_in_the_first_steps_starts_afresh_in_place():
    # A rank lost before any snapshot counted (step 1's acknowledgements ride in step 2's
    # results) and before any checkpoint: the survivors keep their processes and every rank
    # starts again from the initialised model, as a restart would, without new processes.
    plan = rp.plan_recovery(_facts({1}, own=(), finished=1), _shrink_to())
    assert plan.action is Action.FRESH and plan.step == 0 and not plan.uses_checkpoint
    assert plan.no_memory == "no finished step is held in memory by every rank"
    # With a checkpoint there is something to load; with too few spares and a shrink allowed
    # every rank is re-formed anyway: a restart.
    assert rp.plan_recovery(_facts({1}, own=(), finished=6, checkpoint=5), _shrink_to()).action is Action.LOAD
    assert rp.plan_recovery(_facts({1}, spares=0, own=(), finished=1), _shrink_to()).action is Action.RESTART


def test_a_second_ping_only_when_a_lost_rank_would_take_a_copy_with_it():
    holder = RING.get
    assert not rp.needs_second_ping({1}, set(), holder)
    assert rp.needs_second_ping({1}, {2}, holder)  # 2 holds 1's replica
    assert not rp.needs_second_ping({1}, {3}, holder)
    assert rp.keeps_survivors(4, True) and not rp.keeps_survivors(4, False) and not rp.keeps_survivors(0, True)


def test_hand_over_from_the_newest_step_held_for_every_rank():
    reports = _reports(range(4), (5, 6, 7))
    plan = rp.plan_hand_over({1}, reports, {1: 2}, done_step=6)
    assert plan.action is Action.MEMORY and plan.step == 6
    assert rp.plan_hand_over({1, 2}, reports, {1: 2, 2: 3}, done_step=6).action is Action.RECOVER
    assert rp.plan_hand_over({1}, _reports(range(4), ()), {1: 2}, done_step=6).action is Action.RECOVER


def test_roll_back_to_the_newest_snapshot_before_the_bad_step():
    reports = _reports(range(2), (4, 5, 6))
    plan = rp.plan_roll_back(6, reports, done_step=5, sources=SourceFacts(4))
    assert plan.action is Action.ROLL_BACK and plan.step == 5
    loaded = rp.plan_roll_back(6, _reports(range(2), ()), done_step=5, sources=SourceFacts(4))
    assert loaded.action is Action.LOAD and loaded.step == 4 and "no snapshot before step 6" in loaded.no_memory
    assert rp.plan_roll_back(6, _reports(range(2), ()), 5, SourceFacts(None)).action is Action.RESTART


def test_the_plan_imports_no_ray():
    code = "import raypod.driver.recovery_plan, sys; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_ranks_left_with_the_only_copy_of_a_state():
    ring = {0: 1, 1: 2, 2: 3, 3: 0}.get  # rank r's copy is held by r + 1
    # Rank 1 lost: 2 holds its replica, and 0's own copy was on 1.
    assert rp.sole_copies(4, {1}, ring) == {0, 2}
    assert rp.sole_copies(4, {1, 2}, ring) == {0, 3}
    assert rp.sole_copies(2, {1}, {0: 1, 1: 0}.get) == {0}
    assert rp.sole_copies(4, {1}, lambda r: None) == set()  # no copies kept: nothing to protect


def test_patience_is_what_the_way_back_without_the_rank_would_take_at_most_the_hang_timeout():
    # No checkpoint: every step since the start is redone after a group start.
    assert rp.patience_s(SourceFacts(None, step_s=0.1, group_start_s=4.0), 300, 600.0) == 34.0
    # A checkpoint at step 290: its load, 10 steps, a group start.
    assert rp.patience_s(SourceFacts(290, step_s=0.1, load_s=2.0, group_start_s=4.0), 300, 600.0) == 7.0
    # Never beyond fault.hang_timeout_s.
    assert rp.patience_s(SourceFacts(None, step_s=1.0, group_start_s=4.0), 10_000, 60.0) == 60.0
