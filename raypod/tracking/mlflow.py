"""MLflow tracking for raypod jobs, as a driver :class:`~raypod.callbacks.Callback`.

One MLflow run per job name, continued across failures, driver restarts and
resubmissions: the run id is kept in ``<job_dir>/mlflow_run_id``. Every MLflow call
happens in one background thread fed by a queue, so no hook ever waits for the
tracking store (``after_job`` excepted: it flushes and joins with a timeout). Metrics
are batched (``log_batch``), each ``(metric, step)`` pair is logged at most once even
when steps are replayed after a failure, secrets in the config are redacted before
they become params, and an unreachable tracking server only produces warnings while
the points wait in memory and sends are retried with backoff.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import queue
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raypod.callbacks import Callback, FailureEvent, JobInfo, StepReport

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from raypod.config import JobConfig

logger = logging.getLogger("raypod.tracking")

RUN_ID_FILE = "mlflow_run_id"
"""Name of the file under the job folder that holds the job's MLflow run id."""
JOB_NAME_TAG = "raypod.job_name"
"""Tag that keys a run to its job name."""
REDACTED = "***REDACTED***"

_MAX_PARAM_VAL = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_MAX_TAG_VAL = 5000  # below MLflow 3's 8000, which older servers do not accept
_MAX_KEY = 250
_PARAMS_TAGS_PER_BATCH = 100
_SECRET_KEY_RE = re.compile(
    r"token(?!izer|s)|passw(or)?d|secret|credential|api[_-]?key|access[_-]?key|private[_-]?key",
    re.IGNORECASE,
)
_SECRET_VALUE_RE = re.compile(
    r"^(sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}"
    r"|xox[abposr]-[A-Za-z0-9-]{10,}|(AKIA|ASIA)[A-Z0-9]{16}|glpat-[A-Za-z0-9_-]{20,}"
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*)$"
    r"|://[^/\s:@]+:[^/\s@]+@"  # credentials inside a URL
    r"|^\s*bearer\s+\S{8,}",
    re.IGNORECASE,
)
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")
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


