"""Replica acknowledgements ride in the step results: one actor call per rank and step in
steady state, and an explicit ``wait_replicated`` only when no later result can carry one."""

from __future__ import annotations

from typing import Any

import pytest
from fakes import HEALTHY, FakeGroup, fake_driver

from raypod.driver import ledger as ledger_mod
from raypod.driver.controller import Driver
from raypod.driver.recovery_plan import Action, RecoveryFacts, SourceFacts, plan_recovery
from raypod.driver.state import StateKind
from raypod.worker import snapshot


@pytest.fixture
def healthy(tmp_path, monkeypatch):
    """A driver over the fake group with replica peers; ``waits`` records the explicit waits."""
    FakeGroup.reset(HEALTHY)
    waits: list[int] = []
    real = FakeGroup.submit_replica_wait
    monkeypatch.setattr(FakeGroup, "submit_replica_wait",
                        lambda self, step: (waits.append(step), real(self, step))[1])
    d = fake_driver(tmp_path, checkpoint={"memory_every_steps": 1})
    d.alive_nodes = lambda: {"n1", "n2"}
    yield d, waits
    FakeGroup.reset()


def _drive(d: Driver, limit: int = 500) -> None:
    for _ in range(limit):
        _, nxt = d.step()
        if nxt.is_terminal:
            return


def test_steady_state_sends_no_wait_and_one_fallback_for_the_last_step(healthy, monkeypatch):
    d, waits = healthy
    lead: list[int] = []
    submit = FakeGroup.submit_step

    def note(self: FakeGroup, step: int, snapshot: bool = True) -> None:
        lead.append(step - d.done_step)  # how far ahead of the last counted step it is queued
        submit(self, step, snapshot)

    monkeypatch.setattr(FakeGroup, "submit_step", note)
    _drive(d)
    assert d.state.kind is StateKind.FINISHED and d.done_step == 10
    assert waits == [10]  # every other step counted on the acknowledgement in the next result
    assert max(lead) == ledger_mod.STEPS_IN_FLIGHT == 3


def test_a_result_without_the_acknowledgement_gets_one_fallback(healthy, monkeypatch):
    d, waits = healthy
    results = FakeGroup._results

    def slow_round(self: FakeGroup, step: int, acked: tuple[int, ...] = ()) -> list[Any]:
        # Step 5's round is slower than the steps after it: no result acknowledges it.
        return results(self, step, tuple(s for s in acked if s != 5))

    monkeypatch.setattr(FakeGroup, "_results", slow_round)
    _drive(d)
    assert d.state.kind is StateKind.FINISHED and d.done_step == 10
    assert waits == [5, 10]  # once the steps queued after it had all returned, and the last step


def _with_results(d: Driver, *steps: int) -> None:
    """The ranks returned ``steps`` (each submitted with a snapshot), without acknowledgements."""
    for s in steps:
        d.policies.cadence.decide(s)
        for r in d.group._results(s):
            d.ledger.record(r)
    d.ledger.next_step = max(steps) + 1


def test_the_fallback_waits_for_later_results_and_goes_once_per_step_and_group(healthy):
    d, waits = healthy
    d.step()  # the group starts
    group = d.group
    _with_results(d, 1)
    d.ledger.next_step = 3  # step 2 is queued: its results will carry step 1's acknowledgement
    d.completion.replica_fallback(group)
    assert waits == []
    _with_results(d, 2)
    d.completion.replica_fallback(group)
    d.completion.replica_fallback(group)
    assert waits == [1]  # once, though step 1 still waits for it
    d.reset(0)  # a re-formed group: the same step may need its own fallback
    _with_results(d, 1)
    d.completion.replica_fallback(group)
    assert waits == [1, 1]


def test_a_late_acknowledgement_of_a_counted_step_is_not_kept():
    led = ledger_mod.StepLedger()
    led.done_step = 4
    led.ack_replica(0, 4)
    led.ack_replica(0, 5)
    assert dict(led.replica_acks) == {5: {0}}


def test_ranks_keep_every_step_the_driver_may_roll_back_to():
    # The driver counted step 5 and queued 6..8 (STEPS_IN_FLIGHT ahead); a rank that finished
    # them all still holds step 5, so a recovery now loses no counted step.
    assert snapshot.KEEP_STEPS >= ledger_mod.STEPS_IN_FLIGHT + 1
    store = snapshot.SnapshotStore()
    done = 5
    for s in range(1, done + ledger_mod.STEPS_IN_FLIGHT + 1):
        store.add_own(s, [])
    own = store.report().own
    assert done in own
    reports = {r: snapshot.MemoryReport(own=own, replicas={(r - 1) % 3: own}) for r in (0, 2)}
    facts = RecoveryFacts(world_size=3, lost=frozenset({1}), reports=reports, holders={1: 2}, twins=False,
                          finished=done, live_spares=1, sources=SourceFacts(None))
    plan = plan_recovery(facts, lambda n, lost, spares: None)
    assert plan.action is Action.MEMORY and plan.step == done
