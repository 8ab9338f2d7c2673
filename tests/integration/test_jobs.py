"""Whole jobs on a real local Ray cluster: FSDP2 over gloo, real parquet, real DCP checkpoints."""

from __future__ import annotations

import json
import time

import pytest
from support import ray_job, ray_job_done, ray_job_status, ray_job_submit, tiny_job

from raypod.api import JobFailed, run
from raypod.callbacks import Callback, StepReport
from raypod.progress import ProgressPrinter

pytestmark = pytest.mark.slow


class Recorder(Callback):
    def __init__(self) -> None:
        self.steps: list[StepReport] = []
        self.states: list[tuple[str, str]] = []

    def after_step(self, report: StepReport) -> None:
        self.steps.append(report)

    def after_state_change(self, previous: str, new: str, time_s: float) -> None:
        self.states.append((previous, new))


tiny = tiny_job


@pytest.fixture(scope="module")
def baseline(ray_connected, tmp_path_factory):
    """A fault-free 2-rank FSDP2 run of the tiny GPT, with a ``train_step`` call per rank and step
    (``train.step_window: false``): every test below that compares its state with it runs the
    default's step windows, so each also shows that both paths train the same state."""
    storage = tmp_path_factory.mktemp("baseline")
    rec = Recorder()
    summary = run(tiny(storage, "scaling.spares=0", "train.step_window=false"),
                  callbacks=[rec, ProgressPrinter(live=False)])
    return summary, rec


def test_tiny_fsdp_trains_and_loss_falls(baseline):
    summary, rec = baseline
    assert summary["status"] == "succeeded" and summary["final_step"] == 20
    assert summary["world_sizes"] == [2] and summary["failures"] == 0
    losses = [r.metrics["loss"] for r in rec.steps]
    assert [r.step for r in rec.steps] == list(range(1, 21))
    assert losses[0] > 5.0  # about ln(256) = 5.55 at the start
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0
    assert summary["samples"] == {"consumed": 320, "duplicated": 0, "skipped": 0}
    assert len(summary["final_state_sha256"]) == 64
    assert ("finishing", "finished") in rec.states


