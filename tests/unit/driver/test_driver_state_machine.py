"""The driver's state machine, one iteration at a time, with the fake worker group (tests/fakes.py)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from fakes import HEALTHY, OLD_SNAPSHOT, FakeGroup, NullRecipe, fake_driver

from raypod.config import JobConfig
from raypod.driver.controller import Driver
from raypod.driver.state import StateKind
from raypod.protocol import WorkerGroupProtocol


@pytest.fixture
def driver_factory(tmp_path):
    FakeGroup.reset()

    def make(**overrides: Any) -> Driver:
        return fake_driver(tmp_path, **overrides)

    yield make
    FakeGroup.reset()  # no scene or plan leaks into the next test


def _drive(d: Driver, limit: int = 500) -> list[tuple[str, str]]:
    seen = []
    for _ in range(limit):
        prev, nxt = d.step()
        if nxt is not prev:
            seen.append((prev.name, nxt.name))
        if nxt.is_terminal:
            break
    return seen


def test_the_fake_group_is_a_whole_worker_group(tmp_path):
    cfg = JobConfig.model_validate({"name": "fake", "checkpoint": {"storage": str(tmp_path)},
                                    "mlflow": {"enabled": False}})
    assert isinstance(FakeGroup(cfg, NullRecipe()), WorkerGroupProtocol)


def test_happy_path_states(driver_factory):
    d = driver_factory()
    assert d.state.kind is StateKind.SCHEDULING
    prev, nxt = d.step()
    assert (prev.kind, nxt.kind) == (StateKind.SCHEDULING, StateKind.RUNNING)
    assert d.group.world_size == 2
    transitions = _drive(d)
    assert transitions == [("running", "finishing"), ("finishing", "finished")]
    assert d.done_step == 10 and d.committed_step == 10


def test_failure_recovers_from_latest_checkpoint(driver_factory):
    d = driver_factory()
    FakeGroup.plan = {"fail_at": (6, 1)}
    transitions = _drive(d)
    assert ("running", "recovering") in transitions and ("recovering", "scheduling") in transitions
    assert transitions[-1] == ("finishing", "finished")
    assert FakeGroup.starts == [(2, None), (2, 4)]  # restarted from the step-4 checkpoint
    ev = d.acct.events[0]
    assert ev.kind == "worker_died" and ev.step == 6 and ev.lost_steps == 1
    assert ev.world_size_after == 2 and ev.resumed_s is not None


def test_injected_kill_is_named_and_fires_once(driver_factory):
    d = driver_factory(fault={"inject": [{"step": 6, "rank": 1, "kind": "kill"}]})
    FakeGroup.plan = {"fail_at": (6, 1)}
    _drive(d)
    assert d.acct.events[0].kind == "kill"
    assert d.fired == {0}
    assert len(d.acct.events) == 1  # did not fire again on the replay of step 6


def test_budget_exhausted_errors_and_writes_summary(driver_factory, tmp_path):
    d = driver_factory(fault={"max_failures": 1})
    FakeGroup.plan = {"fail_at": (6, 5)}
    summary = d.run()
    assert d.state.kind is StateKind.ERRORED
    assert "fault.max_failures=1 exhausted" in d.state.error
    on_disk = json.loads((tmp_path / "fake" / "summary.json").read_text())
    assert on_disk["status"] == "failed" and on_disk["failures"] == 2 == summary["failures"]
    assert on_disk["final_step"] == 5  # the last step trained; step 4 is the last committed
    assert on_disk["committed_step"] == 4


def test_setup_failure_goes_through_the_failure_policy(driver_factory):
    d = driver_factory()
    FakeGroup.plan = {"fail_start_attempt": 0}
    _drive(d)
    assert d.state.kind is StateKind.FINISHED
    assert d.acct.events[0].kind == "setup_failed"


def test_no_room_is_a_clear_error(driver_factory):
    d = driver_factory(scaling={"min_workers": 2, "schedule_timeout_s": 0.3})
    d.available_resources = lambda: {"CPU": 1.0}
    _drive(d)
    assert d.state.kind is StateKind.ERRORED
    assert "room for 1 ranks" in d.state.error and "min_workers is 2" in d.state.error


def test_summary_has_every_spec_field(driver_factory):
    d = driver_factory()
    FakeGroup.plan = {"fail_at": (6, 1)}
    s = d.run()
    for key in ("status", "final_step", "mlflow_run_id", "world_sizes", "failures", "events",
                "goodput", "wall_s", "productive_s", "samples", "final_state_sha256"):
        assert key in s
    assert s["status"] == "succeeded" and s["final_step"] == 10 and s["world_sizes"] == [2, 2]
    assert s["samples"] == {"consumed": 80, "duplicated": 0, "skipped": 0}
    ev = s["events"][0]
    for key in ("kind", "step", "detected_s", "resumed_s", "lost_steps", "world_size_after"):
        assert ev[key] is not None
    assert 0 < s["goodput"] <= 1


# ---- health: bad losses, hangs, preemption, pre-flight -----------------------------------


@pytest.fixture
def health_driver(driver_factory):
    def make(**overrides: Any) -> Driver:
        d = driver_factory(**overrides)
        FakeGroup.scene = HEALTHY
        d.alive_nodes = lambda: {"n1", "n2"}
        return d

    return make


def test_nan_loss_rolls_back_in_place_and_skips_the_batch(health_driver, tmp_path):
    d = health_driver()
    FakeGroup.plan = {"nan_at": (6, 1)}
    summary = d.run()
    assert summary["status"] == "succeeded" and summary["final_step"] == 10
    ev = summary["events"][0]
    assert ev["kind"] == "nan" and ev["step"] == 6 and ev["restored_from"] == "memory step 5"
    assert ev["lost_steps"] == 0 and ev["resumed_s"] >= ev["detected_s"]
    assert sorted(d.acct.step_s) == [1, 2, 3, 4, 5, 7, 8, 9, 10]  # step 6 never counted
    assert summary["samples"] == {"consumed": 72, "duplicated": 0, "skipped": 0, "skipped_bad": 8}
    assert FakeGroup.starts == [(2, None)]  # no restart: the group stayed
    assert json.loads((tmp_path / "fake" / "bad_steps.json").read_text()) == {"steps": [6]}


def test_a_resubmitted_job_does_not_train_a_skipped_batch(health_driver, tmp_path):
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "bad_steps.json").write_text(json.dumps({"steps": [3]}))
    d = health_driver()
    d.run()
    assert 3 not in d.acct.step_s and sorted(d.acct.step_s)[-1] == 10


def test_bad_step_budget_fails_the_job(health_driver):
    d = health_driver(fault={"max_bad_steps": 0})
    FakeGroup.plan = {"nan_at": (6, 1)}
    _drive(d)
    assert d.state.kind is StateKind.ERRORED and "fault.max_bad_steps=0 exhausted" in d.state.error


def test_hang_blames_the_rank_behind_and_recovers_it_in_place(health_driver):
    d = health_driver(fault={"hang_timeout_s": 0.3})
    # Steps 6 and 7 are in flight when it stalls; step 5 finished, but its replica acknowledgement
    # rides in step 6's results: it counts during the recovery, which restores step 5; the hang is
    # named at step 6, the step after the last one every rank finished.
    FakeGroup.plan = {"stall_from": 6}
    transitions = _drive(d)
    assert transitions[-1] == ("finishing", "finished")
    assert ("recovering", "running") in transitions and ("recovering", "scheduling") not in transitions
    ev = d.acct.events[0]
    assert ev.kind == "hang" and ev.rank == 1 and ev.step == 6
    assert "rank 1 stuck at step 6 in phase start" in ev.message
    assert ev.restored_from == "memory step 5" and ev.lost_steps == 0
    assert ("kill", [1]) in FakeGroup.calls and ("recover_in_place", [1], 5) in FakeGroup.calls
    # Rank 0 holds rank 1's replica and its own copy was on rank 1: the drain waits longer for it
    # (up to what a restart from scratch would take, here at most fault.hang_timeout_s).
    # (A loaded host can stall a later step past the 0.3 s as well: one drain per failure.)
    drains = [c for c in FakeGroup.calls if c[0] == "drain"]
    assert drains[0][1] == [0] and 0 < drains[0][2] <= 0.3 and len(drains) == len(d.acct.events)
    # The lost rank's slot becomes a spare only once a step after the restore point completed.
    refills = [c for c in FakeGroup.calls if c[0] == "refill_spares"]
    assert refills[0][1] == [("pg", 1)] and refills[0][2] > 5 and len(refills) <= len(d.acct.events)
    assert FakeGroup.calls.index(refills[0]) > FakeGroup.calls.index(("recover_in_place", [1], 5))


def test_a_hang_is_declared_after_hang_factor_steps_not_hang_timeout(health_driver):
    d = health_driver(fault={"hang_timeout_s": 60, "hang_min_s": 0.3})
    FakeGroup.plan = {"stall_from": 6}
    t0 = time.monotonic()
    transitions = _drive(d)
    assert transitions[-1] == ("finishing", "finished") and time.monotonic() - t0 < 10
    ev = d.acct.events[0]
    assert ev.kind == "hang" and ev.rank == 1 and ev.step == 6 and ev.restored_from == "memory step 5"
    assert "at least 0.3 s: fault.hang_factor, fault.hang_min_s): rank 1 stuck at step 6 in phase start" \
        in ev.message


@pytest.mark.parametrize("behind", [(1, "sync"), (5, "done")])
def test_a_wait_that_blames_no_training_rank_is_left_to_hang_timeout(health_driver, behind):
    # Rank 1 waiting for peers itself, or between steps (a save): not declared hung early.
    d = health_driver(fault={"hang_timeout_s": 1.5, "hang_min_s": 0.2})
    FakeGroup.plan = {"stall_from": 6, "behind": behind}
    _drive(d)
    ev = d.acct.events[0]
    assert ev.kind == "hang" and "no step finished for 1.5 s (fault.hang_timeout_s)" in ev.message
    assert FakeGroup.calls.count(("heartbeats",)) >= 2  # asked early, blamed no one, asked again


def test_preempted_rank_hands_over_with_no_lost_step(health_driver):
    d = health_driver()
    FakeGroup.plan = {"preempt_at": 4}
    transitions = _drive(d)
    assert ("running", "handing_over") in transitions and ("handing_over", "running") in transitions
    ev = d.acct.events[0]
    assert ev.kind == "preempt" and ev.rank == 1 and ev.lost_steps == 0
    replaced = [c for c in FakeGroup.calls if c[0] == "recover_in_place"]
    assert replaced and replaced[0][1] == [1] and ev.restored_from == f"memory step {replaced[0][2]}"
    # Every step the ranks finished before the hand-over counts (its acknowledgement was still to
    # ride in a later result) and is kept: the replacement starts after it, nothing is redone.
    flushed = [c for c in FakeGroup.calls if c[0] == "flush_replicas"]
    assert flushed and replaced[0][2] == flushed[0][1] > 4
    assert d.acct.samples() == {"consumed": 80, "duplicated": 0, "skipped": 0}
    assert d.failures == 0  # a hand-over is not a failure


def test_preflight_failure_excludes_the_node_and_places_again(health_driver):
    d = health_driver()
    FakeGroup.plan = {"preflight_fails_on": "n2"}
    transitions = _drive(d)
    assert transitions[:2] == [("scheduling", "recovering"), ("recovering", "scheduling")]
    assert d.state.kind is StateKind.FINISHED
    assert d.excluded_nodes == {"n2": "storage: '/x' is not writable"}
    assert d.acct.events[0].kind == "preflight" and "node n2 fails check storage" in d.acct.events[0].message
    assert d.group is None and FakeGroup.starts == [(2, None), (2, None)]


def test_preflight_failure_on_every_node_refuses_the_job(health_driver):
    d = health_driver()
    d.alive_nodes = lambda: {"n2"}
    FakeGroup.plan = {"preflight_fails_on": "n2"}
    _drive(d)
    assert d.state.kind is StateKind.ERRORED
    assert "fails check storage: '/x' is not writable" in d.state.error and "no other node" in d.state.error


def test_a_rank_lost_before_anything_was_kept_starts_afresh_in_place(health_driver):
    """Rank 1 dies in step 1: no snapshot counted, no checkpoint committed. The survivors keep
    their processes and every rank starts again from the initialised model (no group start)."""
    d = health_driver()
    FakeGroup.plan = {"fail_at": (1, 1)}
    summary = d.run()
    assert summary["status"] == "succeeded" and summary["final_step"] == 10
    [ev] = summary["events"]
    assert ev["restored_from"] == "scratch" and ev["lost_steps"] == 0 and "recovery_phases_s" in ev
    assert ev["source_choice"]["chosen"] is None
    assert ("load_in_place", [1], 0) in FakeGroup.calls
    assert FakeGroup.starts == [(2, None)]


def test_a_group_whose_start_failed_is_started_again_not_recovered_in_place(health_driver):
    # Its ranks may still be inside their set-up call: nothing is asked of them in place.
    d = health_driver()
    FakeGroup.plan = {"fail_start_attempt": 0}
    summary = d.run()
    assert summary["status"] == "succeeded" and summary["events"][0]["kind"] == "setup_failed"
    assert len(FakeGroup.starts) == 2 and not [c for c in FakeGroup.calls if c[0] == "load_in_place"]


def test_a_resumed_job_whose_start_failed_is_started_again_from_its_checkpoint(health_driver):
    # A checkpoint exists (step 8, from the job's earlier run): the plan would load it in place,
    # but the ranks may still be in their set-up call, where no reload reaches them.
    first = health_driver(train={"max_steps": 8})
    assert first.run()["committed_step"] == 8
    FakeGroup.starts, FakeGroup.calls = [], []
    d = health_driver(train={"max_steps": 12})
    FakeGroup.plan = {"fail_start_attempt": 0}
    summary = d.run()
    assert summary["status"] == "succeeded" and summary["events"][0]["kind"] == "setup_failed"
    assert FakeGroup.starts == [(2, 8), (2, 8)] and not [c for c in FakeGroup.calls if c[0] == "load_in_place"]


@pytest.mark.parametrize("fault", ["kill", "nan"])
def test_a_newer_checkpoint_is_loaded_in_place_over_an_older_snapshot(health_driver, fault):
    """Memory holds step 1 only, step 8 is committed: a failure at step 10 loads step 8 in
    place (no group restart) and the event records the decision."""
    d = health_driver(train={"max_steps": 12})
    FakeGroup.scene = OLD_SNAPSHOT
    FakeGroup.plan = {"fail_at": (10, 1)} if fault == "kill" else {"nan_at": (10, 1)}
    summary = d.run()
    assert summary["status"] == "succeeded" and summary["final_step"] == 12
    [ev] = summary["events"]
    # A kill: step 9 finished but never counted (its replica acknowledgement rides in step 10's
    # results), so nothing counted is lost; a bad loss at 10: step 9 counted and is redone.
    assert ev["restored_from"] == "checkpoint step 8" and ev["lost_steps"] == (0 if fault == "kill" else 1)
    assert ev["source_choice"]["chosen"] == "checkpoint" and ev["source_choice"]["memory_step"] == 1
    assert ("load_in_place", [1] if fault == "kill" else [], 8) in FakeGroup.calls
    assert FakeGroup.starts == [(2, None)]  # in place: the group was never started again
    assert d.load_s == 0.01  # the load just measured is the next estimate
    skipped_bad = {"skipped_bad": 8} if fault == "nan" else {}
    assert summary["samples"] == {"consumed": 96 - len(skipped_bad) * 8, "duplicated": 0, "skipped": 0,
                                  **skipped_bad}


# ---- the liveness watch: a silent rank is lost within fault.silent_s -------------------
@pytest.mark.parametrize("inject,kind", [([], "unresponsive"),
                                         ([{"step": 6, "rank": 1, "kind": "freeze"}], "freeze")])
def test_a_silent_rank_is_lost_after_silent_s_and_recovered_in_place(health_driver, inject, kind):
    # The hang rules are far off (30 s): only the unanswered probes can end the stall.
    d = health_driver(fault={"hang_timeout_s": 60, "hang_min_s": 30, "silent_s": 0.3, "inject": inject})
    FakeGroup.plan = {"stall_from": 6, "silent": 1}  # rank 1 stops inside step 6 (step 5 finished)
    transitions = _drive(d)
    assert transitions[-1] == ("finishing", "finished")
    assert ("recovering", "running") in transitions and ("recovering", "scheduling") not in transitions
    ev = d.acct.events[0]
    assert ev.kind == kind and ev.rank == 1 and ev.step == 6
    assert "no answer to a ping for 0.3 s (fault.silent_s)" in ev.message
    assert ev.detected_s - ev.last_step_s < 0.3 + 0.5  # silent_s, a probe round, the loop's poll
    assert ("kill", [1]) in FakeGroup.calls and ("recover_in_place", [1], 5) in FakeGroup.calls
    assert ev.restored_from == "memory step 5" and ev.lost_steps == 0


def test_a_slow_rank_that_answers_is_left_to_the_hang_rules(health_driver):
    d = health_driver(fault={"hang_timeout_s": 1.0, "hang_min_s": 30, "silent_s": 0.3})
    FakeGroup.plan = {"stall_from": 6}  # nothing arrives, but every rank answers its probes
    _drive(d)
    ev = d.acct.events[0]
    assert ev.kind == "hang" and "no step finished for 1 s (fault.hang_timeout_s)" in ev.message


def test_silent_s_zero_sends_no_probe(health_driver, monkeypatch):
    d = health_driver(fault={"silent_s": 0})
    probes: list[float] = []
    monkeypatch.setattr(FakeGroup, "probe", lambda self, every_s: probes.append(every_s) or {})
    assert _drive(d)[-1] == ("finishing", "finished")
    assert probes == []


def test_a_bad_loss_among_the_steps_a_recovery_counts_does_not_restore_past_it(health_driver):
    """Step 5 returns a NaN loss but cannot count yet (its replica acknowledgement rides in
    step 6's results), and rank 1 dies in step 6: the recovery must neither count step 5 nor
    restore memory step 5 (which holds the NaN update); it restarts from the checkpoint."""
    d = health_driver()
    FakeGroup.plan = {"nan_at": (5, 1), "fail_at": (6, 1)}
    summary = d.run()
    assert summary["status"] == "succeeded" and summary["final_step"] == 10
    ev = summary["events"][0]
    assert ev["step"] == 6 and ev["restored_from"] != "memory step 5"
    assert FakeGroup.starts[1][1] is None or FakeGroup.starts[1][1] < 5  # restarted before the NaN step
