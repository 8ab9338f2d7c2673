"""The end of a job in its MLflow run: artifacts, the events table, the final model, the status.

When a driver's job ends, the callback's thread first *stages* the end in the spool
(``finish-<driver id>/`` with ``config.yaml`` (redacted), ``summary.json``,
``events.json``, ``timeline.png`` and the plain state dict, beside ``finish.json``
holding the run's final status), so an end that cannot be sent is kept for the job's
next driver. Sending it logs the final model (:mod:`raypod.tracking.model`), the staged
artifacts (without the state dict when the model was logged), the ``events_table.json``
table, and ends the run.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raypod.redact import redact, redact_text
from raypod.tracking import model as _model
from raypod.tracking.identity import run_status
from raypod.tracking.params import log_tags
from raypod.tracking.spool import FINISH_FILE, Spool

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from raypod.callbacks import JobInfo
    from raypod.tracking.events import EventLog
    from raypod.tracking.identity import RunIdentity

logger = logging.getLogger("raypod.tracking")

EVENTS_TABLE = "events_table.json"
"""Run artifact (an MLflow table) with one row per failure, recovery and resize."""

Timeline = list[tuple[float, int, float | None, float | None]]
"""``(time_s, step, loss, samples_per_s)`` per step, for ``timeline.png``."""


class RunEnd:
    """This driver's end of the run: staged in the spool, then sent (each part once).

    Args:
        job: The job.
        uid: This driver's id (names its ``finish-*`` folder in the spool).
        spool: The job's spool (when it cannot be written, the end is staged in a temporary
            folder when it is sent).
        events: The job's events (for ``events.json``, the plot and the table).
        run: The run to send to.
    """

    def __init__(self, job: JobInfo, uid: str, spool: Spool, events: EventLog,
                 run: RunIdentity) -> None:
        self._job = job
        self._uid = uid
        self._spool = spool
        self._events = events
        self._run = run
        self.finish: tuple[dict[str, Any], str, Timeline] | None = None
        self.dir: Path | None = None
        self.done = False
        self._table_done = False
        self._model_done = False
        self._model_logged = False
        self.model_busy = threading.Event()
        """Set while the final model is being logged (the driver then waits longer)."""

    @property
    def pending(self) -> bool:
        """The job ended and its end is not in the store yet."""
        return self.finish is not None and not self.done

    def stage(self) -> None:
        """Write this driver's end (artifacts, final status) into the spool."""
        if self.finish is None or self.dir is not None:
            return
        summary, summary_path, timeline = self.finish
        final = self._spool.finish_dir(self._uid)
        tmp = final.with_name(final.name + ".tmp")
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / "artifacts").mkdir(parents=True)
            self._write(tmp / "artifacts", summary, summary_path, timeline)
            (tmp / FINISH_FILE).write_text(json.dumps({"uid": self._uid,
                                                       "status": run_status(summary)}))
            os.replace(tmp, final)
        except OSError as e:
            logger.warning("cannot stage the run's artifacts in %s: %s", final, e)
            shutil.rmtree(tmp, ignore_errors=True)
            return
        self.dir = final

    def send(self, check_deadline: Callable[[], None], stop_monitor: Callable[[float], None]) -> None:
        """Log the model, the artifacts and the events table, and end the run.

        Args:
            check_deadline: Raises when the driver's shutdown deadline has passed.
            stop_monitor: Stops MLflow's system metrics (given a timeout) before the run ends.
        """
        client, run_id = self._run.client, self._run.run_id
        assert client is not None and run_id is not None and self.finish is not None
        summary, summary_path, timeline = self.finish
        self.stage()
        check_deadline()
        if not self._model_done:
            self._log_model(client, run_id, summary)
        if self.dir is not None and self.dir.exists():
            if self._model_logged:  # the logged model holds the weights: no second copy
                shutil.rmtree(self.dir / "artifacts" / "model", ignore_errors=True)
            log_artifact_dir(client, run_id, self.dir)
        elif self.dir is None:  # the spool is not writable: stage in a temp folder
            with tempfile.TemporaryDirectory(prefix="raypod-mlflow-") as tmp:
                (Path(tmp) / "artifacts").mkdir()
                self._write(Path(tmp) / "artifacts", summary, summary_path, timeline)
                if self._model_logged:
                    shutil.rmtree(Path(tmp) / "artifacts" / "model", ignore_errors=True)
                log_artifact_dir(client, run_id, Path(tmp))
        if not self._table_done:
            check_deadline()
            self._log_events_table(client, run_id)
            self._table_done = True
        stop_monitor(5.0)
        client.set_terminated(run_id, status=run_status(summary))
        if self.dir is not None:
            Spool.remove(self.dir)
        self.done = True

    def _log_model(self, client: MlflowClient, run_id: str, summary: dict[str, Any]) -> None:
        """The final model as an MLflow logged model (one try; see :mod:`raypod.tracking.model`)."""
        self._model_done = True
        if not self._job.config.mlflow.log_model:
            return
        self.model_busy.set()
        try:
            model_id = _model.log_final_model(client, run_id, self._job,
                                              self._run.tracking_uri or "", summary.get("final_step"))
        except Exception as e:  # noqa: BLE001 - the plain state dict is logged instead
            logger.warning("%s; logging the plain state dict as model/state_dict.pt instead",
                           redact_text(str(e)) if isinstance(e, _model.ModelNotLogged) else
                           f"cannot log the final model to MLflow: {type(e).__name__}: {redact_text(str(e))[:300]}")
            return
        finally:
            self.model_busy.clear()
        if model_id is not None:
            self._model_logged = True
            log_tags(client, run_id, {"raypod.model_id": model_id})

    def _log_events_table(self, client: MlflowClient, run_id: str) -> None:
        """Every event this driver knows as rows of the run's ``events_table.json`` (appended)."""
        if not self._events.events:
            return
        rows, data = self._events.table()
        try:
            client.log_table(run_id, data=data, artifact_file=EVENTS_TABLE)
        except ImportError as e:  # pandas missing: a plain CSV says the same
            logger.debug("log_table needs pandas (%s); logging events.csv instead", e)
            with tempfile.TemporaryDirectory(prefix="raypod-mlflow-") as tmp:
                path = Path(tmp) / "events.csv"
                with open(path, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(data))
                    w.writeheader()
                    w.writerows(rows)
                client.log_artifact(run_id, str(path))

    def _write(self, out: Path, summary: dict[str, Any], summary_path: str,
               timeline: Timeline) -> None:
        import yaml

        cfg = self._job.config
        rows = self._events.rows()
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


def log_artifact_dir(client: MlflowClient, run_id: str, folder: Path) -> None:
    """Log ``folder/artifacts`` (a staged end) into the run, when it holds anything."""
    arts = folder / "artifacts"
    if arts.is_dir() and any(arts.iterdir()):
        client.log_artifacts(run_id, str(arts))


def _read_summary(summary: dict[str, Any], summary_path: str) -> bytes:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(summary_path)
        with fs.open(path, "rb") as f:
            return f.read()
    except Exception as e:  # noqa: BLE001 - fall back to the dict the driver passed
        logger.debug("cannot read %s (%s); logging the summary dict instead", summary_path, e)
        return json.dumps(summary, indent=2, default=str).encode()


def _plot_timeline(path: Path, title: str, timeline: Timeline,
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