def test_killed_worker_recovers_in_place(ray_connected, baseline, tmp_path):
    """A dead rank is replaced by the warm spare; its shard comes from its peer's memory. Before
    it, at step 7, rank 0's step raised: it keeps its process and the group resumes from memory."""
    cfg = tiny(tmp_path, "fault.inject=[{step: 7, rank: 0, kind: exception}, {step: 12, rank: 1, kind: kill}]")
    summary = run(cfg, callbacks=[ProgressPrinter(live=False)])
    on_disk = json.loads((tmp_path / "it" / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["status"] == "succeeded" and summary["final_step"] == 20
    assert summary["failures"] == 2 and summary["world_sizes"] == [2, 2, 2]
    raised, ev = summary["events"]
    assert raised["kind"] == "exception" and raised["step"] == 7 and raised["rank"] == 0
    assert raised["restored_from"].startswith("memory") and raised["lost_steps"] <= 1
    assert ev["kind"] == "kill" and ev["step"] == 12 and ev["rank"] == 1
    assert ev["restored_from"] in ("memory step 11", "memory step 10")  # not from storage
    assert ev["lost_steps"] <= 1 and ev["world_size_after"] == 2
    assert 0 < ev["last_step_s"] <= ev["detected_s"] < ev["resumed_s"] < summary["wall_s"]
    assert 0 < summary["goodput"] <= 1 and 0 < summary["productive_s"] < summary["wall_s"]
    assert summary["samples"] == {"consumed": 320, "duplicated": 0, "skipped": 0}
    # Restoring from peers' memory gives bit-identical state to the run without faults.
    assert summary["final_state_sha256"] == baseline[0]["final_state_sha256"]


def test_windows_opened_through_the_node_agent_train_the_same_state(ray_connected, baseline, tmp_path, caplog):
    """``train.window_agents_from=2``: the node's agent opens both ranks' windows and streams
    their results up in one list per step (what a job of 64 ranks or more does), across the
    saves every 5 steps (a window ends before each; the next opens after it) and a kill at
    step 12, whose regroup goes through the agent too."""
    cfg = tiny(tmp_path, "train.window_agents_from=2", "fault.inject=[{step: 12, rank: 1, kind: kill}]")
    with caplog.at_level("INFO", logger="raypod.driver"):
        summary = run(cfg, callbacks=[])
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("step windows: 2 of 2 ranks' windows opened through 1 node agent") for m in lines)
    assert any(m.startswith("regroup: 2 of 2 ranks called through 1 node agent") for m in lines)
    assert summary["status"] == "succeeded" and summary["final_step"] == 20 and summary["failures"] == 1
    ev = summary["events"][0]
    assert ev["kind"] == "kill" and ev["restored_from"].startswith("memory") and ev["lost_steps"] <= 1
    assert summary["samples"] == {"consumed": 320, "duplicated": 0, "skipped": 0}
    assert summary["final_state_sha256"] == baseline[0]["final_state_sha256"]


def test_rank_and_replica_holder_lost_falls_back_to_checkpoint(ray_connected, baseline, tmp_path):
    """Both ranks die at once: no in-memory copy survives, so the last persistent one is used."""
    cfg = tiny(tmp_path, "fault.inject=[{step: 12, rank: 0, kind: kill}, {step: 12, rank: 1, kind: kill}]")
    summary = run(cfg, callbacks=[])
    assert summary["status"] == "succeeded" and summary["final_step"] == 20
    ev = summary["events"][0]
    # The step-10 save may still be in flight (async) when step 12 fails; then step 5 is used.
    assert ev["restored_from"] in ("checkpoint step 10", "checkpoint step 5")
    # Steps counted before the failure and thrown away. Step 10 counts once step 11's results
    # (which carry step 10's replica acknowledgements) arrived from both ranks, and step 11 only
    # once its replicas were in place; a rank's step-11 reply can die with its process (the
    # kill ends it as step 12 starts, before Ray sent the reply: a loaded host), and then only
    # step 9 counted.
    assert 9 <= ev["lost_steps"] + int(ev["restored_from"].split()[-1]) <= 11
    assert summary["samples"] == {"consumed": 320, "duplicated": 0, "skipped": 0}
    assert summary["final_state_sha256"] == baseline[0]["final_state_sha256"]


def test_newer_checkpoint_beats_an_older_snapshot(ray_connected, baseline, tmp_path):
    """Snapshots every 14 steps, checkpoints every 5, a kill at step 13: loading the step-10
    checkpoint in place (survivor and spare) redoes 2 steps where memory step 1 would redo 11.
    With a ``train_step`` call per rank and step (``train.step_window: false``): that path's
    recovery."""
    cfg = tiny(tmp_path, "checkpoint.memory_every_steps=14", "fault.inject=[{step: 13, rank: 1, kind: kill}]",
               "train.step_window=false")
    summary = run(cfg, callbacks=[])
    assert summary["status"] == "succeeded" and summary["final_step"] == 20
    [ev] = summary["events"]
    # The step-10 save may still be in flight (async) when step 13 fails; then step 5 is used.
    assert ev["restored_from"] in ("checkpoint step 10", "checkpoint step 5"), ev
    assert ev["lost_steps"] == 12 - int(ev["restored_from"].split()[-1])
    choice = ev["source_choice"]
    assert choice["chosen"] == "checkpoint" and choice["memory_step"] == 1
    assert choice["checkpoint_step"] == int(ev["restored_from"].split()[-1])
    assert choice["est_checkpoint_s"] < choice["est_memory_s"]
    # In place: the survivor kept its process, the spare took rank 1 (no group restart).
    assert summary["world_sizes"] == [2, 2] and "rank_restore" in ev["recovery_phases_s"]
    assert summary["samples"] == {"consumed": 320, "duplicated": 0, "skipped": 0}
    assert summary["final_state_sha256"] == baseline[0]["final_state_sha256"]


def test_restart_from_checkpoint_without_memory_snapshots(ray_connected, baseline, tmp_path):
    """With in-memory snapshots off, a kill restarts every rank from the persistent checkpoint."""
    cfg = tiny(tmp_path, "checkpoint.memory_every_steps=0", "scaling.spares=0",
               "fault.inject=[{step: 12, rank: 1, kind: kill}]")
    summary = run(cfg, callbacks=[])
    ev = summary["events"][0]
    assert ev["kind"] == "kill" and ev["restored_from"] in ("checkpoint step 10", "checkpoint step 5")
    # Steps counted before the failure and thrown away: through step 11, or step 10 when the
    # failure was seen before step 11's results were counted (a loaded host).
    restored = int(ev["restored_from"].split()[-1])
    assert 10 - restored <= ev["lost_steps"] <= 11 - restored
    assert summary["world_sizes"] == [2, 2] and summary["final_step"] == 20
    assert summary["final_state_sha256"] == baseline[0]["final_state_sha256"]


def test_failure_budget_fails_cleanly(ray_connected, tmp_path):
    cfg = tiny(tmp_path, "train.max_steps=8", "fault.max_failures=0", "scaling.spares=0",
               "fault.inject=[{step: 3, rank: 0, kind: exception}]")
    with pytest.raises(JobFailed, match="fault.max_failures=0 exhausted") as e:
        run(cfg, callbacks=[])
    summary = json.loads((tmp_path / "it" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failures"] == 1
    assert summary["events"][0]["kind"] == "exception" and summary["events"][0]["step"] == 3
    assert "InjectedFault" in summary["error"] and e.value.summary["status"] == "failed"


def test_resume_at_another_world_size(ray_connected, tmp_path):
    first = run(tiny(tmp_path, "train.max_steps=8", "checkpoint.every_steps=4", "scaling.spares=0"), callbacks=[])
    assert first["final_step"] == 8
    rec = Recorder()
    cfg = tiny(tmp_path, "train.max_steps=12", "checkpoint.every_steps=4", "scaling.min_workers=3",
               "scaling.max_workers=3", "scaling.spares=0")
    second = run(cfg, callbacks=[rec])
    assert second["resumed_from_step"] == 8 and second["world_sizes"] == [3]
    assert [r.step for r in rec.steps] == [9, 10, 11, 12]
    assert rec.steps[0].metrics["loss"] < 5.0  # continues the trained model, not from scratch
    assert second["samples"] == {"consumed": 64, "duplicated": 0, "skipped": 0}
    manifests = sorted((tmp_path / "it" / "checkpoints").glob("*/manifest.json"))
    assert json.loads(manifests[-1].read_text())["world_size"] == 3


@pytest.mark.parametrize("strategy", ["ddp", "hsdp"])
def test_other_strategies(ray_connected, tmp_path, strategy):
    cfg = tiny(tmp_path, f"parallel.strategy={strategy}", "parallel.replicas=2",
               "train.max_steps=6", "checkpoint.every_steps=3", "scaling.spares=0")
    summary = run(cfg, callbacks=[])
    assert summary["status"] == "succeeded" and summary["final_step"] == 6


@pytest.mark.timeout(600)
def test_ray_job_submit(ray_cluster, tmp_path):
    """What a user does: ``ray job submit`` of the shipped script, token auth on."""
    entry = ["python", "jobs/pretrain_gpt.py", "--config", "jobs/configs/tiny.yaml",
             "--set", "train.max_steps=10", "--set", f"checkpoint.storage={tmp_path}",
             "--set", "name=submitted", "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    job_id, out = ray_job_submit(ray_cluster, f"raypod-test-{int(time.time())}", entry)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    deadline, status = time.time() + 240, ""
    while time.time() < deadline and not ray_job_done(status := ray_job_status(ray_cluster, job_id)):
        time.sleep(0.5)
    final = ray_job(ray_cluster, "status", job_id)  # what the user's CLI says
    out = ray_job(ray_cluster, "logs", job_id)
    logs = out.stdout + out.stderr
    if status != "SUCCEEDED":
        ray_job(ray_cluster, "stop", job_id)
    assert status == "SUCCEEDED", f"status: {status}\nlogs:\n{logs[-4000:]}"
    assert "succeeded" in (final.stdout + final.stderr).lower(), final.stdout + final.stderr
    assert "job submitted succeeded" in logs
    summary = json.loads((tmp_path / "submitted" / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["final_step"] == 10
    assert summary["mlflow_run_id"]
