"""Health on a real local Ray cluster: hangs, stragglers, bad losses, preemption, doctor.

Every fault is injected through ``fault.inject`` into the tiny GPT (FSDP2 over gloo);
the assertions read ``summary.json`` as a user or an outside check would.
"""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
from functools import partial

import pytest
from support import REPO, TINY, tiny_job

from raypod.api import run
from raypod.callbacks import Callback, StepReport

pytestmark = pytest.mark.slow


class Steps(Callback):
    def __init__(self) -> None:
        self.steps: list[StepReport] = []

    def after_step(self, report: StepReport) -> None:
        self.steps.append(report)


tiny = partial(tiny_job, name="health", max_steps=16)


@pytest.fixture(scope="module")
def baseline(ray_connected, tmp_path_factory):
    """The same job without faults: the digest every in-place recovery must reproduce."""
    return run(tiny(tmp_path_factory.mktemp("health-baseline"), "scaling.spares=0"), callbacks=[])


def test_preempted_rank_hands_over_then_a_hang_is_found_killed_and_recovered_in_place(ray_connected, baseline,
                                                                                     tmp_path):
    # Rank 1 is preempted at step 4 (SIGTERM, what a node's shutdown sends) and hands over;
    # the process that took its place hangs at step 9. hang_timeout_s stays 60: the hang is
    # declared hang_min_s after the last step, as the heartbeats show rank 1 inside step 9
    # while rank 0 waits for it.
    cfg = tiny(tmp_path, "fault.hang_min_s=3",
               "fault.inject=[{step: 4, rank: 1, kind: preempt}, {step: 9, rank: 1, kind: hang}]")
    steps = Steps()
    summary = run(cfg, callbacks=[steps])
    assert summary["status"] == "succeeded" and summary["final_step"] == 16
    preempt, hang = summary["events"]
    print("preempt event:", json.dumps(preempt))
    print("hang event:", json.dumps(hang))
    assert preempt["kind"] == "preempt" and preempt["rank"] == 1
    assert preempt["lost_steps"] == 0 and preempt["world_size_after"] == 2
    assert preempt["restored_from"].startswith("memory step")
    assert hang["kind"] == "hang" and hang["rank"] == 1 and hang["step"] == 9
    assert "fault.hang_factor, fault.hang_min_s): rank 1 stuck at step 9 in phase start" in hang["message"]
    # The normal in-place path (memory snapshot, spare), not a restart from storage.
    assert hang["restored_from"].startswith("memory step") and hang["lost_steps"] <= 1
    assert summary["world_sizes"] == [2, 2, 2]
    # Detected when the rule's stall has passed since the last step finished (when the hang
    # began): hang_min_s (3 s), or 10x the median step if that is longer (on 2 shared cores
    # the first steps, while the data streams and the spare start, take 0.5-1.7 s, not
    # tiny's steady 0.2 s), plus at most a heartbeat round and a poll. Resumed as soon as the
    # in-place recovery of a killed rank would: the same path, so the same time.
    times = [r.time_s for r in steps.steps if not r.replayed and r.step < hang["step"]]
    median = sorted(b - a for a, b in zip(times, times[1:], strict=False))[(len(times) - 2) // 2]
    rule = max(3.0, 10 * median)
    assert 2.5 <= hang["detected_s"] - hang["last_step_s"] <= rule + 3.0, (rule, times)
    assert 0 < hang["resumed_s"] - hang["detected_s"] <= 10.0
    assert summary["samples"] == {"consumed": 256, "duplicated": 0, "skipped": 0}
    assert summary["final_state_sha256"] == baseline["final_state_sha256"]


def test_collective_timeout_blames_the_hung_rank_not_the_one_that_raised(ray_connected, baseline, tmp_path):
    cfg = tiny(tmp_path, "fault.pg_timeout_s=5", "fault.hang_factor=0",  # no early hang verdict
               "fault.inject=[{step: 8, rank: 1, kind: hang}]")
    summary = run(cfg, callbacks=[])
    ev = summary["events"][0]
    print("collective timeout event:", json.dumps(ev))
    assert ev["kind"] == "hang" and ev["rank"] == 1 and ev["step"] == 8
    assert "a collective timed out after 5 s (fault.pg_timeout_s): rank 1 stuck" in ev["message"]
    assert ev["restored_from"].startswith("memory step") and summary["world_sizes"] == [2, 2]
    assert 4.5 <= ev["detected_s"] - ev["last_step_s"] <= 9.0  # hang_timeout_s is 60 here
    assert summary["final_state_sha256"] == baseline["final_state_sha256"]


def test_nan_loss_rolls_back_and_skips_one_batch(ray_connected, baseline, tmp_path):
    rec = Steps()
    cfg = tiny(tmp_path, "fault.inject=[{step: 9, rank: 0, kind: nan}]")
    summary = run(cfg, callbacks=[rec])
    assert summary["status"] == "succeeded" and summary["final_step"] == 16
    ev = summary["events"][0]
    print("nan event:", json.dumps(ev))
    assert ev["kind"] == "nan" and ev["step"] == 9 and ev["rank"] == 0
    assert ev["restored_from"] == "memory step 8" and ev["lost_steps"] == 0
    assert ev["detected_s"] < ev["resumed_s"]
    # Step 9's batch was never trained on: every other step's was, exactly once.
    assert [r.step for r in rec.steps] == [s for s in range(1, 17) if s != 9]
    assert summary["samples"] == {"consumed": 15 * 16, "duplicated": 0, "skipped": 0, "skipped_bad": 16}
    assert all(math.isfinite(r.metrics["loss"]) for r in rec.steps)
    assert rec.steps[-1].metrics["loss"] < rec.steps[0].metrics["loss"] - 1.0
    # Not the baseline's state: one batch fewer went in.
    assert summary["final_state_sha256"] != baseline["final_state_sha256"]
    assert json.loads((tmp_path / "health" / "bad_steps.json").read_text()) == {"steps": [9]}


def test_bad_step_budget_fails_the_job(ray_connected, tmp_path):
    from raypod.api import JobFailed

    cfg = tiny(tmp_path, "train.max_steps=8", "fault.max_bad_steps=0",
               "fault.inject=[{step: 4, rank: 1, kind: nan}]")
    with pytest.raises(JobFailed, match="fault.max_bad_steps=0 exhausted"):
        run(cfg, callbacks=[])


def test_slow_rank_is_reported_as_a_straggler(ray_connected, baseline, tmp_path):
    rec = Steps()
    cfg = tiny(tmp_path, "fault.straggler_steps=3",
               "fault.inject=[{step: 9, rank: 0, kind: slow, delay_s: 0.75}]")
    summary = run(cfg, callbacks=[rec])
    assert summary["status"] == "succeeded" and summary["failures"] == 0
    stragglers = [e for e in summary["events"] if e["kind"] == "straggler"]
    print("straggler events:", json.dumps(stragglers))
    assert len(stragglers) == 1
    ev = stragglers[0]
    assert ev["rank"] == 0 and ev["alert"] is True and ev["ratio"] > 2.0
    assert 11 <= ev["step"] <= 13 and ev["lost_steps"] == 0
    assert max(r.metrics["straggler_ratio"] for r in rec.steps) > 2.0
    assert summary["final_state_sha256"] == baseline["final_state_sha256"]  # only reported


def test_slow_rank_is_replaced_when_configured(ray_connected, baseline, tmp_path):
    cfg = tiny(tmp_path, "fault.straggler_steps=3", "fault.replace_stragglers=true",
               "fault.inject=[{step: 9, rank: 1, kind: slow, delay_s: 0.75}]")
    summary = run(cfg, callbacks=[])
    print("events:", json.dumps(summary["events"]))
    [ev] = [e for e in summary["events"] if e["kind"] == "straggler"]  # throughput may alert too
    assert ev["kind"] == "straggler" and ev["rank"] == 1 and ev["lost_steps"] == 0
    assert ev["restored_from"].startswith("memory step")
    assert summary["world_sizes"] == [2, 2] and summary["final_step"] == 16
    assert summary["final_state_sha256"] == baseline["final_state_sha256"]


def _doctor(ray_cluster, *args: str) -> subprocess.CompletedProcess:
    env = dict(ray_cluster["env"], RAY_ADDRESS=ray_cluster["address"],
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "raypod.cli", "doctor", *args], env=env,
                          capture_output=True, text=True, timeout=180, cwd=REPO)


