"""A rank frozen with SIGSTOP on a real local Ray cluster: found within about a second,
killed, and recovered in place from memory, with no survivor process lost.

A frozen rank keeps its sockets open and answers nothing, not even its actor's ping
thread: what a dead NCCL peer or a hung kernel looks like. The driver's liveness probes
(``fault.silent_s``) find it; killing it closes its gloo sockets, which releases the
survivor blocked in a collective with it.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
from support import PidsAtFailure, job_pids, kill_stopped, run_faulted, tiny_job

from raypod.api import run

pytestmark = pytest.mark.slow

tiny = partial(tiny_job, name="freeze", max_steps=8)


@pytest.fixture(scope="module")
def baseline(ray_connected, tmp_path_factory):
    """The same job without faults: the digest the recovered runs must reproduce."""
    return run(tiny(tmp_path_factory.mktemp("freeze-baseline")), callbacks=[])


def run_frozen(step: int, tmp_path: Path) -> tuple[dict, dict, PidsAtFailure, float]:
    """The tiny job with rank 1 frozen at ``step``: its summary, its event, the pids at the
    failure, and how long after the freeze the driver declared it."""
    summary, ev, pids, detected = run_faulted(tiny(tmp_path, "checkpoint.memory_every_steps=1",
                                                   f"fault.inject=[{{step: {step}, rank: 1, kind: freeze}}]"))
    print(f"freeze at step {step}: detected {detected:.2f} s after the freeze, resumed "
          f"{ev['resumed_s'] - ev['detected_s']:.2f} s after that; event {json.dumps(ev)}")
    assert summary["status"] == "succeeded" and summary["final_step"] == 8 and summary["failures"] == 1
    assert ev["kind"] == "freeze" and ev["rank"] == 1 and ev["step"] == step
    assert "(fault.silent_s)" in ev["message"]
    return summary, ev, pids, detected


def test_frozen_rank_is_found_in_a_second_and_recovered_in_place(ray_connected, baseline, tmp_path):
    summary, ev, pids, detected = run_frozen(6, tmp_path)
    assert 0.9 <= detected <= 1.6  # fault.silent_s (1 s) plus at most a probe round and a poll
    assert ev["restored_from"] in ("memory step 5", "memory step 4") and ev["lost_steps"] <= 1
    # The kill released the survivor at once (the drain's interrupt would take 1 s, Ray's own
    # kill of a stopped process 5 s): measured 0.05 s.
    assert ev["recovery_phases_s"]["drain"] < 1.0
    assert summary["world_sizes"] == [2, 2]
    assert summary["final_state_sha256"] == baseline["final_state_sha256"]
    # Rank 0 survived: the same process re-joined the new group; rank 1 is the spare.
    after = job_pids(pids.job_dir)
    assert pids.pids[0]["attempt"] == 0 and after[0]["attempt"] == 1
    assert after[0]["pid"] == pids.pids[0]["pid"]
    assert after[1]["attempt"] == 1 and after[1]["pid"] != pids.pids[1]["pid"]


def test_a_freeze_in_the_first_steps_is_found_as_quickly(ray_connected, baseline, tmp_path):
    # Before three steps are timed the hang rules cannot act; the probes can.
    summary, ev, _, detected = run_frozen(2, tmp_path)
    assert 0.9 <= detected <= 1.6
    assert summary["final_state_sha256"] == baseline["final_state_sha256"]


def test_a_frozen_node_stops_every_rank_on_it_and_the_job_recovers(ray_connected, baseline, tmp_path):
    # One local node holds both ranks: both stop, no in-memory copy survives, the job
    # restarts from storage (the spare, not a rank, is never stopped).
    cfg = tiny(tmp_path, "fault.inject=[{step: 6, rank: 1, kind: freeze_node}]")
    try:
        summary = run(cfg, callbacks=[])
    finally:
        kill_stopped(cfg.job_dir)
    ev = summary["events"][0]
    print("freeze_node event:", json.dumps(ev))
    assert summary["status"] == "succeeded" and summary["final_step"] == 8
    assert ev["kind"] == "freeze_node" and ev["rank"] == 1 and ev["step"] == 6
    assert "also silent: rank(s) [0]" in ev["message"]
    assert summary["final_state_sha256"] == baseline["final_state_sha256"]


def test_a_rank_frozen_while_the_group_forms_is_found_in_about_a_second(ray_connected, baseline, tmp_path):
    # Rank 1 stops before the first rendezvous: rank 0 waits in it for a peer that never
    # comes. The driver's watch over the forming group finds it (not the store's 60 s
    # timeout), ends it, releases rank 0, and starts the group again.
    summary, ev, _, detected = run_faulted(tiny(tmp_path, "fault.inject=[{step: 1, rank: 1, kind: freeze, at: join}]"))
    print(f"freeze at join: detected {detected:.2f} s after the freeze; event {json.dumps(ev)}")
    assert summary["status"] == "succeeded" and summary["final_step"] == 8 and summary["failures"] == 1
    assert ev["kind"] == "unresponsive" and ev["rank"] == 1 and "while the group formed" in ev["message"]
    assert detected < 6.0, detected  # fault.silent_s, a confirming ping (3 s), a poll; 5.01 s seen on a loaded CI box
    assert summary["final_state_sha256"] == baseline["final_state_sha256"]
