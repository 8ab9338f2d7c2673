"""The MLflow callback's one background thread: every MLflow call of a job happens here.

The driver's hooks only put operations on a queue (``metrics``, ``tags``, ``event``,
``setup``, ``finish``, ``stop``); :class:`Sender` takes them, keeps the first value of
each ``(metric, step)`` pair (a replayed step's points are dropped, and so are steps
the run or the spool held already), and sends in batches: metric points in
``log_batch`` calls that never split a step, every ``flush_interval_s`` or once
``max_batch`` points wait. When the store fails, what is unsent is spilled to the
job's spool (:mod:`raypod.tracking.spool`) and the send is retried with a doubling
backoff; once the store answers, the spool is sent oldest first, then what is in
memory. At the end everything goes to the spool first and is sent from there until the
shutdown deadline, so what does not make it stays on disk for the job's next driver.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raypod.redact import redact_text, redact_uri
from raypod.tracking.artifacts import RunEnd, log_artifact_dir
from raypod.tracking.events import EventLog
from raypod.tracking.identity import RunIdentity, read_run_id
from raypod.tracking.params import (
    MAX_TAG_VAL,
    clean_key,
    drop_existing,
    log_params,
    log_tags,
    params_from_config,
)
from raypod.tracking.spool import Spool

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

    from raypod.callbacks import JobInfo
    from raypod.tracking.system import DriverMonitor

logger = logging.getLogger("raypod.tracking")


def as_float(value: Any) -> float | None:
    """``value`` as a float, or None when it is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


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


class _Points:
    """Metric points not sent yet, and every ``(metric, step)`` pair taken so far: the first
    value of a pair is kept, a replayed step's is dropped, and steps the run held before
    this driver are never sent again."""

    def __init__(self) -> None:
        self.pending: collections.deque[tuple[str, float, int, int]] = collections.deque()
        self.prior_steps = _StepSet()
        self._accepted: dict[str, _StepSet] = {}

    def take(self, step: int, metrics: dict[str, Any], ts_ms: int) -> float | None:
        """Queue the step's new points; returns its ``world_size`` when that point is new."""
        ws = None
        for key, value in metrics.items():
            v = as_float(value)
            if v is None:
                continue
            key = clean_key(str(key))
            seen = self._accepted.setdefault(key, _StepSet())
            if step in seen:
                continue  # a replayed step: its first value was kept
            seen.add(step)
            self.pending.append((key, v, ts_ms, step))
            if key == "world_size":
                ws = v
        return ws

    def seen(self, key: str, step: int) -> None:
        """A point an earlier driver spooled: it counts as taken."""
        self._accepted.setdefault(key, _StepSet()).add(step)

    def log(self, client: MlflowClient, run_id: str, points: list[tuple[str, float, int, int]],
            max_batch: int, check_deadline: Callable[[], None]) -> None:
        """Send points in batches that never split a step (so a step is in the store whole)."""
        from mlflow.entities import Metric

        batch: list[Metric] = []
        for i, (k, v, ts, step) in enumerate(points):
            if step in self.prior_steps:
                continue
            batch.append(Metric(k, v, ts, step))
            last_of_step = i + 1 == len(points) or points[i + 1][3] != step
            if last_of_step and len(batch) >= max_batch:
                check_deadline()
                client.log_batch(run_id, metrics=batch, synchronous=True)
                batch = []
        if batch:
            client.log_batch(run_id, metrics=batch, synchronous=True)


class _Deadline(Exception):
    """The shutdown deadline passed in the middle of sending."""


class _HandedOver(BaseException):
    """The joining thread took the queue over while this one was inside the store's first call
    (a BaseException: the retry loop's ``except Exception`` must not take it for a store error)."""


@dataclass(frozen=True)
class Pace:
    """How the sender batches, spills and retries (the callback's settings of the same names).

    Args:
        flush_interval_s: Seconds between metric batches (and between spills while the
            store is down).
        max_batch: Metric points per ``log_batch`` call.
        max_pending: Points kept in memory before they are spilled even while the store works.
        max_backoff_s: Longest wait between retries when the store fails.
    """

    flush_interval_s: float
    max_batch: int
    max_pending: int
    max_backoff_s: float