def redact(key: str, value: Any) -> Any:
    """Return ``value``, or :data:`REDACTED` when the key or the value looks secret.

    Args:
        key: A (dotted) config key; keys naming tokens, passwords, secrets,
            credentials, API or access keys are redacted whatever their value.
        value: The value; strings that look like tokens, keys or URLs with
            credentials are redacted whatever their key. Dicts and lists are
            redacted element by element.

    Returns:
        The value with secrets replaced.
    """
    if _SECRET_KEY_RE.search(key) and value not in (None, "", {}, []):
        return REDACTED
    if isinstance(value, dict):
        return {k: redact(f"{key}.{k}", v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(key, v) for v in value]
    if isinstance(value, str) and _SECRET_VALUE_RE.search(value):
        return REDACTED
    return value


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


class MLflowCallback(Callback):
    """Logs a raypod job to MLflow: params, per-step metrics, events, artifacts.

    All MLflow work runs in one daemon thread; the hooks only enqueue. Use
    :meth:`wait_run_id` to learn the run id (e.g. for ``summary.json``).

    Args:
        flush_interval_s: Seconds between metric batches.
        max_batch: Metric points per ``log_batch`` call (MLflow allows 1000).
        max_pending: Points kept in memory while the store is unreachable; the
            oldest are dropped beyond this.
        join_timeout_s: How long ``after_job`` / :meth:`close` wait for the last
            sends before giving up.
        max_backoff_s: Longest wait between retries when the store fails.
    """

    def __init__(self, flush_interval_s: float = 1.0, max_batch: int = 500,
                 max_pending: int = 1_000_000, join_timeout_s: float = 30.0,
                 max_backoff_s: float = 30.0) -> None:
        self.flush_interval_s = flush_interval_s
        self.max_batch = max(1, min(max_batch, 1000))
        self.max_pending = max_pending
        self.join_timeout_s = join_timeout_s
        self.max_backoff_s = max_backoff_s

        # Driver-side state (touched by the hooks only).
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._job: JobInfo | None = None
        self._enabled = False
        self._closed = False
        self._events: list[FailureEvent] = []
        self._timeline: list[tuple[float, int, float | None, float | None]] = []

        # Thread-side state.
        self._run_ready = threading.Event()
        self._run_id: str | None = None
        self._client: MlflowClient | None = None
        self._tracking_uri: str | None = None
        self._pending: collections.deque[tuple[str, float, int, int]] = collections.deque()
        self._dropped = 0
        self._accepted: dict[str, _StepSet] = {}
        self._prior_steps = _StepSet()
        self._params: dict[str, str] = {}
        self._params_done = False
        self._pending_tags: dict[str, str] = {}
        self._finish: tuple[dict[str, Any], str, list[dict[str, Any]], Any] | None = None
        self._finish_done = False
        self._artifacts_done = False
        self._stop = False
        self._deadline: float | None = None
        self._failing = False

    # ---- public API ----------------------------------------------------------------
    @property
    def run_id(self) -> str | None:
        """The run id once the run is set up (None before, or when it never was)."""
        return self._run_id

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
        self._enabled = True
        params = params_from_config(cfg)
        uri = resolve_tracking_uri(cfg, job.job_dir)
        self._queue.put(("setup", uri, params))
        self._thread = threading.Thread(target=self._main, name="raypod-mlflow", daemon=True)
        self._thread.start()

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
        self._queue.put(("metrics", report.step, dict(m), ts_ms))

    def after_failure(self, event: FailureEvent) -> None:
        """Record the failure as ``raypod.event.<n>.*`` tags and an events row."""
        if not self._enabled:
            return
        n = len(self._events)
        self._events.append(event)
        tags = {
            f"raypod.event.{n}.kind": event.kind,
            f"raypod.event.{n}.step": str(event.step),
            f"raypod.event.{n}.rank": str(event.rank),
            f"raypod.event.{n}.detected_s": f"{event.detected_s:.3f}",
            "raypod.failures": str(len(self._events)),
        }
        if event.message:
            tags[f"raypod.event.{n}.message"] = event.message[:500]
        self._queue.put(("tags", tags))

    def after_recovery(self, event: FailureEvent) -> None:
        """Add the recovery's ``resumed_s``, ``lost_steps``, ... to the event's tags."""
        if not self._enabled:
            return
        n = self._event_index(event)
        tags: dict[str, str] = {}
        for name in ("resumed_s", "lost_steps", "world_size_after", "restored_from"):
            value = getattr(event, name)
            if value is not None:
                tags[f"raypod.event.{n}.{name}"] = (
                    f"{value:.3f}" if isinstance(value, float) else str(value))
        self._queue.put(("tags", tags))

    def after_checkpoint(self, step: int, path: str) -> None:
        """Tag the last committed checkpoint."""
        if not self._enabled:
            return
        self._queue.put(("tags", {"raypod.last_checkpoint_step": str(step),
                                  "raypod.last_checkpoint": path}))

    def before_summary(self, summary: dict[str, Any]) -> None:
        """Put the run id into ``summary.json`` (waits briefly if the run is still being set up)."""
        if self._enabled:
            summary["mlflow_run_id"] = self.wait_run_id(timeout=60)

    def after_job(self, summary: dict[str, Any], summary_path: str) -> None:
        """Log the artifacts, end the run, flush and join the thread (bounded wait)."""
        if not self._enabled or self._closed or self._job is None:
            return
        rows = [e.to_summary() for e in self._events]
        self._queue.put(("finish", dict(summary), summary_path, rows,
                         list(self._timeline)))
        self._closed = True
        self._shutdown(self.join_timeout_s)

    # ---- driver-side helpers -------------------------------------------------------
    def _event_index(self, event: FailureEvent) -> int:
        for i, e in enumerate(self._events):
            if e is event:
                return i
        for i, e in enumerate(self._events):
            if (e.kind, e.step, e.detected_s) == (event.kind, event.step, event.detected_s):
                self._events[i] = event
                return i
        self._events.append(event)
        return len(self._events) - 1

    def _shutdown(self, timeout: float) -> None:
        if self._thread is None:
            return
        self._queue.put(("stop", time.monotonic() + max(0.0, timeout - 0.5)))
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("MLflow tracking did not finish within %.0f s; giving up on it",
                           timeout)

    # ---- the thread ----------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._loop()
        except BaseException:  # never let tracking hurt the driver
            logger.exception("MLflow tracking thread crashed; tracking stops")
        finally:
            self._run_ready.set()

    def _loop(self) -> None:
        backoff = 1.0
        next_try = 0.0
        next_flush = time.monotonic() + self.flush_interval_s
        while True:
            now = time.monotonic()
            if now < next_try:
                wait = next_try - now
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
            if self._stop and self._deadline is not None and now >= self._deadline:
                self._give_up()
                return
            due = (self._run_id is None or not self._params_done or bool(self._pending_tags)
                   or len(self._pending) >= self.max_batch
                   or (bool(self._pending) and now >= next_flush)
                   or (self._finish is not None and not self._finish_done)
                   or (self._stop and bool(self._pending)))
            if due and now >= next_try:
                try:
                    self._sync()
                except Exception as e:  # noqa: BLE001 - the store failed: retry later
                    self._on_failure(e, backoff)
                    next_try = time.monotonic() + backoff
                    backoff = min(backoff * 2, self.max_backoff_s)
                else:
                    if self._failing:
                        logger.warning("MLflow tracking store reachable again (%s)",
                                       self._tracking_uri)
                        self._failing = False
                    backoff = 1.0
                    next_flush = time.monotonic() + self.flush_interval_s
            if self._finish_done or (self._stop and self._finish is None
                                     and self._run_id is not None and not self._pending
                                     and not self._pending_tags and self._params_done):
                return

    def _absorb(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "metrics":
            _, step, metrics, ts_ms = op
            for key, value in metrics.items():
                v = _num(value)
                if v is None:
                    continue
                key = _clean_key(str(key))
                seen = self._accepted.setdefault(key, _StepSet())
                if step in seen:
                    continue  # a replayed step: its first value was kept
                seen.add(step)
                if len(self._pending) >= self.max_pending:
                    self._pending.popleft()
                    self._dropped += 1
                    if self._dropped == 1:
                        logger.warning("MLflow tracking: more than %d points waiting; "
                                       "dropping the oldest", self.max_pending)
                self._pending.append((key, v, ts_ms, step))
        elif kind == "tags":
            for k, v in op[1].items():
                self._pending_tags[_clean_key(k)] = str(v)[:_MAX_TAG_VAL]
        elif kind == "setup":
            self._tracking_uri, self._params = op[1], op[2]
        elif kind == "finish":
            self._finish = op[1:]
        elif kind == "stop":
            self._stop = True
            self._deadline = op[1] if self._deadline is None else min(self._deadline, op[1])

    def _on_failure(self, exc: Exception, backoff: float) -> None:
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        if not self._failing:
            logger.warning("MLflow tracking store %s failed (%s); training goes on, points "
                           "are kept in memory and sends retried", self._tracking_uri, msg)
            self._failing = True
        else:
            logger.debug("MLflow send failed again (%s); retry in %.0f s", msg, backoff)

    def _give_up(self) -> None:
        lost = len(self._pending)
        if lost or self._run_id is None or (self._finish is not None and not self._finish_done):
            logger.warning("MLflow tracking gave up at shutdown: %s%d metric points not logged",
                           "the run was never set up; " if self._run_id is None else "", lost)

    # ---- MLflow calls (thread only) ------------------------------------------------
    def _sync(self) -> None:
        if self._run_id is None:
            self._setup()
        if not self._params_done:
            self._log_params()
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
        exp_id = self._experiment_id(client, cfg.mlflow.experiment)

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
        # Params: only new ones; a changed value cannot be overwritten, so tag it.
        for k, v in list(self._params.items()):
            if k in existing:
                if existing[k] != v:
                    self._pending_tags[_clean_key(f"raypod.param_changed.{k}")] = v[:_MAX_TAG_VAL]
                del self._params[k]
        self._run_id = run.info.run_id
        self._write_run_id(job.job_dir, self._run_id)
        self._run_ready.set()

    def _experiment_id(self, client: MlflowClient, name: str) -> str:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            db_dir = _sqlite_dir(self._tracking_uri or "")
            location = ((db_dir / "mlartifacts" / _clean_key(name).replace("/", "_")).as_uri()
                        if db_dir is not None else None)
            try:
                return client.create_experiment(name, artifact_location=location)
            except Exception as e:
                if not _is_already_exists(e):
                    raise
                exp = client.get_experiment_by_name(name)  # another job created it
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
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

    def _send_tags(self) -> None:
        from mlflow.entities import RunTag

        assert self._client is not None and self._run_id is not None
        while self._pending_tags:
            chunk = dict(itertools.islice(self._pending_tags.items(), _PARAMS_TAGS_PER_BATCH))
            self._client.log_batch(self._run_id, tags=[RunTag(k, v) for k, v in chunk.items()],
                                   synchronous=True)
            for k, v in chunk.items():
                if self._pending_tags.get(k) == v:  # not updated meanwhile
                    del self._pending_tags[k]

    def _send_metrics(self) -> None:
        from mlflow.entities import Metric

        assert self._client is not None and self._run_id is not None
        while self._pending:
            chunk = list(itertools.islice(self._pending, self.max_batch))
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in chunk
                       if step not in self._prior_steps]
            if metrics:
                self._client.log_batch(self._run_id, metrics=metrics, synchronous=True)
            for _ in chunk:
                self._pending.popleft()

    def _do_finish(self) -> None:
        assert self._client is not None and self._run_id is not None and self._job is not None
        summary, summary_path, rows, timeline = self._finish  # type: ignore[misc]
        if not self._artifacts_done:
            with tempfile.TemporaryDirectory(prefix="raypod-mlflow-") as tmp:
                self._write_artifacts(Path(tmp), summary, summary_path, rows, timeline)
                self._client.log_artifacts(self._run_id, tmp)
            self._artifacts_done = True
        self._client.set_terminated(self._run_id, status=_run_status(summary))
        self._finish_done = True

    def _write_artifacts(self, tmp: Path, summary: dict[str, Any], summary_path: str,
                         rows: list[dict[str, Any]],
                         timeline: list[tuple[float, int, float | None, float | None]]) -> None:
        import yaml

        assert self._job is not None
        cfg = self._job.config
        (tmp / "config.yaml").write_text(
            yaml.safe_dump(redact("", cfg.model_dump(mode="json")), sort_keys=False))
        (tmp / "summary.json").write_bytes(_read_summary(summary, summary_path))
        (tmp / "events.json").write_text(json.dumps(rows, indent=2, default=str))
        try:
            _plot_timeline(tmp / "timeline.png", cfg.name, timeline, rows)
        except Exception as e:  # noqa: BLE001 - a plot is not worth losing the run's end
            logger.warning("cannot draw timeline.png: %s", e)


# ---- artifact helpers ----------------------------------------------------------------


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
        for i, row in enumerate(rows):
            if row.get("detected_s") is not None:
                ax.axvline(row["detected_s"], color="tab:red", linestyle="--", linewidth=1,
                           label=f"failure ({row.get('kind')})" if i == 0 else None)
            if row.get("resumed_s") is not None:
                ax.axvline(row["resumed_s"], color="tab:green", linestyle=":", linewidth=1,
                           label="recovered" if i == 0 else None)
    if rows:
        ax_loss.legend(loc="upper right", fontsize=8)
    ax_tput.set_xlabel("wall time since job start (s)")
    ax_loss.set_title(f"{title}: training timeline")
    fig.tight_layout()
    fig.savefig(path)
