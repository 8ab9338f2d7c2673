"""A job has one owner, and a user's stop is a stop (issue 19, items 1 and 6).

Real drivers on the session's ``ray start --head`` cluster (token auth on): two
``raypod run`` processes of the same job, Ctrl-C (SIGINT) to one, and ``ray job stop``
(SIGTERM, then SIGKILL after ``RAY_JOB_STOP_WAIT_TIME_S``, 3 s) of ``ray job submit``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from support import BIN, REPO, ray_job, ray_job_done, ray_job_status, ray_job_submit


def _sets(storage: Path, name: str, *extra: str) -> list[str]:
    sets = [f"checkpoint.storage={storage}", f"name={name}", "train.max_steps=3000",
            "checkpoint.every_steps=4", "fault.hang_timeout_s=60",
            f"mlflow.tracking_uri=sqlite:///{storage}/mlflow.db", *extra]
    return [a for s in sets for a in ("--set", s)]


def _wait_for_commit(job: Path, proc_alive, timeout: float = 240) -> None:
    """Until the job committed a checkpoint (so it trains, and it owns its folder) and named its
    MLflow run (the run is opened off the start, after the first step)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list(job.glob("checkpoints/step_*/manifest.json")) and (job / "mlflow_run_id").exists():
            return
        assert proc_alive(), "the driver ended before its first checkpoint"
        time.sleep(0.5)
    pytest.fail(f"no checkpoint committed under {job} in {timeout} s")


def _listing(job: Path) -> list[str]:
    """The job folder's files that a second driver could write (not the owner's checkpoints)."""
    return sorted(str(p.relative_to(job)) for p in job.rglob("*")
                  if p.is_file() and "checkpoints" not in p.parts and "mlflow_spool" not in p.parts)


def _check_stopped(storage: Path, name: str, signame: str) -> dict:
    """summary.json says stopped with a stop event; MLflow says KILLED, state stopped; no lease left."""
    from mlflow.tracking import MlflowClient

    summary = json.loads((storage / name / "summary.json").read_text())
    assert summary["status"] == "stopped", summary.get("error")
    stops = [e for e in summary["events"] if e["kind"] == "stop"]
    assert len(stops) == 1 and stops[0]["signal"] == signame
    assert "error" not in summary
    # The stop is what this checks. A loaded 2-core host can still make a rank miss its ping
    # for fault.silent_s right after a checkpoint write (a false `unresponsive`, recovered in
    # place: a known limit, see BENCHMARKS/notes); any other failure is a defect.
    others = [e["kind"] for e in summary["events"] if e["kind"] not in ("stop", "unresponsive")]
    assert others == [], others
    assert summary["final_step"] >= 4 and summary["committed_step"] >= 4
    run = MlflowClient(tracking_uri=f"sqlite:///{storage}/mlflow.db").get_run(summary["mlflow_run_id"])
    assert run.info.status == "KILLED"
    assert run.data.tags["raypod.state"] == "stopped"
    assert not list((storage / name / "lease").glob("*.json")), "the lease was not released"
    return summary