class Sender:
    """The thread that sets the run up and sends a job's params, tags, events and metrics.

    Args:
        job: The job.
        uid: This driver's id (events' and the spooled end's names).
        spool: The job's spool.
        monitor: MLflow's system-metrics monitor of the driver's node.
        pace: How it batches, spills and retries.
        setup_delay_s: MLflow is imported and the run set up only once the job's first
            step is reported, the job fails or ends, someone asks for the run id
            (:meth:`setup_now`), or this many seconds have passed: importing MLflow and
            opening a store take seconds of CPU that would otherwise be taken from the
            job's start. What is queued meanwhile is sent as it would have been.
    """

    def __init__(self, job: JobInfo, uid: str, spool: Spool, monitor: DriverMonitor,
                 pace: Pace, setup_delay_s: float = 0.0) -> None:
        self.pace = pace
        self.spool = spool
        self.monitor = monitor
        self.run = RunIdentity()
        self.events = EventLog(uid)
        self.end = RunEnd(job, uid, spool, self.events, self.run)
        self.failing = False
        self._job = job
        self._queue: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._spool_dirty = False  # segments or finish folders may be waiting in the spool
        self._spool_warned = False
        self._points = _Points()
        self._pending = self._points.pending  # the same deque: it is never replaced
        self._params: dict[str, str] = {}
        self._params_done = False
        self._pending_tags: dict[str, str] = {}
        self._stop = False
        self._staged = False
        self._deadline: float | None = None
        self._hold_until: float | None = time.monotonic() + setup_delay_s if setup_delay_s > 0 else None
        # While the thread is inside the store's first call (``open_run``: a new SQLite store's
        # schema migrations take seconds) it touches nothing but ``self.run``; a join that times
        # out then takes the queue over under this lock (:meth:`_take_over`) and spools it.
        self._handoff = threading.Lock()
        self._opening = False
        self._handed_over = False

    # ---- the driver's side ---------------------------------------------------------
    def put(self, op: tuple[Any, ...]) -> None:
        """Queue one operation for the thread (never blocks)."""
        self._queue.put(op)

    def setup_now(self) -> None:
        """Set the run up without waiting for the first step (someone wants its id)."""
        self._queue.put(("now",))

    def start(self) -> None:
        """Start the thread."""
        self._thread = threading.Thread(target=self._main, name="raypod-mlflow", daemon=True)
        self._thread.start()

    def join(self, timeout: float, model_timeout_s: float) -> None:
        """Ask the thread to send what is left and stop; wait ``timeout`` seconds for it
        (``model_timeout_s`` more while the final model is being logged)."""
        if self._thread is None:
            return
        self._queue.put(("stop", time.monotonic() + max(0.0, timeout - 0.5)))
        self._thread.join(timeout)
        if self._thread.is_alive() and self.end.model_busy.is_set():
            logger.info("waiting up to %.0f s more while the final model is logged to MLflow",
                        model_timeout_s)
            self._thread.join(model_timeout_s)
        if self._thread.is_alive() and self._take_over():
            logger.warning("MLflow tracking did not finish within %.1f s: the tracking store was still "
                           "being opened, so this driver's metrics, events and end were kept in %s; "
                           "they are sent when job '%s' runs again", timeout, self.spool_path,
                           self._job.config.name)
        elif self._thread.is_alive():
            logger.warning("MLflow tracking did not finish within %.1f s; what is unsent stays in %s",
                           timeout, self.spool_path)

    def _take_over(self) -> bool:
        """When the thread is still inside the store's first call: take what it holds and what
        is queued, and put it all in the spool here (the thread drops its work when its call
        returns). False when the thread is past that call (it spools on its own)."""
        with self._handoff:
            if not self._opening:
                return False
            self._handed_over = True
        while True:
            try:
                self._absorb(self._queue.get_nowait())
            except queue.Empty:
                break
        self._spill()
        self.end.stage()
        self._staged = True
        return True

    @property
    def spool_path(self) -> Path:
        """The job's spool folder."""
        return self.spool.root

    # ---- the loop ------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._load_spool()
            self._loop()
        except _HandedOver:
            pass  # the joining thread spooled everything
        except BaseException:  # never let tracking hurt the driver
            logger.exception("MLflow tracking thread crashed; tracking stops")
            try:
                self._spill()
            except Exception:  # noqa: BLE001
                pass
        finally:
            self.monitor.stop(5.0)
            self.run.ready.set()

    def _loop(self) -> None:
        backoff = 1.0
        next_try = 0.0
        next_flush = time.monotonic() + self.pace.flush_interval_s
        while True:
            self._take(self._wait_s(time.monotonic(), next_try, next_flush))
            now = time.monotonic()
            if self._stop and not self._staged:
                # The job is over: everything goes to disk first, then is sent from there,
                # so whatever does not make it before the deadline is already safe.
                self._spill()
                self.end.stage()
                self._staged = True
            elif self._memory_backlog() and (
                    len(self._pending) >= self.pace.max_pending
                    or (self.failing and now >= next_flush)):
                self._spill()
                next_flush = now + self.pace.flush_interval_s
            if self._stop and self._deadline is not None and now >= self._deadline:
                self._give_up()
                return
            if self._due(now, next_flush) and now >= next_try:
                try:
                    self._sync()
                except _Deadline:
                    continue
                except Exception as e:  # noqa: BLE001 - the store failed: retry later
                    self._on_failure(e, backoff)
                    next_try = time.monotonic() + backoff
                    backoff = min(backoff * 2, self.pace.max_backoff_s)
                else:
                    self._on_success()
                    backoff = 1.0
                    next_flush = time.monotonic() + self.pace.flush_interval_s
            if self.end.done or (self._stop and self.end.finish is None and self._all_sent()):
                return

    def _wait_s(self, now: float, next_try: float, next_flush: float) -> float:
        """How long to wait for the next operation before looking at what is due."""
        if now < next_try:
            wait = next_try - now
            if self._memory_backlog():
                wait = min(wait, max(0.0, next_flush - now))
        elif self._pending:
            wait = max(0.0, next_flush - now)
        else:
            wait = 1.0
        if self._hold_until is not None:
            wait = min(wait, max(0.0, self._hold_until - now))
        if self._deadline is not None:
            wait = min(wait, max(0.0, self._deadline - now))
        return wait

    def _take(self, wait: float) -> None:
        """Take every queued operation (waiting ``wait`` seconds at most for the first)."""
        try:
            op = self._queue.get(timeout=wait)
            self._absorb(op)
            while True:
                self._absorb(self._queue.get_nowait())
        except queue.Empty:
            pass

    def _due(self, now: float, next_flush: float) -> bool:
        if self._hold_until is not None:
            if now < self._hold_until:
                return False  # the job is starting: MLflow waits (see setup_delay_s)
            self._hold_until = None
        return (self.run.run_id is None or not self._params_done or self._spool_dirty
                or bool(self._pending_tags) or bool(self.events.dirty)
                or len(self._pending) >= self.pace.max_batch
                or (bool(self._pending) and now >= next_flush)
                or self.end.pending)

    def _memory_backlog(self) -> bool:
        return bool(self._pending or self._pending_tags or self.events.dirty)

    def _all_sent(self) -> bool:
        return (self.run.run_id is not None and self._params_done and not self._spool_dirty
                and not self._memory_backlog())

    def _absorb(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind in ("metrics", "event", "finish", "stop", "now"):
            self._hold_until = None  # the job is past its start (or someone waits for the run)
        if kind == "metrics":
            self._absorb_metrics(*op[1:])
        elif kind == "tags":
            for k, v in op[1].items():
                self._pending_tags[clean_key(k)] = str(v)[:MAX_TAG_VAL]
        elif kind == "event":
            self.events.merge(op[1], op[2], dirty=True)
        elif kind == "setup":
            self.run.tracking_uri, self._params = op[1], op[2]
        elif kind == "finish":
            self.end.finish = op[1:]
        elif kind == "stop":
            self._stop = True
            self._deadline = op[1] if self._deadline is None else min(self._deadline, op[1])

    def _absorb_metrics(self, step: int, metrics: dict[str, Any], ts_ms: int, time_s: float) -> None:
        ws = self._points.take(step, metrics, ts_ms)
        if ws is not None:
            self.events.check_resize(step, ws, time_s)

    # ---- failures ------------------------------------------------------------------
    def _on_failure(self, exc: Exception, backoff: float) -> None:
        msg = redact_text(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")[:300]
        if getattr(exc, "error_code", "") in ("INVALID_STATE", "RESOURCE_DOES_NOT_EXIST") \
                and self.run.run_id is not None:
            logger.warning("MLflow run %s is gone or not active (%s); setting the run up again",
                           self.run.run_id, msg)
            self._reset_run()
        if not self.failing:
            logger.warning("MLflow tracking store %s failed (%s); training goes on, points "
                           "are kept in %s and sent when it is back", redact_uri(self.run.tracking_uri),
                           msg, self.spool_path)
            self.failing = True
        else:
            logger.debug("MLflow send failed again (%s); retry in %.0f s", msg, backoff)
        self._spill()

    def _on_success(self) -> None:
        if self.failing:
            logger.warning("MLflow tracking store reachable again (%s); spooled "
                           "points sent", redact_uri(self.run.tracking_uri))
            self.failing = False
            # MLflow's monitor stops when the store fails
            self.monitor.start(self.run.run_id, self.run.tracking_uri)

    def _reset_run(self) -> None:
        self.monitor.stop(2.0)
        self.run.run_id = None
        self._params = params_from_config(self._job.config)
        self._params_done = False
        self.events.forget_index()

    def _give_up(self) -> None:
        self._spill()
        waiting = self._spool_points()
        if waiting or self.run.run_id is None or self.end.pending:
            logger.warning(
                "MLflow tracking store %s still unreachable at the end: %s%d metric points%s kept "
                "in %s; they are sent when job '%s' runs again", redact_uri(self.run.tracking_uri),
                "the run was never set up; " if self.run.run_id is None else "", waiting,
                " and the run's end" if self.end.pending else "",
                self.spool_path, self._job.config.name)

    def _check_deadline(self) -> None:
        if self._deadline is not None and time.monotonic() >= self._deadline:
            raise _Deadline

    # ---- the spool -----------------------------------------------------------------
    def _load_spool(self) -> None:
        """Register what earlier drivers spooled: its steps count as logged, its events as known."""
        self.run.stored_run_id = read_run_id(self._job.job_dir)
        segments = self.spool.segments()
        for seg in segments:
            records = Spool.read(seg)
            for key, _, _, step in Spool.points(records):
                self._points.seen(key, step)
            self.events.merge_spooled(records, dirty=False)
        finishes = self.spool.finishes()
        self._spool_dirty = bool(segments or finishes)
        if self._spool_dirty:
            logger.info("MLflow spool %s holds %d segments and %d job ends from earlier drivers; "
                        "sending them", self.spool.root, len(segments), len(finishes))

    def _spill(self) -> None:
        """Move everything unsent from memory into a new spool segment."""
        if not self._memory_backlog():
            return
        records: list[dict[str, Any]] = []
        points = list(self._pending)
        for i in range(0, len(points), 1000):
            records.append({"m": [list(p) for p in points[i:i + 1000]]})
        if self._pending_tags:
            records.append({"t": dict(self._pending_tags)})
        records.extend(self.events.spool_records())
        try:
            self.spool.write(records)
        except OSError as e:
            if not self._spool_warned:
                logger.warning("cannot write the MLflow spool %s (%s); unsent points stay in memory",
                               self.spool.root, e)
                self._spool_warned = True
            while len(self._pending) > self.pace.max_pending:  # memory is the last resort: bound it
                self._pending.popleft()
            return
        self._pending.clear()
        self._pending_tags.clear()
        self.events.dirty.clear()
        self._spool_dirty = True

    def _spool_points(self) -> int:
        return sum(sum(len(r.get("m", ())) for r in Spool.read(s)) for s in self.spool.segments())

    def _drain_spool(self) -> None:
        """Send the spool's segments oldest first, deleting each once it is all in the store."""
        from mlflow.exceptions import MlflowException

        assert self.run.client is not None and self.run.run_id is not None
        for seg in self.spool.segments():
            self._check_deadline()
            records = Spool.read(seg)
            try:
                self._send_spooled(records)
            except MlflowException as e:
                if getattr(e, "error_code", "") != "INVALID_PARAMETER_VALUE":
                    raise
                self.spool.quarantine(seg, str(e).splitlines()[0][:200] if str(e) else "")
                continue
            Spool.remove(seg)
        for fin in self.spool.finishes():
            if fin == self.end.dir:
                continue  # this driver's own end: RunEnd.send logs it
            self._check_deadline()
            log_artifact_dir(self.run.client, self.run.run_id, fin)
            Spool.remove(fin)
        self._spool_dirty = bool(self.spool.segments()) or any(
            f != self.end.dir for f in self.spool.finishes())

    def _send_spooled(self, records: list[dict[str, Any]]) -> None:
        """One segment's tags, events and points."""
        assert self.run.client is not None and self.run.run_id is not None
        tags: dict[str, str] = {}
        for rec in records:
            if isinstance(rec.get("t"), dict):
                tags.update({str(k): str(v) for k, v in rec["t"].items()})
        self.events.merge_spooled(records, dirty=True)
        # Tags queued in memory since are newer than the spooled ones.
        log_tags(self.run.client, self.run.run_id,
                 {k: v for k, v in tags.items() if k not in self._pending_tags})
        self._send_event_tags()
        self._log_points(list(Spool.points(records)))

    # ---- MLflow calls --------------------------------------------------------------
    def _sync(self) -> None:
        if self.run.run_id is None:
            self._setup()
            self.monitor.start(self.run.run_id, self.run.tracking_uri)
        if not self._params_done:
            assert self.run.client is not None and self.run.run_id is not None
            log_params(self.run.client, self.run.run_id, self._params, self._pending_tags)
            self._params_done = True
        if self._spool_dirty:
            self._drain_spool()
        self._send_tags()
        self._send_metrics()
        if self.end.pending:
            self.end.send(self._check_deadline, self.monitor.stop)

    def _setup(self) -> None:
        with self._handoff:
            self._opening = True
        try:
            run, continued, stored_id = self.run.open_run(self._job)
        finally:
            with self._handoff:
                self._opening = False
                if self._handed_over:
                    raise _HandedOver
        existing = self._continue_run(run) if continued else {}
        # Params: only new ones; a changed value cannot be overwritten, so tag it.
        drop_existing(self._params, existing, self._pending_tags)
        self.run.adopt(self._job.job_dir, run.info.run_id, stored_id)

    def _continue_run(self, run: Run) -> dict[str, str]:
        """Pick up an earlier run: its submissions, logged steps, events and world size.

        Returns:
            The run's params.
        """
        client = self.run.client
        assert client is not None
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
                self._points.prior_steps.add(m.step)
        self.events.index_prior(run.data.tags)
        self.events.continue_world_size(run.data.metrics.get("world_size"))
        return existing

    def _send_tags(self) -> None:
        if self._pending_tags:
            assert self.run.client is not None and self.run.run_id is not None
            log_tags(self.run.client, self.run.run_id, self._pending_tags)
            self._pending_tags.clear()
        self._send_event_tags()

    def _send_event_tags(self) -> None:
        """``raypod.event.<N>.<field>`` for every event field not sent yet, N continuing the run's."""
        if not self.events.dirty:
            return
        assert self.run.client is not None and self.run.run_id is not None
        log_tags(self.run.client, self.run.run_id, self.events.unsent_tags())
        self.events.dirty.clear()

    def _log_points(self, points: list[tuple[str, float, int, int]]) -> None:
        assert self.run.client is not None and self.run.run_id is not None
        self._points.log(self.run.client, self.run.run_id, points, self.pace.max_batch,
                         self._check_deadline)

    def _send_metrics(self) -> None:
        if self._pending:
            self._log_points(list(self._pending))
            self._pending.clear()
