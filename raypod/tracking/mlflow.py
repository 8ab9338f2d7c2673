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
"""

from __future__ import annotations

import collections
import csv
import json
import logging
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raypod.callbacks import Callback, FailureEvent, JobInfo, StepReport
from raypod.redact import REDACTED, redact, redact_text, redact_uri  # noqa: F401 - REDACTED: re-exported
from raypod.tracking import model as _model
from raypod.tracking.model import FINAL_MODEL_FILE  # noqa: F401 - re-exported
from raypod.tracking.spool import FINISH_FILE, Spool, spool_dir
from raypod.tracking.system import NodeMetrics, rank_metrics

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from raypod.config import JobConfig

logger = logging.getLogger("raypod.tracking")

RUN_ID_FILE = "mlflow_run_id"
"""Name of the file under the job folder that holds the job's MLflow run id."""
JOB_NAME_TAG = "raypod.job_name"
"""Tag that keys a run to its job name."""
EVENTS_TABLE = "events_table.json"
"""Run artifact (an MLflow table) with one row per failure, recovery and resize."""

_MAX_PARAM_VAL = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_MAX_TAG_VAL = 5000  # below MLflow 3's 8000, which older servers do not accept
_MAX_KEY = 250
_PARAMS_TAGS_PER_BATCH = 100
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")
_EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
_MODEL_TRAINING = "custom_model_development"  # the experiment's kind in MLflow 3's header selector
_UI_MODEL_TRAINING = "workflowType=machine_learning"
"""MLflow 3.17's UI picks GenAI or model-training pages from this URL parameter (else from the
browser's last choice, GenAI at first), not from the experiment's ``mlflow.experimentKind`` tag."""
_EVENT_TAG_RE = re.compile(r"^raypod\.event\.(\d+)\.(\w+)$")
_EVENT_COLUMNS = ("kind", "step", "rank", "detected_s", "resumed_s", "lost_steps",
                  "world_size_before", "world_size_after", "restored_from", "cause", "message")
_SUCCESS = {"succeeded", "success", "successful", "completed", "complete", "finished", "done", "ok"}
_KILLED = {"killed", "cancelled", "canceled", "interrupted", "stopped"}


# ---- pure helpers ------------------------------------------------------------------


def resolve_tracking_uri(cfg: JobConfig, job_dir: str) -> str:
    """Pick the MLflow tracking URI for a job.

    Args:
        cfg: The job's config; ``cfg.mlflow.tracking_uri`` wins when set.
        job_dir: ``<checkpoint.storage>/<name>``, a local path or a URI.

    Returns:
        ``cfg.mlflow.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store
        next to the job folders (``sqlite:///<storage>/mlflow.db``, shared by every job
        under that storage) for local storage, else ``sqlite:///~/.raypod/mlflow.db``
        (expanded) for remote storage.
    """
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    local = _local_path(job_dir)
    if local is not None:
        return f"sqlite:///{Path(local).parent / 'mlflow.db'}"
    return f"sqlite:///{Path(os.path.expanduser('~/.raypod/mlflow.db'))}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str,
            ui: str = "http://127.0.0.1:5000") -> str:
    """The run's page in the MLflow UI, on its model-training views.

    Args:
        tracking_uri: The store; an ``http(s)`` server is the UI itself (credentials dropped).
        experiment_id: The run's experiment.
        run_id: The run.
        ui: Where ``mlflow ui`` serves a local store.
    """
    base = redact_uri(tracking_uri) if tracking_uri.startswith(("http://", "https://")) else ui
    if "@" in base.split("//", 1)[-1].split("/", 1)[0]:  # user:***@host: not a URL to open
        base = base.split("//", 1)[0] + "//" + base.split("@", 1)[1]
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{_UI_MODEL_TRAINING}"


def params_from_config(cfg: JobConfig) -> dict[str, str]:
    """``cfg.flat()`` as MLflow params: secrets redacted, keys sanitised, values truncated.

    Args:
        cfg: The job's config.

    Returns:
        ``{"section.key": "value"}`` ready for ``Param`` entities.
    """
    out: dict[str, str] = {}
    for key, value in cfg.flat().items():
        value = redact(key, value)
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        out[_clean_key(key)] = text[:_MAX_PARAM_VAL]
    return out


def _clean_key(key: str) -> str:
    return _BAD_KEY_CHARS.sub("_", key)[:_MAX_KEY]


def _local_path(uri: str) -> str | None:
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if "://" in uri:
        return None
    return uri