@pytest.mark.timeout(600)
def test_second_driver_refused_then_ctrl_c_stops_the_first(ray_cluster, tmp_path):
    env = dict(ray_cluster["env"], RAY_ADDRESS=ray_cluster["address"], PYTHONUNBUFFERED="1")
    cmd = [str(BIN / "raypod"), "run", "jobs/configs/tiny.yaml", "--quiet", *_sets(tmp_path, "owned")]
    out_a = open(tmp_path / "a.out", "w+")
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out_a, stderr=subprocess.STDOUT)
    try:
        job = tmp_path / "owned"
        _wait_for_commit(job, lambda: first.poll() is None)
        before = _listing(job)
        t0 = time.monotonic()
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        refused_s = time.monotonic() - t0
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, second.stderr
        assert lines[0].startswith(
            f"raypod: error: job 'owned' is already running: owned by driver pid {first.pid} on host "
            f"{socket.gethostname()} since "), lines[0]
        assert "lease renewed" in lines[0] and "stop it or wait for its lease to expire" in lines[0]
        assert _listing(job) == before  # the refused driver wrote nothing
        assert first.poll() is None  # and the owner trains on

        # Ctrl-C on the owner: a stop, not a failure.
        os.kill(first.pid, signal.SIGINT)
        t1 = time.monotonic()
        rc = first.wait(timeout=60)
        stop_s = time.monotonic() - t1
        out_a.seek(0)
        log = out_a.read()
        assert rc == 130, log[-3000:]
        stopped = [ln for ln in log.splitlines() if ln.startswith("raypod | job owned stopped at step")]
        assert len(stopped) == 1, log[-3000:]
        assert " by SIGINT; latest committed checkpoint: step " in stopped[0]
        assert "Traceback" not in log, log[-3000:]
        summary = _check_stopped(tmp_path, "owned", "SIGINT")
        print(f"refused in {refused_s:.1f} s; SIGINT to exit {stop_s:.2f} s; stopped at step "
              f"{summary['final_step']}")
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        out_a.close()


@pytest.mark.timeout(600)
def test_ray_job_stop_ends_the_job_as_stopped(ray_cluster, tmp_path):
    entry = ["python", "jobs/pretrain_gpt.py", "--config", "jobs/configs/tiny.yaml", "--quiet",
             *_sets(tmp_path, "to-stop")]
    job_id, out = ray_job_submit(ray_cluster, f"raypod-stop-{int(time.time())}", entry)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]

    def running() -> bool:
        return not ray_job_done(ray_job_status(ray_cluster, job_id))

    try:
        _wait_for_commit(tmp_path / "to-stop", running)
        t0 = time.monotonic()
        stop = ray_job(ray_cluster, "stop", job_id)
        stop_s = time.monotonic() - t0
        assert stop.returncode == 0, stop.stdout + stop.stderr
    finally:
        if running():
            ray_job(ray_cluster, "stop", job_id)
    logs = ray_job(ray_cluster, "logs", job_id)
    text = logs.stdout + logs.stderr
    stopped = [ln for ln in text.splitlines() if "raypod | job to-stop stopped at step" in ln]
    assert len(stopped) == 1 and " by SIGTERM; " in stopped[0], text[-4000:]
    assert "The process receives a SIGTERM" not in text and "Traceback" not in text, text[-4000:]
    summary = _check_stopped(tmp_path, "to-stop", "SIGTERM")
    # Within Ray's grace (RAY_JOB_STOP_WAIT_TIME_S, 3 s): the driver exited, it was not SIGKILLed.
    sup = Path(ray_cluster["temp_dir"]) / "session_latest" / "logs" / "jobs" / f"supervisor-{job_id}.log"
    sup_log = sup.read_text() if sup.exists() else ""
    assert "has been terminated gracefully with SIGTERM" in sup_log, sup_log[-2000:]
    print(f"ray job stop took {stop_s:.2f} s; stopped at step {summary['final_step']}")


@pytest.mark.parametrize("wait", ["get", "wait"])
def test_a_stop_signal_ends_the_drivers_wait_inside_ray(ray_connected, wait):
    """Outside its training loop (placing workers, recovering) the driver waits inside
    ``ray.get`` / ``ray.wait``; Ray runs the signal handler there and passes on only a
    ``KeyboardInterrupt`` (its ``check_signals``), so a stop must be one to end the wait: a
    ``ray job stop`` during a recovery used to go unanswered until Ray's SIGKILL."""
    import threading

    import ray

    from raypod.driver.stop import StopSignals

    @ray.remote(num_cpus=0)
    def busy() -> None:
        time.sleep(60)

    ref = busy.remote()
    signals = StopSignals().install()
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            if wait == "get":
                ray.get(ref, timeout=20)
            else:
                ray.wait([ref], timeout=20)
        took = time.monotonic() - t0
    finally:
        timer.cancel()
        signals.restore()
        ray.cancel(ref, force=True)
    assert signals.name == "SIGTERM" and took < 3.0, took
