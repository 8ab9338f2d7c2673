"""The chaos run's plan (kind, rank and place in the step, seeded), which faults leave no copy
in memory, and the survivor check on pid notes written by hand (no Ray)."""

from __future__ import annotations

import os
import tempfile
from collections import Counter

import pytest

from raypod.bench.chaos import (
    GROUP_FORMING,
    SurvivorWatch,
    fault_kinds,
    fault_positions,
    lost_in,
    memory_impossible,
    plan_faults,
    process_alive,
    rank_holders,
    rank_nodes,
    survivors_lost,
)
from raypod.callbacks import FailureEvent, JobInfo
from raypod.config import FaultInjection
from raypod.storage import write_json_atomic
from raypod.worker.injector import pid_dir


def test_positions_are_those_the_validator_takes_for_each_kind():
    for kind in fault_kinds():
        places = fault_positions(kind)
        assert "step" in places and not set(places) & GROUP_FORMING
        for at in places:
            FaultInjection(step=1, rank=0, kind=kind, at=at)
    assert fault_positions("slow") == ["step"] and fault_positions("nan") == ["step"]
    assert "replica" in fault_positions("freeze_node") and "replica" not in fault_positions("exception")
    assert "forward" in fault_positions("hang")


def test_plan_draws_where_in_the_step_each_fault_fires_and_is_reproducible():
    plan = plan_faults(50, 250, 2, seed=3)
    assert plan == plan_faults(50, 250, 2, seed=3)
    assert plan != plan_faults(50, 250, 2, seed=4)
    for f in plan:
        assert f["at"] in fault_positions(f["kind"])
        FaultInjection.model_validate(f)
    mid_step = Counter(f["at"] for f in plan if f["at"] != "step")
    # Over 50 faults every place inside a step is drawn at least once.
    assert set(mid_step) == {"forward", "backward", "optimizer", "replica"}


def test_rank_layout_is_contiguous_per_node():
    assert rank_nodes(2, 2) == [0, 1]
    assert rank_nodes(4, 2) == [0, 0, 1, 1]
    assert rank_nodes(3, 2) == [0, 0, 1]
    assert rank_nodes(2, 1) == [0, 0] == rank_nodes(2, 0)


def test_memory_is_impossible_only_where_a_lost_rank_takes_its_replica_holder_with_it():
    plan = [{"step": 5, "rank": 0, "kind": "freeze_node", "at": "step"},
            {"step": 9, "rank": 1, "kind": "kill", "at": "replica"},
            {"step": 13, "rank": 1, "kind": "nan", "at": "step"}]
    assert memory_impossible(plan, 2, 2) == []  # one rank per node: the other node holds the copy
    assert memory_impossible(plan, 4, 2) == []  # two per node, replicas on the other node
    assert memory_impossible(plan, 2, 1) == [plan[0]]  # one node: a frozen node takes both ranks
    alone = [{"step": 5, "rank": 0, "kind": "kill", "at": "step"}, {"step": 9, "rank": 0, "kind": "slow", "at": "step"}]
    assert memory_impossible(alone, 1, 1) == alone[:1]  # one rank has no peer
    # Three ranks on two nodes: rank 1's holder (rank 0) is on its own node.
    assert memory_impossible([{"step": 5, "rank": 1, "kind": "freeze_node", "at": "step"}], 3, 2)


NOTES = {"A": {0: {"rank": 0, "pid": 100, "attempt": 2, "started": "7"},
               1: {"rank": 1, "pid": 50, "attempt": 0, "started": "1"}},  # rank 1 was here, attempt 0
         "B": {1: {"rank": 1, "pid": 200, "attempt": 2, "started": "8"},
               2: {"rank": 2, "pid": 60, "attempt": 1, "started": "2"}}}  # a rank of a larger group


def test_holders_are_the_newest_attempts_ranks_with_their_node():
    holders = rank_holders(NOTES)
    assert {r: (n["pid"], n["node"]) for r, n in holders.items()} == {0: (100, "A"), 1: (200, "B")}
    assert rank_holders({}) == {}


def test_a_failure_loses_its_target_rank_and_a_frozen_nodes_ranks():
    holders = {0: {"pid": 1, "node": "A"}, 1: {"pid": 2, "node": "A"}, 2: {"pid": 3, "node": "B"}}
    assert lost_in("kill", 1, holders) == {1}
    assert lost_in("freeze", 0, holders) == {0}
    assert lost_in("freeze_node", 0, holders) == {0, 1}
    assert lost_in("freeze_node", 2, holders) == {2}
    assert lost_in("hang", None, holders) == set()


def test_survivors_must_be_alive_and_hold_a_rank_after_the_recovery():
    before = {0: {"pid": 100, "started": "7", "node": "A"}, 1: {"pid": 200, "started": "8", "node": "B"}}
    spare = {"pid": 300, "started": "9", "node": "B"}
    alive = {(100, "7"), (200, "8"), (300, "9")}
    is_alive = lambda pid, started: (pid, started) in alive  # noqa: E731
    assert survivors_lost(before, {0}, {0: spare, 1: before[1]}, is_alive) == []
    # Rank 1 survived the failure of rank 0 but was replaced as well: its process holds no rank.
    gone = survivors_lost(before, {0}, {0: spare, 1: {"pid": 400, "started": "3"}}, is_alive)
    assert [(x["rank"], x["why"]) for x in gone] == [(1, "holds no rank")]
    alive.discard((200, "8"))
    gone = survivors_lost(before, {0}, {0: spare, 1: before[1]}, is_alive)
    assert [(x["rank"], x["pid"], x["why"]) for x in gone] == [(1, 200, "process gone")]
    # A pid taken over by another process (another start time) is not the survivor.
    assert survivors_lost(before, {0}, {0: spare, 1: {**before[1], "started": "99"}},
                          lambda pid, started: True)[0]["why"] == "holds no rank"