def _sqlite_dir(tracking_uri: str) -> Path | None:
    """The folder of a ``sqlite:///`` store's file, or None for other stores."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(os.path.expanduser(path)).parent


def _run_status(summary: dict[str, Any]) -> str:
    status = str(summary.get("status", "")).strip().lower()
    if status in _SUCCESS:
        return "FINISHED"
    if status in _KILLED:
        return "KILLED"
    return "FAILED"


def _is_not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def _is_already_exists(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_ALREADY_EXISTS"


class _StepSet:
    """A compact set of step numbers (a bitmap, with a set for odd ones)."""

    __slots__ = ("_bits", "_other")
    _LIMIT = 1 << 27  # 16 MiB of bitmap at most

    def __init__(self) -> None:
        self._bits = bytearray()
        self._other: set[int] = set()

    def add(self, step: int) -> None:
        if 0 <= step < self._LIMIT:
            i = step >> 3
            if i >= len(self._bits):
                self._bits.extend(bytes(max(i + 1 - len(self._bits), len(self._bits))))
            self._bits[i] |= 1 << (step & 7)
        else:
            self._other.add(step)

    def __contains__(self, step: int) -> bool:
        if 0 <= step < self._LIMIT:
            i = step >> 3
            return i < len(self._bits) and bool(self._bits[i] & (1 << (step & 7)))
        return step in self._other


# ---- the callback ------------------------------------------------------------------


class _Deadline(Exception):
    """The shutdown deadline passed in the middle of sending."""


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
    """

    def __init__(self, flush_interval_s: float = 1.0, max_batch: int = 500,
                 max_pending: int = 100_000, join_timeout_s: float = 30.0,
                 max_backoff_s: float = 30.0, system_metrics: bool = True,
                 system_metrics_interval_s: float = 10.0, http_retries: int = 0,
                 http_timeout_s: int = 15, model_timeout_s: float = 600.0) -> None:
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

        # Driver-side state (touched by the hooks only).
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._job: JobInfo | None = None
        self._uid = ""
        self._enabled = False
        self._closed = False
        self._failures: list[FailureEvent] = []
        self._timeline: list[tuple[float, int, float | None, float | None]] = []
        self._node_metrics: NodeMetrics | None = None
        self._rank_nodes: frozenset[str] = frozenset()
        self._last_step = 0

        # Thread-side state.
        self._run_ready = threading.Event()
        self._run_id: str | None = None
        self._experiment: str | None = None
        self._stored_run_id: str | None = None
        self._client: MlflowClient | None = None
        self._tracking_uri: str | None = None
        self._spool: Spool | None = None
        self._spool_dirty = False  # segments or finish folders may be waiting in the spool
        self._spool_warned = False
        self._pending: collections.deque[tuple[str, float, int, int]] = collections.deque()
        self._accepted: dict[str, _StepSet] = {}
        self._prior_steps = _StepSet()
        self._params: dict[str, str] = {}
        self._params_done = False
        self._pending_tags: dict[str, str] = {}
        self._events: dict[str, dict[str, Any]] = {}  # event id -> fields, in order
        self._dirty: dict[str, set[str]] = {}  # event id -> fields not sent yet
        self._event_index: dict[str, int] = {}  # event id -> N of its raypod.event.N.* tags
        self._next_event_index = 0
        self._counts = {"failures": 0, "resizes": 0}
        self._last_ws: float | None = None
        self._prior_ws: float | None = None
        self._first_ws: tuple[int, float, float] | None = None
        self._finish: tuple[dict[str, Any], str, list[tuple[float, int, float | None, float | None]]] | None = None
        self._finish_dir: Path | None = None
        self._finish_done = False
        self._table_done = False
        self._model_done = False
        self._model_logged = False
        self._model_busy = threading.Event()
        self._monitor: Any = None
        self._stop = False
        self._staged = False
        self._deadline: float | None = None
        self._failing = False

    # ---- public API ----------------------------------------------------------------
    @property
    def run_id(self) -> str | None:
        """The run id once the run is set up (None before, or when it never was)."""
        return self._run_id

    @property
    def spool_path(self) -> Path | None:
        """The job's spool folder (None before ``before_job`` or with tracking off)."""
        return self._spool.root if self._spool is not None else None

    def wait_run_id(self, timeout: float | None = None) -> str | None:
        """Wait until the MLflow run is set up.

        Args:
            timeout: Seconds to wait at most (None: no limit).

        Returns:
            The run id, or None when tracking is off, failed or is not ready in time.
        """
        if not self._enabled:
            return None
        self._run_ready.wait(timeout)
        return self._run_id

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
        if self._thread is not None or self._closed:
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
        self._spool = Spool(spool_dir(job.job_dir, cfg.name))
        self._queue.put(("setup", uri, params_from_config(cfg)))
        self._thread = threading.Thread(target=self._main, name="raypod-mlflow", daemon=True)
        self._thread.start()
        self._start_node_metrics()

    def after_state_change(self, previous: str, new: str, time_s: float) -> None:
        """Tag ``raypod.state`` with the new state."""
        if not self._enabled:
            return
        self._queue.put(("tags", {"raypod.state": str(new)}))

    def after_step(self, report: StepReport) -> None:
        """Queue the step's metrics (replayed steps already logged are dropped later)."""
        if not self._enabled or self._job is None:
            return
        m = report.metrics
        self._timeline.append((report.time_s, report.step, _num(m.get("loss")),
                               _num(m.get("samples_per_s"))))
        ts_ms = int((self._job.start_time + report.time_s) * 1000)
        self._last_step = report.step
        if report.ranks:
            nodes = frozenset(f["node_id"] for f in report.ranks.values() if f.get("node_id"))
            if nodes != self._rank_nodes:
                self._rank_nodes = nodes
        self._queue.put(("metrics", report.step, {**m, **rank_metrics(report.step, report.ranks)},
                         ts_ms, report.time_s))

    def after_failure(self, event: FailureEvent) -> None:
        """Record the failure as ``raypod.event.<n>.*`` tags and a row of the events table."""
        if not self._enabled:
            return
        n = len(self._failures)
        self._failures.append(event)
        fields: dict[str, Any] = {"kind": event.kind, "step": event.step, "rank": event.rank,
                                  "detected_s": round(event.detected_s, 3)}
        if event.message:
            fields["message"] = event.message[:500]
        self._queue.put(("event", f"{self._uid}-{n}", fields))

    def after_recovery(self, event: FailureEvent) -> None:
        """Add the recovery's ``resumed_s``, ``lost_steps``, ... to the event's tags and row."""
        if not self._enabled:
            return
        n = self._failure_index(event)
        fields: dict[str, Any] = {}
        for name in ("resumed_s", "lost_steps", "world_size_after", "restored_from"):
            value = getattr(event, name)
            if value is not None:
                fields[name] = round(value, 3) if isinstance(value, float) else value
        self._queue.put(("event", f"{self._uid}-{n}", fields))

    def after_checkpoint(self, step: int, path: str) -> None:
        """Tag the last committed checkpoint."""
        if not self._enabled:
            return
        self._queue.put(("tags", {"raypod.last_checkpoint_step": str(step),
                                  "raypod.last_checkpoint": path}))

    def before_summary(self, summary: dict[str, Any]) -> None:
        """Put the run id into ``summary.json`` (waits briefly if the run is still being set up;
        with the store down, the id kept in the job folder)."""
        if not self._enabled:
            return
        deadline = time.monotonic() + 10
        while not self._run_ready.wait(0.05) and not self._failing and time.monotonic() < deadline:
            pass
        summary["mlflow_run_id"] = self._run_id or self._stored_run_id
        if self._run_id and self._experiment:
            summary["mlflow_url"] = run_url(self._tracking_uri or "", self._experiment, self._run_id)

    def after_job(self, summary: dict[str, Any], summary_path: str) -> None:
        """Log the artifacts, end the run, flush and join the thread (bounded wait)."""
        if not self._enabled or self._closed or self._job is None:
            return
        self._stop_node_metrics()
        self._queue.put(("finish", dict(summary), summary_path, list(self._timeline)))
        self._closed = True
        self._shutdown(self.join_timeout_s)

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
        if tags:
            self._queue.put(("tags", tags))
        if metrics and self._job is not None:
            now = time.time()
            self._queue.put(("metrics", self._last_step, metrics, int(now * 1000),
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
        if self._thread is None:
            return
        self._queue.put(("stop", time.monotonic() + max(0.0, timeout - 0.5)))
        self._thread.join(timeout)
        if self._thread.is_alive() and self._model_busy.is_set():
            logger.info("waiting up to %.0f s more while the final model is logged to MLflow",
                        self.model_timeout_s)
            self._thread.join(self.model_timeout_s)
        if self._thread.is_alive():
            logger.warning("MLflow tracking did not finish within %.0f s; what is unsent stays in %s",
                           timeout, self.spool_path)

    # ---- the thread ----------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._load_spool()
            self._loop()
        except BaseException:  # never let tracking hurt the driver
            logger.exception("MLflow tracking thread crashed; tracking stops")
            try:
                self._spill()
            except Exception:  # noqa: BLE001
                pass
        finally:
            self._stop_monitor(5.0)
            self._run_ready.set()

    def _loop(self) -> None:
        backoff = 1.0
        next_try = 0.0
        next_flush = time.monotonic() + self.flush_interval_s
        while True:
            now = time.monotonic()
            if now < next_try:
                wait = next_try - now
                if self._memory_backlog():
                    wait = min(wait, max(0.0, next_flush - now))
            elif self._pending:
                wait = max(0.0, next_flush - now)
            else:
                wait = 1.0
            if self._deadline is not None:
                wait = min(wait, max(0.0, self._deadline - now))
            try:
                op = self._queue.get(timeout=wait)
                self._absorb(op)
                while True:
                    self._absorb(self._queue.get_nowait())
            except queue.Empty:
                pass
            now = time.monotonic()
            if self._stop and not self._staged:
                # The job is over: everything goes to disk first, then is sent from there,
                # so whatever does not make it before the deadline is already safe.
                self._spill()
                self._stage_finish()
                self._staged = True
            elif self._memory_backlog() and (
                    len(self._pending) >= self.max_pending
                    or (self._failing and now >= next_flush)):
                self._spill()
                next_flush = now + self.flush_interval_s
            if self._stop and self._deadline is not None and now >= self._deadline:
                self._give_up()
                return
            due = (self._run_id is None or not self._params_done or self._spool_dirty
                   or bool(self._pending_tags) or bool(self._dirty)
                   or len(self._pending) >= self.max_batch
                   or (bool(self._pending) and now >= next_flush)
                   or (self._finish is not None and not self._finish_done))
            if due and now >= next_try:
                try:
                    self._sync()
                except _Deadline:
                    continue
                except Exception as e:  # noqa: BLE001 - the store failed: retry later
                    self._on_failure(e, backoff)
                    next_try = time.monotonic() + backoff
                    backoff = min(backoff * 2, self.max_backoff_s)
                else:
                    if self._failing:
                        logger.warning("MLflow tracking store reachable again (%s); spooled "
                                       "points sent", redact_uri(self._tracking_uri))
                        self._failing = False
                        self._start_monitor()  # MLflow's monitor stops when the store fails
                    backoff = 1.0
                    next_flush = time.monotonic() + self.flush_interval_s
            if self._finish_done or (self._stop and self._finish is None and self._all_sent()):
                return

    def _memory_backlog(self) -> bool:
        return bool(self._pending or self._pending_tags or self._dirty)

    def _all_sent(self) -> bool:
        return (self._run_id is not None and self._params_done and not self._spool_dirty
                and not self._memory_backlog())

    def _absorb(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "metrics":
            _, step, metrics, ts_ms, time_s = op
            for key, value in metrics.items():
                v = _num(value)
                if v is None:
                    continue
                key = _clean_key(str(key))
                seen = self._accepted.setdefault(key, _StepSet())
                if step in seen:
                    continue  # a replayed step: its first value was kept
                seen.add(step)
                self._pending.append((key, v, ts_ms, step))
                if key == "world_size":
                    self._check_resize(step, v, time_s)
        elif kind == "tags":
            for k, v in op[1].items():
                self._pending_tags[_clean_key(k)] = str(v)[:_MAX_TAG_VAL]
        elif kind == "event":
            self._merge_event(op[1], op[2], dirty=True)
        elif kind == "setup":
            self._tracking_uri, self._params = op[1], op[2]
        elif kind == "finish":
            self._finish = op[1:]
        elif kind == "stop":
            self._stop = True
            self._deadline = op[1] if self._deadline is None else min(self._deadline, op[1])

    def _merge_event(self, event_id: str, fields: dict[str, Any], dirty: bool) -> None:
        self._events.setdefault(event_id, {}).update(fields)
        if dirty:
            self._dirty.setdefault(event_id, set()).update(fields)

    def _check_resize(self, step: int, ws: float, time_s: float) -> None:
        """A step whose world size differs from the last one is a resize event."""
        before = self._last_ws
        self._last_ws = ws
        if before is None:
            self._first_ws = (step, ws, time_s)
            if self._prior_ws is None:
                return
            before, cause = self._prior_ws, "resubmission"
        elif ws == before:
            return
        else:
            unresolved = any(e.get("kind") != "resize" and e.get("resumed_s") is None
                             for e in self._events.values())
            cause = "failure" if unresolved else "scaling"
        self._merge_event(f"{self._uid}-r{step}", {
            "kind": "resize", "step": step, "detected_s": round(time_s, 3),
            "world_size_before": int(before), "world_size_after": int(ws), "cause": cause,
        }, dirty=True)

    def _on_failure(self, exc: Exception, backoff: float) -> None:
        msg = redact_text(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")[:300]
        if getattr(exc, "error_code", "") in ("INVALID_STATE", "RESOURCE_DOES_NOT_EXIST") \
                and self._run_id is not None:
            logger.warning("MLflow run %s is gone or not active (%s); setting the run up again",
                           self._run_id, msg)
            self._reset_run()
        if not self._failing:
            logger.warning("MLflow tracking store %s failed (%s); training goes on, points "
                           "are kept in %s and sent when it is back", redact_uri(self._tracking_uri), msg,
                           self.spool_path)
            self._failing = True
        else:
            logger.debug("MLflow send failed again (%s); retry in %.0f s", msg, backoff)
        self._spill()

    def _reset_run(self) -> None:
        self._stop_monitor(2.0)
        self._run_id = None
        self._params = params_from_config(self._job.config) if self._job else {}
        self._params_done = False
        self._event_index.clear()
        self._next_event_index = 0
        self._dirty = {eid: set(fields) for eid, fields in self._events.items()}

    def _give_up(self) -> None:
        self._spill()
        waiting = self._spool_points()
        if waiting or self._run_id is None or (self._finish is not None and not self._finish_done):
            logger.warning(
                "MLflow tracking store %s still unreachable at the end: %s%d metric points%s kept "
                "in %s; they are sent when job '%s' runs again", redact_uri(self._tracking_uri),
                "the run was never set up; " if self._run_id is None else "", waiting,
                " and the run's end" if self._finish is not None and not self._finish_done else "",
                self.spool_path, self._job.config.name if self._job else "?")

    # ---- the spool (thread only) -------------------------------------------------------
    def _load_spool(self) -> None:
        """Register what earlier drivers spooled: its steps count as logged, its events as known."""
        assert self._job is not None and self._spool is not None
        self._stored_run_id = self._read_run_id(self._job.job_dir)
        segments = self._spool.segments()
        for seg in segments:
            records = Spool.read(seg)
            for key, _, _, step in Spool.points(records):
                self._accepted.setdefault(key, _StepSet()).add(step)
            for rec in records:
                ev = rec.get("e")
                if isinstance(ev, dict) and ev.get("id"):
                    self._merge_event(str(ev["id"]), {k: v for k, v in ev.items() if k != "id"},
                                      dirty=False)
        finishes = self._spool.finishes()
        self._spool_dirty = bool(segments or finishes)
        if self._spool_dirty:
            logger.info("MLflow spool %s holds %d segments and %d job ends from earlier drivers; "
                        "sending them", self._spool.root, len(segments), len(finishes))

    def _spill(self) -> None:
        """Move everything unsent from memory into a new spool segment."""
        if self._spool is None or not self._memory_backlog():
            return
        records: list[dict[str, Any]] = []
        points = list(self._pending)
        for i in range(0, len(points), 1000):
            records.append({"m": [list(p) for p in points[i:i + 1000]]})
        if self._pending_tags:
            records.append({"t": dict(self._pending_tags)})
        for eid, fields in self._dirty.items():
            ev = self._events.get(eid, {})
            records.append({"e": {"id": eid, "kind": ev.get("kind"),
                                  **{f: ev.get(f) for f in fields}}})
        try:
            self._spool.write(records)
        except OSError as e:
            if not self._spool_warned:
                logger.warning("cannot write the MLflow spool %s (%s); unsent points stay in memory",
                               self._spool.root, e)
                self._spool_warned = True
            while len(self._pending) > self.max_pending:  # memory is the last resort: bound it
                self._pending.popleft()
            return
        self._pending.clear()
        self._pending_tags.clear()
        self._dirty.clear()
        self._spool_dirty = True

    def _spool_points(self) -> int:
        if self._spool is None:
            return 0
        return sum(sum(len(r.get("m", ())) for r in Spool.read(s)) for s in self._spool.segments())

    def _check_deadline(self) -> None:
        if self._deadline is not None and time.monotonic() >= self._deadline:
            raise _Deadline

    def _drain_spool(self) -> None:
        """Send the spool's segments oldest first, deleting each once it is all in the store."""
        from mlflow.exceptions import MlflowException

        assert self._spool is not None
        for seg in self._spool.segments():
            self._check_deadline()
            records = Spool.read(seg)
            try:
                tags: dict[str, str] = {}
                for rec in records:
                    if isinstance(rec.get("t"), dict):
                        tags.update({str(k): str(v) for k, v in rec["t"].items()})
                    ev = rec.get("e")
                    if isinstance(ev, dict) and ev.get("id"):
                        self._merge_event(str(ev["id"]), {k: v for k, v in ev.items() if k != "id"},
                                          dirty=True)
                # Tags queued in memory since are newer than the spooled ones.
                self._log_tags({k: v for k, v in tags.items() if k not in self._pending_tags})
                self._send_event_tags()
                self._log_points(list(Spool.points(records)))
            except MlflowException as e:
                if getattr(e, "error_code", "") != "INVALID_PARAMETER_VALUE":
                    raise
                self._spool.quarantine(seg, str(e).splitlines()[0][:200] if str(e) else "")
                continue
            Spool.remove(seg)
        for fin in self._spool.finishes():
            if fin == self._finish_dir:
                continue  # this driver's own end: _do_finish logs it
            self._check_deadline()
            self._log_artifact_dir(fin)
            Spool.remove(fin)
        self._spool_dirty = bool(self._spool.segments()) or any(
            f != self._finish_dir for f in self._spool.finishes())

    # ---- MLflow calls (thread only) ------------------------------------------------
    def _sync(self) -> None:
        if self._run_id is None:
            self._setup()
            self._start_monitor()
        if not self._params_done:
            self._log_params()
        if self._spool_dirty:
            self._drain_spool()
        self._send_tags()
        self._send_metrics()
        if self._finish is not None and not self._finish_done:
            self._do_finish()

    def _setup(self) -> None:
        from mlflow.tracking import MlflowClient

        assert self._job is not None and self._tracking_uri is not None
        job, cfg = self._job, self._job.config
        if self._client is None:
            db_dir = _sqlite_dir(self._tracking_uri)
            if db_dir is not None:
                db_dir.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self._tracking_uri)
        client = self._client
        exp_id = self._experiment = self._experiment_id(client, cfg.mlflow.experiment)

        run = None
        stored_id = self._read_run_id(job.job_dir)
        if stored_id:
            try:
                r = client.get_run(stored_id)
            except Exception as e:
                if not _is_not_found(e):
                    raise
            else:
                if r.info.lifecycle_stage == "active" and r.info.experiment_id == exp_id:
                    run = r
        if run is None:
            found = client.search_runs(
                [exp_id], filter_string=f"tags.`{JOB_NAME_TAG}` = '{cfg.name}'",
                order_by=["attributes.start_time DESC"], max_results=1)
            run = found[0] if found else None

        if run is None:
            run = client.create_run(exp_id, run_name=cfg.mlflow.run_name or cfg.name, tags={
                JOB_NAME_TAG: cfg.name,
                "raypod.job_dir": job.job_dir,
                "raypod.submissions": "1",
                "mlflow.source.name": "raypod",
                "mlflow.source.type": "JOB",
            })
            existing: dict[str, str] = {}
        else:
            run_id = run.info.run_id
            client.update_run(run_id, status="RUNNING")
            existing = dict(run.data.params)
            try:
                submissions = int(run.data.tags.get("raypod.submissions", "1")) + 1
            except ValueError:
                submissions = 2
            self._pending_tags.setdefault("raypod.submissions", str(submissions))
            key = "loss" if "loss" in run.data.metrics else next(iter(run.data.metrics), None)
            if key is not None:
                for m in client.get_metric_history(run_id, key):
                    self._prior_steps.add(m.step)
            self._index_prior_events(run.data.tags)
            ws = run.data.metrics.get("world_size")
            if ws is not None and self._prior_ws is None:
                self._prior_ws = float(ws)
                if self._first_ws is not None and self._first_ws[1] != self._prior_ws:
                    step, first, time_s = self._first_ws  # steps came before the run was set up
                    last, self._last_ws = self._last_ws, None
                    self._check_resize(step, first, time_s)
                    self._last_ws = last
        # Params: only new ones; a changed value cannot be overwritten, so tag it.
        for k, v in list(self._params.items()):
            if k in existing:
                if existing[k] != v:
                    self._pending_tags[_clean_key(f"raypod.param_changed.{k}")] = v[:_MAX_TAG_VAL]
                del self._params[k]
        self._run_id = run.info.run_id
        if self._run_id != stored_id:
            self._write_run_id(job.job_dir, self._run_id)
        self._stored_run_id = self._run_id
        self._run_ready.set()

    def _index_prior_events(self, tags: dict[str, str]) -> None:
        """Continue the run's ``raypod.event.N`` numbering; reuse N for events sent before."""
        kinds: dict[int, str] = {}
        for key, value in tags.items():
            m = _EVENT_TAG_RE.match(key)
            if m is None:
                continue
            n = int(m.group(1))
            self._next_event_index = max(self._next_event_index, n + 1)
            if m.group(2) == "id":
                self._event_index[value] = n
            elif m.group(2) == "kind":
                kinds[n] = value
        self._counts["resizes"] = sum(1 for k in kinds.values() if k == "resize")
        self._counts["failures"] = len(kinds) - self._counts["resizes"]

    def _experiment_id(self, client: MlflowClient, name: str) -> str:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            db_dir = _sqlite_dir(self._tracking_uri or "")
            location = ((db_dir / "mlartifacts" / _clean_key(name).replace("/", "_")).as_uri()
                        if db_dir is not None else None)
            try:
                return client.create_experiment(name, artifact_location=location,
                                                tags={_EXPERIMENT_KIND_TAG: _MODEL_TRAINING})
            except Exception as e:
                if not _is_already_exists(e):
                    raise
                exp = client.get_experiment_by_name(name)  # another job created it
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if _EXPERIMENT_KIND_TAG not in exp.tags:  # the UI then opens on runs and charts
            client.set_experiment_tag(exp.experiment_id, _EXPERIMENT_KIND_TAG, _MODEL_TRAINING)
        return exp.experiment_id

    @staticmethod
    def _read_run_id(job_dir: str) -> str | None:
        import fsspec

        try:
            fs, root = fsspec.core.url_to_fs(job_dir)
            with fs.open(f"{root.rstrip('/')}/{RUN_ID_FILE}", "r") as f:
                return f.read().strip() or None
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 - storage trouble: fall back to the tag search
            logger.warning("cannot read %s/%s (%s); looking the run up by job name",
                           job_dir, RUN_ID_FILE, e)
            return None

    @staticmethod
    def _write_run_id(job_dir: str, run_id: str) -> None:
        import fsspec

        try:
            fs, root = fsspec.core.url_to_fs(job_dir)
            root = root.rstrip("/")
            fs.makedirs(root, exist_ok=True)
            with fs.open(f"{root}/{RUN_ID_FILE}", "w") as f:
                f.write(run_id + "\n")
        except Exception as e:  # noqa: BLE001 - the tag search still finds the run
            logger.warning("cannot write %s/%s (%s)", job_dir, RUN_ID_FILE, e)

    def _log_params(self) -> None:
        from mlflow.entities import Param

        assert self._client is not None and self._run_id is not None
        items = list(self._params.items())
        for i in range(0, len(items), _PARAMS_TAGS_PER_BATCH):
            chunk = items[i:i + _PARAMS_TAGS_PER_BATCH]
            try:
                self._client.log_batch(self._run_id, params=[Param(k, v) for k, v in chunk],
                                       synchronous=True)
            except Exception as e:
                if "Changing param values is not allowed" not in str(e):
                    raise
                self._log_params_one_by_one(chunk)
            for k, _ in chunk:
                self._params.pop(k, None)
        self._params_done = True

    def _log_params_one_by_one(self, chunk: list[tuple[str, str]]) -> None:
        assert self._client is not None and self._run_id is not None
        for k, v in chunk:
            try:
                self._client.log_param(self._run_id, k, v, synchronous=True)
            except Exception as e:
                if "Changing param values is not allowed" not in str(e):
                    raise
                self._pending_tags[_clean_key(f"raypod.param_changed.{k}")] = v[:_MAX_TAG_VAL]

    def _log_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        assert self._client is not None and self._run_id is not None
        items = [(_clean_key(k), str(v)[:_MAX_TAG_VAL]) for k, v in tags.items()]
        for i in range(0, len(items), _PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(
                self._run_id, tags=[RunTag(k, v) for k, v in items[i:i + _PARAMS_TAGS_PER_BATCH]],
                synchronous=True)

    def _send_tags(self) -> None:
        if self._pending_tags:
            self._log_tags(self._pending_tags)
            self._pending_tags.clear()
        self._send_event_tags()

    def _send_event_tags(self) -> None:
        """``raypod.event.<N>.<field>`` for every event field not sent yet, N continuing the run's."""
        if not self._dirty:
            return
        tags: dict[str, str] = {}
        for eid, fields in self._dirty.items():
            ev = self._events[eid]
            n = self._event_index.get(eid)
            if n is None:
                n = self._event_index[eid] = self._next_event_index
                self._next_event_index += 1
                self._counts["resizes" if ev.get("kind") == "resize" else "failures"] += 1
                fields = set(ev)  # a new index: send every field
                tags[f"raypod.event.{n}.id"] = eid
            for f in fields:
                if ev.get(f) is not None:
                    tags[f"raypod.event.{n}.{f}"] = _fmt(ev[f])
        tags["raypod.failures"] = str(self._counts["failures"])
        tags["raypod.resizes"] = str(self._counts["resizes"])
        self._log_tags(tags)
        self._dirty.clear()

    def _log_points(self, points: list[tuple[str, float, int, int]]) -> None:
        """Send points in batches that never split a step (so a step is in the store whole)."""
        from mlflow.entities import Metric

        assert self._client is not None and self._run_id is not None
        batch: list[Metric] = []
        for i, (k, v, ts, step) in enumerate(points):
            if step in self._prior_steps:
                continue
            batch.append(Metric(k, v, ts, step))
            last_of_step = i + 1 == len(points) or points[i + 1][3] != step
            if last_of_step and len(batch) >= self.max_batch:
                self._check_deadline()
                self._client.log_batch(self._run_id, metrics=batch, synchronous=True)
                batch = []
        if batch:
            self._client.log_batch(self._run_id, metrics=batch, synchronous=True)

    def _send_metrics(self) -> None:
        if self._pending:
            self._log_points(list(self._pending))
            self._pending.clear()

    # ---- system metrics ------------------------------------------------------------
    def _start_monitor(self) -> None:
        if not self.system_metrics or self._run_id is None:
            return
        if os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "").strip().lower() in ("false", "0"):
            return
        mon = self._monitor
        if mon is not None and getattr(mon, "_process", None) is not None and mon._process.is_alive():
            return
        try:
            import psutil  # noqa: F401 - MLflow's system metrics need it
        except ImportError:
            logger.warning("MLflow system metrics are off: psutil is not installed (pip install psutil)")
            self.system_metrics = False
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self._run_id, sampling_interval=self.system_metrics_interval_s,
                resume_logging=True, tracking_uri=self._tracking_uri)
            self._monitor.start()
        except Exception as e:  # noqa: BLE001 - system metrics are a bonus
            logger.warning("cannot start MLflow system metrics: %s", e)
            self._monitor = None

    def _stop_monitor(self, timeout: float) -> None:
        mon, self._monitor = self._monitor, None
        if mon is None:
            return
        stopper = threading.Thread(target=mon.finish, name="raypod-mlflow-sysmetrics-stop",
                                   daemon=True)
        stopper.start()
        stopper.join(timeout)

    # ---- the end -------------------------------------------------------------------
    def _stage_finish(self) -> None:
        """Write this driver's end (artifacts, final status) into the spool."""
        if self._finish is None or self._finish_dir is not None or self._spool is None:
            return
        summary, summary_path, timeline = self._finish
        final = self._spool.finish_dir(self._uid)
        tmp = final.with_name(final.name + ".tmp")
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "artifacts").mkdir(parents=True)
            self._write_artifacts(tmp / "artifacts", summary, summary_path, timeline)
            (tmp / FINISH_FILE).write_text(json.dumps({"uid": self._uid,
                                                       "status": _run_status(summary)}))
            os.replace(tmp, final)
        except OSError as e:
            logger.warning("cannot stage the run's artifacts in %s: %s", final, e)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        self._finish_dir = final

    def _do_finish(self) -> None:
        assert self._client is not None and self._run_id is not None and self._finish is not None
        summary, summary_path, timeline = self._finish
        self._stage_finish()
        self._check_deadline()
        if not self._model_done:
            self._log_model(summary)
        if self._finish_dir is not None and self._finish_dir.exists():
            if self._model_logged:  # the logged model holds the weights: no second copy
                shutil.rmtree(self._finish_dir / "artifacts" / "model", ignore_errors=True)
            self._log_artifact_dir(self._finish_dir)
        elif self._finish_dir is None:  # the spool is not writable: stage in a temp folder
            with tempfile.TemporaryDirectory(prefix="raypod-mlflow-") as tmp:
                (Path(tmp) / "artifacts").mkdir()
                self._write_artifacts(Path(tmp) / "artifacts", summary, summary_path, timeline)
                if self._model_logged:
                    shutil.rmtree(Path(tmp) / "artifacts" / "model", ignore_errors=True)
                self._log_artifact_dir(Path(tmp))
        if not self._table_done:
            self._check_deadline()
            self._log_events_table()
            self._table_done = True
        self._stop_monitor(5.0)
        self._client.set_terminated(self._run_id, status=_run_status(summary))
        if self._finish_dir is not None:
            Spool.remove(self._finish_dir)
        self._finish_done = True

    def _log_model(self, summary: dict[str, Any]) -> None:
        """The final model as an MLflow logged model (one try; see :mod:`raypod.tracking.model`)."""
        assert self._client is not None and self._run_id is not None and self._job is not None
        self._model_done = True
        if not self._job.config.mlflow.log_model:
            return
        self._model_busy.set()
        try:
            model_id = _model.log_final_model(self._client, self._run_id, self._job,
                                              self._tracking_uri or "", summary.get("final_step"))
        except Exception as e:  # noqa: BLE001 - the plain state dict is logged instead
            logger.warning("%s; logging the plain state dict as model/state_dict.pt instead",
                           redact_text(str(e)) if isinstance(e, _model.ModelNotLogged) else
                           f"cannot log the final model to MLflow: {type(e).__name__}: {redact_text(str(e))[:300]}")
            return
        finally:
            self._model_busy.clear()
        if model_id is not None:
            self._model_logged = True
            self._log_tags({"raypod.model_id": model_id})

    def _log_artifact_dir(self, folder: Path) -> None:
        assert self._client is not None and self._run_id is not None
        arts = folder / "artifacts"
        if arts.is_dir() and any(arts.iterdir()):
            self._client.log_artifacts(self._run_id, str(arts))

    def _log_events_table(self) -> None:
        """Every event this driver knows as rows of the run's ``events_table.json`` (appended)."""
        assert self._client is not None and self._run_id is not None
        if not self._events:
            return
        rows = [{"event": self._event_index.get(eid), "id": eid,
                 **{c: ev.get(c) for c in _EVENT_COLUMNS}} for eid, ev in self._events.items()]
        data = {col: [r.get(col) for r in rows] for col in ("event", "id", *_EVENT_COLUMNS)}
        try:
            self._client.log_table(self._run_id, data=data, artifact_file=EVENTS_TABLE)
        except ImportError as e:  # pandas missing: a plain CSV says the same
            logger.debug("log_table needs pandas (%s); logging events.csv instead", e)
            with tempfile.TemporaryDirectory(prefix="raypod-mlflow-") as tmp:
                path = Path(tmp) / "events.csv"
                with open(path, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(data))
                    w.writeheader()
                    w.writerows(rows)
                self._client.log_artifact(self._run_id, str(path))

    def _write_artifacts(self, out: Path, summary: dict[str, Any], summary_path: str,
                         timeline: list[tuple[float, int, float | None, float | None]]) -> None:
        import yaml

        assert self._job is not None
        cfg = self._job.config
        rows = [{"id": eid, **ev} for eid, ev in self._events.items()]
        (out / "config.yaml").write_text(
            yaml.safe_dump(redact("", cfg.model_dump(mode="json")), sort_keys=False))
        (out / "summary.json").write_bytes(_read_summary(summary, summary_path))
        (out / "events.json").write_text(json.dumps(rows, indent=2, default=str))
        try:
            # A stopped job has seconds before SIGKILL (ray job stop): no plot (about a second of
            # matplotlib); the next driver of the job draws its own when it ends.
            if summary.get("status") != "stopped":
                _plot_timeline(out / "timeline.png", cfg.name, timeline, rows)
        except Exception as e:  # noqa: BLE001 - a plot is not worth losing the run's end
            logger.warning("cannot draw timeline.png: %s", e)
        _model.stage_state_dict(self._job, out / "model")


# ---- artifact helpers ----------------------------------------------------------------


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _num(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _read_summary(summary: dict[str, Any], summary_path: str) -> bytes:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(summary_path)
        with fs.open(path, "rb") as f:
            return f.read()
    except Exception as e:  # noqa: BLE001 - fall back to the dict the driver passed
        logger.debug("cannot read %s (%s); logging the summary dict instead", summary_path, e)
        return json.dumps(summary, indent=2, default=str).encode()


def _plot_timeline(path: Path, title: str,
                   timeline: list[tuple[float, int, float | None, float | None]],
                   rows: list[dict[str, Any]]) -> None:
    """Loss and samples/s over wall time, with failure and recovery markers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_tput = fig.subplots(2, 1, sharex=True)
    for ax, idx, label in ((ax_loss, 2, "loss"), (ax_tput, 3, "samples/s")):
        pts = [(t[0], t[idx]) for t in timeline if t[idx] is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, ".-", markersize=3, linewidth=1)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        labelled: set[str] = set()
        for row in rows:
            marks = ([("resize", row.get("detected_s"), "tab:purple", "-.")]
                     if row.get("kind") == "resize" else
                     [("failure", row.get("detected_s"), "tab:red", "--"),
                      ("recovered", row.get("resumed_s"), "tab:green", ":")])
            for label, x, color, style in marks:
                if isinstance(x, int | float):
                    ax.axvline(x, color=color, linestyle=style, linewidth=1,
                               label=None if label in labelled else label)
                    labelled.add(label)
    if rows:
        ax_loss.legend(loc="upper right", fontsize=8)
    ax_tput.set_xlabel("wall time since job start (s)")
    ax_loss.set_title(f"{title}: training timeline")
    fig.tight_layout()
    fig.savefig(path)
