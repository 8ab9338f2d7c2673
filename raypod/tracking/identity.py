"""Which MLflow store and run a job logs to: one run per job name, continued across restarts.

The tracking URI comes from the config, the environment or a SQLite store beside the job
folders (:func:`resolve_tracking_uri`). The job's run is found by the id kept in
``<job_dir>/mlflow_run_id`` (written once the run is known), else by the
``raypod.job_name`` tag, else created; a driver that restarts, or the next submission of
the job, so continues the same run. Only the MLflow callback's thread calls
:class:`RunIdentity`; the functions here are pure or touch only the job folder.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raypod.redact import redact_uri
from raypod.tracking.params import clean_key
from raypod.tracking.sqlite_seed import seed_store, sqlite_file

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

    from raypod.callbacks import JobInfo
    from raypod.config import JobConfig

logger = logging.getLogger("raypod.tracking")

RUN_ID_FILE = "mlflow_run_id"
"""Name of the file under the job folder that holds the job's MLflow run id."""
JOB_NAME_TAG = "raypod.job_name"
"""Tag that keys a run to its job name."""

_EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
_MODEL_TRAINING = "custom_model_development"  # the experiment's kind in MLflow 3's header selector
_UI_MODEL_TRAINING = "workflowType=machine_learning"
"""MLflow 3.17's UI picks GenAI or model-training pages from this URL parameter (else from the
browser's last choice, GenAI at first), not from the experiment's ``mlflow.experimentKind`` tag."""
_SUCCESS = {"succeeded", "success", "successful", "completed", "complete", "finished", "done", "ok"}
_KILLED = {"killed", "cancelled", "canceled", "interrupted", "stopped"}


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


def run_status(summary: dict[str, Any]) -> str:
    """The MLflow run status (``FINISHED``, ``KILLED`` or ``FAILED``) of a job's summary."""
    status = str(summary.get("status", "")).strip().lower()
    if status in _SUCCESS:
        return "FINISHED"
    if status in _KILLED:
        return "KILLED"
    return "FAILED"


def _local_path(uri: str) -> str | None:
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if "://" in uri:
        return None
    return uri


def _sqlite_dir(tracking_uri: str) -> Path | None:
    """The folder of a ``sqlite:///`` store's file, or None for other stores."""
    db = sqlite_file(tracking_uri)
    return db.parent if db is not None else None


def _is_not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def _is_already_exists(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_ALREADY_EXISTS"


def read_run_id(job_dir: str) -> str | None:
    """The run id kept in ``<job_dir>/mlflow_run_id`` (None when there is none or it cannot be read)."""
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


def write_run_id(job_dir: str, run_id: str) -> None:
    """Keep the run id in ``<job_dir>/mlflow_run_id`` for the job's next driver."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(job_dir)
        root = root.rstrip("/")
        fs.makedirs(root, exist_ok=True)
        with fs.open(f"{root}/{RUN_ID_FILE}", "w") as f:
            f.write(run_id + "\n")
    except Exception as e:  # noqa: BLE001 - the tag search still finds the run
        logger.warning("cannot write %s/%s (%s)", job_dir, RUN_ID_FILE, e)


class RunIdentity:
    """The store, experiment and run of one job, as the callback's thread knows them.

    ``run_id`` stays None until :meth:`adopt` (a failed setup is tried again); ``ready``
    is set once the run is known, for the driver's :meth:`MLflowCallback.wait_run_id`.
    """

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.tracking_uri: str | None = None
        self.client: MlflowClient | None = None
        self.experiment: str | None = None
        self.run_id: str | None = None
        self.stored_run_id: str | None = None

    def open_run(self, job: JobInfo) -> tuple[Run, bool, str | None]:
        """Find the job's run (by the kept id, else by job name) or create it.

        Returns:
            The run, whether it is an earlier one being continued, and the id that was kept
            in the job folder (if any).
        """
        from mlflow.tracking import MlflowClient

        assert self.tracking_uri is not None
        cfg = job.config
        if self.client is None:
            db_dir = _sqlite_dir(self.tracking_uri)
            if db_dir is not None:
                db_dir.mkdir(parents=True, exist_ok=True)
                seed_store(self.tracking_uri)  # a new store: a copy of an empty one, not ~70 migrations
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
        client = self.client
        exp_id = self.experiment = self._experiment_id(client, cfg.mlflow.experiment)

        run = None
        stored_id = read_run_id(job.job_dir)
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
        if run is not None:
            return run, True, stored_id
        # The job's start, not this call's: the callback may set the run up after the first step.
        run = client.create_run(exp_id, start_time=int(job.start_time * 1000),
                                run_name=cfg.mlflow.run_name or cfg.name, tags={
            JOB_NAME_TAG: cfg.name,
            "raypod.job_dir": job.job_dir,
            "raypod.submissions": "1",
            "mlflow.source.name": "raypod",
            "mlflow.source.type": "JOB",
        })
        return run, False, stored_id

    def adopt(self, job_dir: str, run_id: str, stored_id: str | None) -> None:
        """The run is set up: remember it (in the job folder too) and wake the driver."""
        self.run_id = run_id
        if self.run_id != stored_id:
            write_run_id(job_dir, self.run_id)
        self.stored_run_id = self.run_id
        self.ready.set()

    def _experiment_id(self, client: MlflowClient, name: str) -> str:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            db_dir = _sqlite_dir(self.tracking_uri or "")
            location = ((db_dir / "mlartifacts" / clean_key(name).replace("/", "_")).as_uri()
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
