"""MLflow tracking for raypod jobs, as a driver :class:`~raypod.callbacks.Callback`.

One MLflow run per job name, continued across failures, driver restarts and
resubmissions: the run id is kept in ``<job_dir>/mlflow_run_id``. Every MLflow call
happens in one background thread fed by a queue, so no hook ever waits for the
tracking store (``after_job`` excepted: it flushes and joins with a timeout). Metrics
are batched (``log_batch``), each ``(metric, step)`` pair is logged at most once even
when steps are replayed after a failure, secrets in the config are redacted before
they become params. A tracking store that is down or unreachable never stops
training and loses no point: what cannot be sent goes to an on-disk spool
(:mod:`raypod.tracking.spool`) and is sent when the store is back, by this driver or
the next submission of the job. MLflow's own system metrics (``system/*``, the driver's
node) are logged beside raypod's, and so are those of every node of the job's ranks
(``system/<node>/*``, :mod:`raypod.tracking.system`) and each rank's step times
(``rank/<r>/*``). Failures, recoveries and resizes become ``raypod.event.<n>.*`` tags
and rows of the ``events_table.json`` table; the end of the job logs ``config.yaml``,
``summary.json``, ``events.json``, ``timeline.png`` and the final model as an MLflow
logged model (:mod:`raypod.tracking.model`), registered when ``mlflow.registered_model``
is set; only when that model cannot be logged does the plain torch state dict go in
as ``model/state_dict.pt``.

The work is split by job: :mod:`raypod.tracking.identity` (the store and the one run
per job name), :mod:`raypod.tracking.sender` (the thread: batching, retries, the spool
hand-off), :mod:`raypod.tracking.params` (config params, redacted, and tags),
:mod:`raypod.tracking.events` (``raypod.event.<n>.*`` tags), and
:mod:`raypod.tracking.artifacts` (the run's end); this module holds the hooks.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from raypod.callbacks import Callback, FailureEvent, JobInfo, StepReport
from raypod.driver.stop import time_left
from raypod.redact import REDACTED, redact, redact_uri
from raypod.tracking.artifacts import EVENTS_TABLE, Timeline
from raypod.tracking.identity import (
    JOB_NAME_TAG,
    RUN_ID_FILE,
    resolve_tracking_uri,
    run_url,
)
from raypod.tracking.model import FINAL_MODEL_FILE
from raypod.tracking.params import params_from_config
from raypod.tracking.sender import Pace, Sender, as_float
from raypod.tracking.spool import Spool, spool_dir
from raypod.tracking.system import DriverMonitor, NodeMetrics, rank_metrics

logger = logging.getLogger("raypod.tracking")

# What other modules and tests import from here, though it now lives in the modules above.
__all__ = ["EVENTS_TABLE", "FINAL_MODEL_FILE", "JOB_NAME_TAG", "REDACTED", "RUN_ID_FILE",
           "MLflowCallback", "params_from_config", "redact", "resolve_tracking_uri", "run_url"]


def _bounded(wait_s: float) -> float:
    """``wait_s``, or less when the job is being stopped: a stopped job's ending fits in Ray's
    grace before its SIGKILL (:func:`raypod.driver.stop.time_left`); what is not sent by then
    stays in the spool, for the next run of the job."""
    left = time_left()
    return wait_s if left is None else min(wait_s, left)


class MLflowCallback(Callback):
    """Logs a raypod job to MLflow: params, per-step metrics, system metrics, events, artifacts.

    All MLflow work runs in one daemon thread; the hooks only enqueue. Use
    :meth:`wait_run_id` to learn the run id (e.g. for ``summary.json``). When the store
    fails, what is unsent goes to the job's spool on local disk (:mod:`raypod.tracking.spool`)
    and is sent when the store answers again, by this driver or the job's next one.

    For an ``http(s)`` tracking URI the callback sets ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``
    and ``MLFLOW_HTTP_REQUEST_TIMEOUT`` in the driver's environment unless they are set
    already: its own retry loop replaces MLflow's (about 4 minutes per call by default),
    so a dead server costs seconds before points go to disk.

    Args:
        flush_interval_s: Seconds between metric batches (and between spills while the
            store is down).
        max_batch: Metric points per ``log_batch`` call (MLflow allows 1000).
        max_pending: Points kept in memory before they are spilled to the spool even
            while the store works.
        join_timeout_s: How long ``after_job`` / :meth:`close` wait for the last sends;
            what is not sent by then stays in the spool.
        max_backoff_s: Longest wait between retries when the store fails.
        system_metrics: Log MLflow's system metrics (``system/*``: CPU, memory, disk,
            network, GPU) of the driver's node and ``system/<node>/*`` (CPU, memory, GPU)
            of every node of the job's ranks (with Ray connected); needs ``psutil``. Off
            as well when ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false``.
        system_metrics_interval_s: Seconds between system-metric samples
            (``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` wins).
        model_timeout_s: How much longer ``after_job`` waits while the final model is
            being logged (a large model takes minutes to upload).
        http_retries: MLflow's own retries per HTTP call (see above).
        http_timeout_s: Seconds an HTTP call to the tracking server may take.
        setup_delay_s: MLflow is imported and the run set up once the first step is
            reported (or the job fails or ends, or :meth:`wait_run_id` is called), but no
            later than this many seconds after ``before_job``: the seconds of CPU that
            importing MLflow and opening its store take are then not taken from the job's
            start. Points, tags and events queued meanwhile are sent as they would have
            been; the run's start time is the job's. 0: set the run up at once.
    """

    def __init__(self, flush_interval_s: float = 1.0, max_batch: int = 500,
                 max_pending: int = 100_000, join_timeout_s: float = 30.0,
                 max_backoff_s: float = 30.0, system_metrics: bool = True,
                 system_metrics_interval_s: float = 10.0, http_retries: int = 0,
                 http_timeout_s: int = 15, model_timeout_s: float = 600.0,
                 setup_delay_s: float = 30.0) -> None:
        self.flush_interval_s = flush_interval_s
        self.max_batch = max(1, min(max_batch, 900))  # + one step's metrics stays <= 1000
        self.max_pending = max(1, max_pending)
        self.join_timeout_s = join_timeout_s
        self.max_backoff_s = max_backoff_s
        self.system_metrics = system_metrics
        self.system_metrics_interval_s = system_metrics_interval_s
        self.http_retries = http_retries
        self.http_timeout_s = http_timeout_s
        self.model_timeout_s = model_timeout_s
        self.setup_delay_s = setup_delay_s

        # Driver-side state (touched by the hooks only); the thread's is the sender's.
        self._sender: Sender | None = None
        self._job: JobInfo | None = None
        self._uid = ""
        self._enabled = False
        self._closed = False
        self._failures: list[FailureEvent] = []
        self._timeline: Timeline = []
        self._node_metrics: NodeMetrics | None = None
        self._rank_nodes: frozenset[str] = frozenset()
        self._last_step = 0

    # ---- public API ----------------------------------------------------------------
    @property
    def run_id(self) -> str | None:
        """The run id once the run is set up (None before, or when it never was)."""
        return self._sender.run.run_id if self._sender is not None else None

    @property
    def spool_path(self) -> Path | None:
        """The job's spool folder (None before ``before_job`` or with tracking off)."""
        return self._sender.spool_path if self._sender is not None else None

    def wait_run_id(self, timeout: float | None = None) -> str | None:
        """Wait until the MLflow run is set up.

        Args:
            timeout: Seconds to wait at most (None: no limit).

        Returns:
            The run id, or None when tracking is off, failed or is not ready in time.
        """
        if not self._enabled or self._sender is None:
            return None
        self._sender.setup_now()
        self._sender.run.ready.wait(timeout)
        return self._sender.run.run_id

    def close(self, timeout: float | None = None) -> None:
        """Flush what is pending and stop the thread (idempotent; does not end the run).

        Args:
            timeout: Seconds to wait for the flush (default ``join_timeout_s``).
        """
        if self._closed:
            return
        self._closed = True
        self._stop_node_metrics()
        self._shutdown(timeout if timeout is not None else self.join_timeout_s)

    # ---- hooks ---------------------------------------------------------------------
    def before_job(self, job: JobInfo) -> None:
        """Start the tracking thread; it sets up the experiment and run in the background."""
        if self._sender is not None or self._closed:
            return
        cfg = job.config
        if not cfg.mlflow.enabled:
            return
        self._job = job
        self._uid = f"{int(job.start_time * 1000):d}-{os.getpid()}"
        self._enabled = True
        uri = resolve_tracking_uri(cfg, job.job_dir)
        if uri.startswith(("http://", "https://")):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(self.http_retries))
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(self.http_timeout_s))
        if redact_uri(uri) != uri:  # MLflow prints the run's URL, credentials included, to stdout
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        # MLflow's own link opens GenAI pages; raypod gives its own (summary.json's mlflow_url).
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self._sender = Sender(
            job, self._uid, Spool(spool_dir(job.job_dir, cfg.name)),
            DriverMonitor(self.system_metrics, self.system_metrics_interval_s),
            Pace(self.flush_interval_s, self.max_batch, self.max_pending, self.max_backoff_s),
            self.setup_delay_s)
        self._sender.put(("setup", uri, params_from_config(cfg)))
        self._sender.start()
        self._start_node_metrics()

    def after_state_change(self, previous: str, new: str, time_s: float) -> None:
        """Tag ``raypod.state`` with the new state."""
        if not self._enabled or self._sender is None:
            return
        self._sender.put(("tags", {"raypod.state": str(new)}))

    def after_step(self, report: StepReport) -> None:
        """Queue the step's metrics (replayed steps already logged are dropped later)."""
        if not self._enabled or self._job is None or self._sender is None:
            return
        m = report.metrics
        self._timeline.append((report.time_s, report.step, as_float(m.get("loss")),
                               as_float(m.get("samples_per_s"))))
        ts_ms = int((self._job.start_time + report.time_s) * 1000)
        self._last_step = report.step
        if report.ranks:
            nodes = frozenset(f["node_id"] for f in report.ranks.values() if f.get("node_id"))
            if nodes != self._rank_nodes:
                self._rank_nodes = nodes
        self._sender.put(("metrics", report.step, {**m, **rank_metrics(report.step, report.ranks)},
                          ts_ms, report.time_s))

    def after_failure(self, event: FailureEvent) -> None:
        """Record the failure as ``raypod.event.<n>.*`` tags and a row of the events table."""
        if not self._enabled or self._sender is None:
            return
        n = len(self._failures)
        self._failures.append(event)
        fields: dict[str, Any] = {"kind": event.kind, "step": event.step, "rank": event.rank,
                                  "detected_s": round(event.detected_s, 3)}
        if event.message:
            fields["message"] = event.message[:500]
        self._sender.put(("event", f"{self._uid}-{n}", fields))

    def after_recovery(self, event: FailureEvent) -> None:
        """Add the recovery's ``resumed_s``, ``lost_steps``, ... to the event's tags and row."""
        if not self._enabled or self._sender is None:
            return
        n = self._failure_index(event)
        fields: dict[str, Any] = {}
        for name in ("resumed_s", "lost_steps", "world_size_after", "restored_from"):
            value = getattr(event, name)
            if value is not None:
                fields[name] = round(value, 3) if isinstance(value, float) else value
        self._sender.put(("event", f"{self._uid}-{n}", fields))

    def after_checkpoint(self, step: int, path: str) -> None:
        """Tag the last committed checkpoint."""
        if not self._enabled or self._sender is None:
            return
        self._sender.put(("tags", {"raypod.last_checkpoint_step": str(step),
                                   "raypod.last_checkpoint": path}))

    def before_summary(self, summary: dict[str, Any]) -> None:
        """Put the run id into ``summary.json`` (waits briefly if the run is still being set up;
        with the store down, the id kept in the job folder)."""
        if not self._enabled or self._sender is None:
            return
        sender, run = self._sender, self._sender.run
        sender.setup_now()
        deadline = time.monotonic() + _bounded(10.0)
        while not run.ready.wait(0.05) and not sender.failing and time.monotonic() < deadline:
            pass
        summary["mlflow_run_id"] = run.run_id or run.stored_run_id
        if run.run_id and run.experiment:
            summary["mlflow_url"] = run_url(run.tracking_uri or "", run.experiment, run.run_id)

    def after_job(self, summary: dict[str, Any], summary_path: str) -> None:
        """Log the artifacts, end the run, flush and join the thread (bounded wait)."""
        if not self._enabled or self._closed or self._job is None or self._sender is None:
            return
        self._stop_node_metrics()
        self._sender.put(("finish", dict(summary), summary_path, list(self._timeline)))
        self._closed = True
        self._shutdown(_bounded(self.join_timeout_s))

    # ---- driver-side helpers -------------------------------------------------------
    def _start_node_metrics(self) -> None:
        """Sample every node of the job's ranks (with Ray connected and system metrics on)."""
        ray = sys.modules.get("ray")
        if (not self.system_metrics or ray is None or not ray.is_initialized()
                or os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").strip().lower() in ("false", "0")):
            return
        try:
            interval = float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL") or
                             self.system_metrics_interval_s)
        except ValueError:
            interval = self.system_metrics_interval_s
        self._node_metrics = NodeMetrics(lambda: self._rank_nodes, self._emit_node_metrics, interval)
        self._node_metrics.start()

    def _emit_node_metrics(self, metrics: dict[str, float], tags: dict[str, str]) -> None:
        """Called by the node-metrics thread: the samples join the step metrics' queue, at the
        job's current step (one point per node, metric and step)."""
        if self._sender is None:
            return
        if tags:
            self._sender.put(("tags", tags))
        if metrics and self._job is not None:
            now = time.time()
            self._sender.put(("metrics", self._last_step, metrics, int(now * 1000),
                              now - self._job.start_time))

    def _stop_node_metrics(self) -> None:
        nm, self._node_metrics = self._node_metrics, None
        if nm is not None:
            try:
                nm.stop()
            except Exception as e:  # noqa: BLE001 - never in the way of the job's end
                logger.debug("stopping node metrics: %s", e)

    def _failure_index(self, event: FailureEvent) -> int:
        for i, e in enumerate(self._failures):
            if e is event:
                return i
        for i, e in enumerate(self._failures):
            if (e.kind, e.step, e.detected_s) == (event.kind, event.step, event.detected_s):
                self._failures[i] = event
                return i
        self._failures.append(event)
        return len(self._failures) - 1

    def _shutdown(self, timeout: float) -> None:
        if self._sender is not None:
            self._sender.join(timeout, self.model_timeout_s)