def test_process_alive_knows_this_process_by_its_start_time():
    with open(f"/proc/{os.getpid()}/stat") as f:
        started = f.read().rsplit(")", 1)[1].split()[19]
    assert process_alive(os.getpid(), started)
    assert not process_alive(os.getpid(), str(int(started) + 1))
    assert not process_alive(2 ** 22 + 12345, None)  # above any pid_max: no such process


def _note(job_dir: str, node: str, rank: int, pid: int, attempt: int) -> None:
    write_json_atomic(os.path.join(pid_dir(job_dir, node), f"{rank}.json"),
                      {"rank": rank, "pid": pid, "attempt": attempt, "started": str(pid)})


def test_the_watch_reads_the_pid_notes_at_each_failure_and_checks_after_its_recovery(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # pid_dir's root
    job_dir = str(tmp_path / "job")
    alive = {100, 200, 300}
    watch = SurvivorWatch(alive=lambda pid, started: pid in alive and started == str(pid))
    watch.before_job(JobInfo(config=None, job_dir=job_dir, start_time=0.0))  # type: ignore[arg-type]
    _note(job_dir, "A", 0, 100, 0)
    _note(job_dir, "B", 1, 200, 0)
    # A frozen node A: rank 0 is lost, rank 1 (node B) lives on; a spare on B takes rank 0.
    freeze = FailureEvent(kind="freeze_node", step=5, rank=0, detected_s=1.0)
    watch.after_failure(freeze)
    alive.discard(100)
    _note(job_dir, "B", 0, 300, 1)
    _note(job_dir, "B", 1, 200, 1)
    watch.after_recovery(freeze)
    assert watch.books()["survivor_processes_lost"] == 0 and watch.checked == 1
    # An alert interrupted nothing: no check.
    watch.after_failure(FailureEvent(kind="straggler", step=7, rank=1, detected_s=2.0, extra={"alert": True}))
    assert watch.pending == []
    # A kill of rank 0 that took rank 1's process too: one survivor lost.
    kill = FailureEvent(kind="kill", step=9, rank=0, detected_s=3.0)
    watch.after_failure(kill)
    alive -= {200, 300}
    alive.add(400)
    _note(job_dir, "A", 0, 400, 2)
    _note(job_dir, "A", 1, 500, 2)
    watch.after_recovery(kill)
    books = watch.books()
    assert books["survivor_processes_lost"] == 1 and books["survivor_checks"] == 2
    assert books["survivors_lost"][0] == {"rank": 1, "pid": 200, "node": "B", "why": "process gone",
                                          "failure": "kill at step 9"}
    # A failure never followed by a recovery is counted at the end.
    watch.after_failure(FailureEvent(kind="hang", step=11, rank=1, detected_s=4.0))
    watch.after_job({}, "")
    assert watch.books()["survivor_checks_missing"] == 1


def test_a_failure_without_pid_notes_is_a_missing_check(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    watch = SurvivorWatch(alive=lambda pid, started: True)
    watch.before_job(JobInfo(config=None, job_dir=str(tmp_path / "job"), start_time=0.0))  # type: ignore[arg-type]
    watch.after_failure(FailureEvent(kind="kill", step=1, rank=0, detected_s=0.5))  # no notes to read
    assert watch.pending == [] and watch.books()["survivor_checks_missing"] == 1


@pytest.mark.parametrize("nodes", [0, -1])
def test_a_chaos_run_needs_a_node(nodes):
    from raypod.bench.chaos import plan_jobs
    from raypod.config import ConfigError, load_config

    mlp = os.path.join(os.path.dirname(__file__), "..", "..", "..", "jobs", "configs", "mlp.yaml")
    with pytest.raises(ConfigError, match="one node or more"):
        plan_jobs(load_config(mlp), 2, 0, 4, None, None, "c", nodes=nodes)


def test_a_newer_checkpoint_chosen_over_an_older_snapshot_is_not_a_fall_back_to_storage():
    from raypod.bench.chaos import _checkpoint_chosen

    chosen = {"restored_from": "checkpoint step 10",
              "source_choice": {"chosen": "checkpoint", "memory_step": 6, "checkpoint_step": 10,
                                "est_memory_s": 1.2, "est_checkpoint_s": 0.5, "reason": "sooner"}}
    assert _checkpoint_chosen(chosen)
    # Estimates recorded to the millisecond: a checkpoint sooner by less than that reads as a tie.
    assert _checkpoint_chosen({**chosen, "source_choice": {**chosen["source_choice"], "est_memory_s": 0.5}})
    # No snapshot in memory at all, or memory cheaper but not used: storage was a fall-back.
    assert not _checkpoint_chosen({**chosen, "source_choice": {**chosen["source_choice"], "memory_step": None}})
    assert not _checkpoint_chosen({**chosen, "source_choice": {**chosen["source_choice"], "est_memory_s": 0.1}})
    assert not _checkpoint_chosen({"restored_from": "memory step 6", "source_choice": chosen["source_choice"]})
