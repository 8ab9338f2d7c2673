"""Tests of raypod.tracking.MLflowCallback against a real local SQLite tracking store."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from raypod.callbacks import FailureEvent, JobInfo, StepReport
from raypod.config import JobConfig
from raypod.tracking import MLflowCallback
from raypod.tracking.mlflow import REDACTED, params_from_config, redact, resolve_tracking_uri

JOB = "unit-job"


def make_config(tmp_path: Path, tracking_uri: str | None, max_steps: int = 10) -> JobConfig:
    return JobConfig.model_validate({
        "name": JOB,
        "recipe": {"target": "tests.fake:Recipe",
                   "args": {"api_token": "hunter2", "hidden": 8, "tokenizer": "gpt2"}},
        "train": {"max_steps": max_steps},
        "checkpoint": {"storage": str(tmp_path / "runs")},
        "mlflow": {"tracking_uri": tracking_uri, "experiment": "raypod-unit"},
    })


def report(step: int, *, replayed: bool = False, loss: float | None = None) -> StepReport:
    return StepReport(
        step=step,
        metrics={"loss": loss if loss is not None else 10.0 - step * 0.1, "lr": 1e-3,
                 "samples_per_s": 100.0 + step, "world_size": 2},
        time_s=float(step) + (5.0 if replayed else 0.0),
        replayed=replayed,
    )


def finish(cb: MLflowCallback, cfg: JobConfig, status: str = "succeeded") -> None:
    summary: dict[str, Any] = {"status": status, "name": cfg.name}
    path = Path(cfg.job_dir) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary))
    cb.after_job(summary, str(path))


def test_one_run_per_job_dedup_params_artifacts_and_resume(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # nothing may land in ./mlruns
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = make_config(tmp_path, uri)

    cb = MLflowCallback(flush_interval_s=0.2)
    t0 = time.monotonic()
    cb.before_job(JobInfo(config=cfg, job_dir=cfg.job_dir, start_time=time.time()))
    assert time.monotonic() - t0 < 0.5, "before_job must not wait for MLflow"
    cb.after_state_change("starting", "running", 0.5)
    for s in range(1, 9):
        cb.after_step(report(s))
    event = FailureEvent(kind="kill", step=9, rank=1, detected_s=9.2, message="rank 1 died")
    cb.after_failure(event)
    for s in (6, 7, 8):  # replayed from the step-5 snapshot, with other values
        cb.after_step(report(s, replayed=True, loss=99.0))
    event.resumed_s, event.lost_steps, event.restored_from = 11.5, 3, "checkpoint"
    cb.after_recovery(event)
    for s in (9, 10):
        cb.after_step(report(s))
    cb.after_state_change("running", "finished", 16.0)
    finish(cb, cfg)
    run_id = cb.wait_run_id(1)
    assert run_id is not None

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("raypod-unit")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert (Path(cfg.job_dir) / "mlflow_run_id").read_text().strip() == run_id

    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 11))
    assert all(m.value != 99.0 for m in history), "a replayed step overwrote the first value"

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.max_steps"] == "10"
    assert params["recipe.args.api_token"] == REDACTED
    assert params["recipe.args.tokenizer"] == "gpt2"
    tags = run.data.tags
    assert tags["raypod.job_name"] == JOB
    assert tags["raypod.state"] == "finished"
    assert tags["raypod.event.0.kind"] == "kill"
    assert tags["raypod.event.0.lost_steps"] == "3"
    assert float(tags["raypod.event.0.resumed_s"]) == pytest.approx(11.5)

    artifacts = {f.path for f in client.list_artifacts(run_id)}
    assert {"config.yaml", "summary.json", "events.json", "timeline.png"} <= artifacts
    assert (tmp_path / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()
    local = Path(client.download_artifacts(run_id, "events.json", str(tmp_path)))
    rows = json.loads(local.read_text())
    assert rows[0]["kind"] == "kill" and rows[0]["lost_steps"] == 3
    config_text = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path))).read_text()
    assert "hunter2" not in config_text

    # Resubmission with more steps: same run, steps 9..10 replayed by the new driver are
    # already in the store and must not be duplicated.
    cfg2 = make_config(tmp_path, uri, max_steps=15)
    cb2 = MLflowCallback(flush_interval_s=0.2)
    cb2.before_job(JobInfo(config=cfg2, job_dir=cfg2.job_dir, start_time=time.time(),
                           start_step=8))
    for s in range(9, 16):
        cb2.after_step(report(s, loss=50.0 if s <= 10 else None))
    finish(cb2, cfg2)
    assert cb2.wait_run_id(1) == run_id

    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 16))
    assert all(m.value != 50.0 for m in history)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "10"  # MLflow params are immutable
    assert run.data.tags["raypod.param_changed.train.max_steps"] == "15"
    assert run.data.tags["raypod.submissions"] == "2"
    assert len(client.search_runs([exp.experiment_id])) == 1


def test_unreachable_server_spools_to_disk_and_next_driver_sends_everything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A dead store never stops training; the points wait on disk and a resubmission sends them."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    cfg = make_config(tmp_path, "http://127.0.0.1:9")
    cb = MLflowCallback(flush_interval_s=0.1, join_timeout_s=3.0)
    caplog.set_level(logging.WARNING, logger="raypod.tracking")

    t0 = time.monotonic()
    cb.before_job(JobInfo(config=cfg, job_dir=cfg.job_dir, start_time=time.time()))
    for s in range(1, 201):
        cb.after_step(report(s))
    event = FailureEvent(kind="exception", step=150, rank=0, detected_s=1.0, message="boom")
    cb.after_failure(event)
    event.resumed_s, event.lost_steps = 1.5, 0
    cb.after_recovery(event)
    assert time.monotonic() - t0 < 1.0, "hooks must not wait for the tracking server"
    time.sleep(0.5)  # the thread hits the closed port and starts spilling
    finish(cb, cfg, status="succeeded")
    assert time.monotonic() - t0 < 10
    assert cb.wait_run_id(0.1) is None
    assert any(r.name == "raypod.tracking" and r.levelno == logging.WARNING
               for r in caplog.records)
    spool = Path(cfg.job_dir) / "mlflow_spool"
    assert spool == cb.spool_path
    on_disk = [json.loads(line) for seg in sorted(spool.glob("seg-*.jsonl"))
               for line in seg.read_text().splitlines()]
    steps = sorted({p[3] for rec in on_disk for p in rec.get("m", []) if p[0] == "loss"})
    assert steps == list(range(1, 201)), "every point must be on disk"
    assert any(rec.get("e", {}).get("kind") == "exception" for rec in on_disk)
    assert len(list(spool.glob("finish-*/finish.json"))) == 1, "the job's end waits on disk too"

    # The next driver of the same job (here with a reachable store) sends all of it first;
    # the steps it replays (190..200) keep their first, spooled values.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg2 = make_config(tmp_path, uri, max_steps=210)
    cb2 = MLflowCallback(flush_interval_s=0.1)
    cb2.before_job(JobInfo(config=cfg2, job_dir=cfg2.job_dir, start_time=time.time(),
                           start_step=189))
    for s in range(190, 211):
        cb2.after_step(report(s, loss=77.0))
    finish(cb2, cfg2)
    run_id = cb2.wait_run_id(1)
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 211))
    assert [m.value for m in history if m.value == 77.0] == [77.0] * 10  # only 201..210
    tags = client.get_run(run_id).data.tags
    assert tags["raypod.event.0.kind"] == "exception" and tags["raypod.event.0.lost_steps"] == "0"
    assert not list(spool.glob("seg-*")) and not list(spool.glob("finish-*")), "spool drained"


def test_store_outage_mid_run_loses_no_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store fails for a while (a broken client), then works: every step arrives once."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = make_config(tmp_path, uri, max_steps=60)
    cb = MLflowCallback(flush_interval_s=0.05, max_backoff_s=0.2)
    cb.before_job(JobInfo(config=cfg, job_dir=cfg.job_dir, start_time=time.time()))
    assert cb.wait_run_id(10)
    for s in range(1, 11):
        cb.after_step(report(s))
    time.sleep(0.3)
    thread_client = cb._sender.run.client
    real = thread_client.log_batch
    outage = {"on": True}

    def flaky(*args: Any, **kwargs: Any) -> None:
        if outage["on"]:
            raise ConnectionError("store down")
        real(*args, **kwargs)

    monkeypatch.setattr(thread_client, "log_batch", flaky)
    for s in range(11, 41):
        cb.after_step(report(s))
        time.sleep(0.01)
    time.sleep(0.5)
    assert list(cb.spool_path.glob("seg-*.jsonl")), "points of the outage go to disk"
    outage["on"] = False
    for s in range(41, 61):
        cb.after_step(report(s))
    finish(cb, cfg)
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(cb.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 61))
    assert not list(cb.spool_path.glob("seg-*"))


def test_events_table_resizes_system_metrics_and_final_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = make_config(tmp_path, uri)
    start = time.time()
    cb = MLflowCallback(flush_interval_s=0.1, system_metrics_interval_s=0.2)
    cb.before_job(JobInfo(config=cfg, job_dir=cfg.job_dir, start_time=start))
    for s in range(1, 5):
        cb.after_step(report(s))
    ev = FailureEvent(kind="kill", step=5, rank=1, detected_s=5.1)
    cb.after_failure(ev)
    for s in range(5, 9):  # one rank fewer after the failure
        r = report(s)
        r.metrics["world_size"] = 1
        cb.after_step(r)
        if s == 5:
            ev.resumed_s, ev.lost_steps, ev.world_size_after = 6.0, 0, 1
            cb.after_recovery(ev)
    # Wait for the first system-metric samples (slow to come on a loaded machine).
    run_id = cb.wait_run_id(timeout=60)
    probe = MlflowClient(cfg.mlflow.tracking_uri)
    deadline = time.time() + 45
    while time.time() < deadline and not any(
            k.startswith("system/") for k in probe.get_run(run_id).data.metrics):
        time.sleep(0.5)
    model = torch.nn.Linear(4, 2)
    Path(cfg.job_dir).mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), Path(cfg.job_dir) / "final_model.pt")
    finish(cb, cfg)

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(cb.run_id)
    tags = run.data.tags
    kinds = {tags[f"raypod.event.{i}.kind"] for i in range(2)}
    assert kinds == {"kill", "resize"}
    n = 0 if tags["raypod.event.0.kind"] == "resize" else 1
    assert tags[f"raypod.event.{n}.world_size_before"] == "2"
    assert tags[f"raypod.event.{n}.world_size_after"] == "1"
    assert tags[f"raypod.event.{n}.cause"] == "failure"
    assert tags["raypod.failures"] == "1" and tags["raypod.resizes"] == "1"

    table = json.loads(Path(client.download_artifacts(cb.run_id, "events_table.json",
                                                      str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert sorted(r["kind"] for r in rows) == ["kill", "resize"]
    kill = next(r for r in rows if r["kind"] == "kill")
    assert kill["lost_steps"] == 0 and kill["world_size_after"] == 1 and kill["resumed_s"] == 6.0

    sd = torch.load(client.download_artifacts(cb.run_id, "model/state_dict.pt", str(tmp_path)),
                    weights_only=True)
    torch.testing.assert_close(sd, model.state_dict())

    try:
        import psutil  # noqa: F401
    except ImportError:
        return  # system metrics need psutil
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)


def test_after_step_never_waits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = make_config(tmp_path, f"sqlite:///{tmp_path}/mlflow.db", max_steps=5000)
    cb = MLflowCallback(system_metrics=False)
    cb.before_job(JobInfo(config=cfg, job_dir=cfg.job_dir, start_time=time.time()))
    times = []
    for s in range(1, 5001):
        t = time.perf_counter()
        cb.after_step(report(s))
        times.append(time.perf_counter() - t)
    finish(cb, cfg)
    times.sort()
    assert times[len(times) // 2] < 1e-3  # a queue put, not a store call (~66 ms)


def test_tracking_uri_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = make_config(tmp_path, None)
    assert resolve_tracking_uri(cfg, cfg.job_dir) == f"sqlite:///{tmp_path / 'runs'}/mlflow.db"
    remote = resolve_tracking_uri(cfg, "s3://bucket/runs/job")
    assert remote.startswith("sqlite:////") and remote.endswith("/.raypod/mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert resolve_tracking_uri(cfg, cfg.job_dir) == "http://mlflow.example:5000"
    explicit = make_config(tmp_path, "sqlite:///x.db")
    assert resolve_tracking_uri(explicit, explicit.job_dir) == "sqlite:///x.db"


def test_redaction() -> None:
    assert redact("recipe.args.hf_token", "abc") == REDACTED
    assert redact("db.PASSWORD", "x") == REDACTED
    assert redact("data.path", "s3://user:pw@host/bucket") == REDACTED
    assert redact("recipe.args.key", "sk-" + "a" * 30) == REDACTED
    assert redact("train.max_tokens", 1024) == 1024
    assert redact("data.path", "/data/corpus.parquet") == "/data/corpus.parquet"
    params = params_from_config(make_config(Path("/tmp"), None))
    assert params["recipe.args.api_token"] == REDACTED
    assert params["train.max_steps"] == "10"
