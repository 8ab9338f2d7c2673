"""MLflow is set up after the job's first step, not during its start, and loses nothing by it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_mlflow_callback import finish, make_config, report

from raypod.callbacks import JobInfo
from raypod.tracking import MLflowCallback


def _ready(cb: MLflowCallback, timeout: float) -> bool:
    """Waits for the run without asking for it (``wait_run_id`` would set it up at once)."""
    return cb._sender is not None and cb._sender.run.ready.wait(timeout)


def test_run_is_set_up_at_the_first_step_and_keeps_what_came_before(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = make_config(tmp_path, uri, max_steps=2)
    cb = MLflowCallback(flush_interval_s=0.1, system_metrics=False, setup_delay_s=60)
    start = time.time() - 5.0
    cb.before_job(JobInfo(config=cfg, job_dir=cfg.job_dir, start_time=start))
    cb.after_state_change("scheduling", "running", 0.5)
    assert not _ready(cb, 0.5) and not (tmp_path / "mlflow.db").exists()  # the store is not opened
    cb.after_step(report(1))
    assert _ready(cb, 20)
    cb.after_step(report(2))
    cb.after_state_change("running", "finished", 3.0)
    finish(cb, cfg)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(cb.wait_run_id(1))
    assert run.info.start_time == int(start * 1000)  # the job's start, not the set-up's
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert run.data.tags["raypod.state"] == "finished" and run.data.params


def test_run_is_set_up_after_the_delay_or_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = make_config(tmp_path, f"sqlite:///{tmp_path}/a.db")
    late = MLflowCallback(flush_interval_s=0.1, system_metrics=False, setup_delay_s=0.3)
    late.before_job(JobInfo(config=cfg, job_dir=cfg.job_dir, start_time=time.time()))
    assert _ready(late, 20)  # no step came: set up once the delay passed
    late.close(5)
    cfg = make_config(tmp_path / "b", f"sqlite:///{tmp_path}/b.db")
    asked = MLflowCallback(flush_interval_s=0.1, system_metrics=False, setup_delay_s=600)
    asked.before_job(JobInfo(config=cfg, job_dir=cfg.job_dir, start_time=time.time()))
    assert asked.wait_run_id(20) is not None
    asked.close(5)


def test_mlflow_is_not_imported_while_the_job_starts(tmp_path: Path) -> None:
    code = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_mlflow_callback import make_config
from raypod.callbacks import JobInfo
from raypod.tracking import MLflowCallback
from pathlib import Path
cfg = make_config(Path({str(tmp_path)!r}), "sqlite:///{tmp_path}/m.db")
cb = MLflowCallback(system_metrics=False)
cb.before_job(JobInfo(config=cfg, job_dir=cfg.job_dir, start_time=time.time()))
time.sleep(1.0)
print("mlflow" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=str(Path(__file__).parents[3]))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_a_stopped_jobs_tracking_ends_within_rays_grace_while_the_store_still_opens(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """``ray job stop`` SIGKILLs the driver 3 s after its SIGTERM: a new SQLite store's schema
    migrations (seconds of CPU) must not hold the stopped job's summary past that."""
    import threading

    from raypod.driver import stop
    from raypod.tracking.identity import RunIdentity

    monkeypatch.chdir(tmp_path)
    opening = threading.Event()
    release = threading.Event()

    def slow_open(self, job):  # the store call that does not come back in time
        opening.set()
        release.wait(30)
        raise RuntimeError("store closed")

    real_open = RunIdentity.open_run
    monkeypatch.setattr(RunIdentity, "open_run", slow_open)
    cfg = make_config(tmp_path, f"sqlite:///{tmp_path}/mlflow.db", max_steps=100)
    cb = MLflowCallback(flush_interval_s=0.1, system_metrics=False, setup_delay_s=60)
    cb.before_job(JobInfo(config=cfg, job_dir=cfg.job_dir, start_time=time.time()))
    cb.after_step(report(1))  # the first step: the run is set up now
    assert opening.wait(10)
    cb.after_step(report(2))  # queued while the thread is inside the store's first call
    assert cb._sender is not None
    thread = cb._sender._thread
    assert stop.time_left() is None and stop.grace_s() == 3.0
    monkeypatch.setattr(stop, "_stopped_at", time.monotonic())  # what the SIGTERM handler records
    try:
        t0 = time.monotonic()
        summary: dict = {"status": "stopped"}
        cb.before_summary(summary)
        finish(cb, cfg, "stopped")
        took = time.monotonic() - t0
        assert took <= stop.grace_s() - stop.STOP_MARGIN_S + 0.3, took
        assert "mlflow_run_id" in summary and summary["mlflow_run_id"] is None
        assert "the tracking store was still being opened" in caplog.text
        # Nothing is lost although the store call never returns (Ray's SIGKILL ends the
        # process): the driver that stopped spooled its points and its end itself, and the
        # job's next driver sends them.
        monkeypatch.setattr(RunIdentity, "open_run", real_open)
        monkeypatch.setattr(stop, "_stopped_at", None)
        again = MLflowCallback(flush_interval_s=0.1, system_metrics=False)
        again.before_job(JobInfo(config=cfg, job_dir=cfg.job_dir, start_time=time.time()))
        finish(again, cfg, "succeeded")
    finally:
        release.set()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    assert len(runs) == 1
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    assert steps == [1, 2], steps
    # The stopped driver's thread, once its call returns, leaves the handed-over work alone.
    assert thread is not None
    thread.join(10)
    assert not thread.is_alive()
    from raypod.tracking.spool import Spool, spool_dir

    spool = Spool(spool_dir(cfg.job_dir, cfg.name))
    assert not spool.segments() and not spool.finishes()
