"""raypod's MLflow tracking against a real ``mlflow server`` (SQLite backend, on loopback).

The session fixture ``mlflow_server`` (tests/conftest.py) starts the server as a
subprocess in its own process group and always stops it. Whole raypod jobs on the
session's real Ray cluster log into it: an injected kill still gives one run with one
point per step, and a resubmission with more steps continues that run. Then the
server is stopped mid-run and started again on the same port and database, and no
point is lost.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import MlflowServer
from support import TINY, tiny_job

from raypod.callbacks import FailureEvent, JobInfo, StepReport
from raypod.config import load_config

EXPERIMENT = "raypod-it"

pytestmark = pytest.mark.slow


def _client(server: MlflowServer):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=server.uri)


def _steps(client: Any, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _tiny(storage: Path, server: MlflowServer, *overrides: str):
    return tiny_job(storage, f"mlflow.tracking_uri={server.uri}", f"mlflow.experiment={EXPERIMENT}",
                    *overrides, name="mlflow-it", max_steps=16, mlflow=True)


@pytest.fixture(scope="module")
def killed_job(ray_connected, mlflow_server, tmp_path_factory):
    """The tiny GPT for 16 steps with rank 1 killed at step 8, logged to the server."""
    from raypod.api import run
    from raypod.tracking import MLflowCallback

    storage = tmp_path_factory.mktemp("mlflow-job")
    cfg = _tiny(storage, mlflow_server, "fault.inject=[{step: 8, rank: 1, kind: kill}]")
    cb = MLflowCallback(flush_interval_s=0.25, system_metrics_interval_s=1.0)
    summary = run(cfg, callbacks=[cb], progress=False)
    return storage, summary, cb


def test_killed_job_logs_one_run_with_one_point_per_step(mlflow_server, killed_job):
    storage, summary, cb = killed_job
    client = _client(mlflow_server)
    assert summary["status"] == "succeeded" and summary["failures"] == 1
    run_id = summary["mlflow_run_id"]
    assert run_id and run_id == cb.run_id
    assert (storage / "mlflow-it" / "mlflow_run_id").read_text().strip() == run_id
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [run_id]

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    # Steps after the restore point were replayed after the kill: still one point each.
    for key in ("loss", "lr", "grad_norm", "step_time_s", "samples_per_s", "tokens_per_s",
                "world_size", "data_wait_frac", "goodput"):
        assert _steps(client, run_id, key) == list(range(1, 17)), key
    tags = run.data.tags
    assert tags["raypod.event.0.kind"] == "kill"
    assert tags["raypod.event.0.step"] == "8" and tags["raypod.event.0.rank"] == "1"
    assert float(tags["raypod.event.0.resumed_s"]) > float(tags["raypod.event.0.detected_s"])
    ev = summary["events"][0]
    assert tags["raypod.event.0.restored_from"] == ev["restored_from"]
    assert tags["raypod.event.0.lost_steps"] == str(ev["lost_steps"])
    assert tags["raypod.failures"] == "1" and tags["raypod.state"] == "finished"
    assert run.data.params["train.max_steps"] == "16"

    artifacts = {f.path for f in client.list_artifacts(run_id)}
    assert {"config.yaml", "summary.json", "events.json", "timeline.png",
            "events_table.json"} <= artifacts
    table = json.loads(Path(client.download_artifacts(run_id, "events_table.json",
                                                      str(storage))).read_text())
    rows = [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]
    assert [r["kind"] for r in rows] == ["kill"] and rows[0]["lost_steps"] == summary["events"][0]["lost_steps"]
    assert any(k.startswith("system/") for k in run.data.metrics), "MLflow system metrics"
    assert not list((storage / "mlflow-it" / "mlflow_spool").glob("seg-*")), "nothing left unsent"


def test_resubmission_with_more_steps_continues_the_same_run(mlflow_server, killed_job):
    from raypod.api import run
    from raypod.tracking import MLflowCallback

    storage, first, _ = killed_job
    cfg = _tiny(storage, mlflow_server, "train.max_steps=22")
    cb = MLflowCallback(flush_interval_s=0.25, system_metrics=False)
    summary = run(cfg, callbacks=[cb], progress=False)
    assert summary["status"] == "succeeded" and summary["resumed_from_step"] == 16
    assert summary["mlflow_run_id"] == first["mlflow_run_id"]

    client = _client(mlflow_server)
    run_id = first["mlflow_run_id"]
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert len(client.search_runs([exp.experiment_id])) == 1
    assert _steps(client, run_id) == list(range(1, 23))
    run_info = client.get_run(run_id)
    assert run_info.info.status == "FINISHED"
    tags = run_info.data.tags
    assert tags["raypod.submissions"] == "2"
    assert tags["raypod.param_changed.train.max_steps"] == "22"
    assert tags["raypod.event.0.kind"] == "kill", "the first submission's events stay"


def test_server_stopped_mid_run_loses_no_point(mlflow_server, tmp_path, monkeypatch):
    """Synthetic steps through the callback while the server goes away and comes back."""
    from raypod.tracking import MLflowCallback

    monkeypatch.chdir(tmp_path)
    cfg = load_config(TINY, [f"checkpoint.storage={tmp_path}", "name=outage",
                             f"mlflow.tracking_uri={mlflow_server.uri}",
                             f"mlflow.experiment={EXPERIMENT}"])
    start = time.time()
    cb = MLflowCallback(flush_interval_s=0.1, max_backoff_s=1.0, system_metrics=False)
    cb.before_job(JobInfo(config=cfg, job_dir=cfg.job_dir, start_time=start))
    run_id = cb.wait_run_id(30)
    assert run_id

    def step(s: int) -> None:
        t0 = time.perf_counter()
        cb.after_step(StepReport(step=s, time_s=time.time() - start, metrics={
            "loss": 5.0 - s * 0.01, "lr": 1e-3, "samples_per_s": 100.0, "world_size": 2.0}))
        assert time.perf_counter() - t0 < 0.05, "after_step waited"
        time.sleep(0.02)

    for s in range(1, 31):
        step(s)
    time.sleep(0.5)
    mlflow_server.stop()  # the server is gone mid-run
    for s in range(31, 91):
        step(s)
    event = FailureEvent(kind="exception", step=60, rank=0, detected_s=time.time() - start)
    cb.after_failure(event)
    time.sleep(1.0)
    spooled = list(cb.spool_path.glob("seg-*.jsonl"))
    assert spooled, "points of the outage must be on disk"
    mlflow_server.start()  # same port, same SQLite file
    for s in range(91, 121):
        step(s)
    summary = {"status": "succeeded", "final_step": 120}
    path = Path(cfg.job_dir) / "summary.json"
    path.write_text(json.dumps(summary))
    cb.after_job(summary, str(path))

    client = _client(mlflow_server)
    assert _steps(client, run_id) == list(range(1, 121))
    assert _steps(client, run_id, "samples_per_s") == list(range(1, 121))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["raypod.event.0.kind"] == "exception"
    assert not list(cb.spool_path.glob("seg-*")) and not list(cb.spool_path.glob("finish-*"))