def test_doctor_passes_on_a_healthy_cluster(ray_cluster, tmp_path):
    out = _doctor(ray_cluster, str(TINY), "--set", f"checkpoint.storage={tmp_path}")
    assert out.returncode == 0, out.stdout + out.stderr
    for check in ("torch", "devices", "storage", "allreduce"):
        assert check in out.stdout
    assert "MB/s" in out.stdout and "FAIL" not in out.stdout


@pytest.fixture
def unwritable_storage(tmp_path):
    """A storage path nobody can write: under a read-only folder, or (as root, who may write
    there anyway) under a plain file."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        (locked / "probe").mkdir()
    except PermissionError:
        yield locked / "runs"
    else:
        (locked / "probe").rmdir()
        plain = tmp_path / "plain-file"
        plain.write_text("not a folder")
        yield plain / "runs"
    finally:
        locked.chmod(stat.S_IRWXU)


def test_doctor_names_the_failing_check(ray_cluster, unwritable_storage):
    out = _doctor(ray_cluster, str(TINY), "--set", f"checkpoint.storage={unwritable_storage}")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "fails check storage" in out.stderr and "is not writable" in out.stderr
    assert "FAIL: storage" in out.stdout


def test_unwritable_storage_is_refused_before_any_worker_starts(unwritable_storage):
    from raypod.config import ConfigError

    with pytest.raises(ConfigError, match="checkpoint.storage: .* is not writable"):
        run(tiny(unwritable_storage, "train.max_steps=4"), callbacks=[])


def test_job_refuses_nodes_that_fail_their_preflight(ray_connected, tmp_path):
    from raypod.api import JobFailed

    cfg = tiny(tmp_path, "train.max_steps=4", "doctor.min_allreduce_mb_s=1000000000.0")
    with pytest.raises(JobFailed, match="fails check allreduce: .* below doctor.min_allreduce_mb_s"
                                        ".* no other node is left"):
        run(cfg, callbacks=[])


def test_preflight_runs_before_every_job_and_is_cheap(ray_connected, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="raypod.driver")
    summary = run(tiny(tmp_path, "train.max_steps=2"), callbacks=[])
    assert summary["status"] == "succeeded"
    passed = [r.getMessage() for r in caplog.records if "pre-flight checks passed" in r.getMessage()]
    assert passed and "storage: writable" in passed[0] and "MB/s bus (gloo" in passed[0]
