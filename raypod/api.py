"""Run a job from Python: connect to Ray, build the callbacks, drive, report."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from raypod.callbacks import Callback
from raypod.config import ConfigError, JobConfig
from raypod.driver.controller import Driver, build_recipe
from raypod.progress import ProgressPrinter

log = logging.getLogger("raypod")

DATA_CPUS = 1
"""Logical CPUs a local Ray keeps beyond the ranks' for Ray Data tasks."""


class JobFailed(RuntimeError):
    """The job ended in the ``failed`` state; the message is one sentence."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


def connect_ray(config: JobConfig | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` (set by ``ray job submit`` too), else start a private local Ray.

    Without ``RAY_ADDRESS`` this never attaches to some other cluster that happens to
    run on the machine: ``address="local"`` always starts a new one.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"log_to_driver": True, "logging_level": logging.WARNING,
                              "configure_logging": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Logical CPUs for every rank and spare, even on a small laptop, plus one for the
        # Ray Data tasks that tokenise and stream the data (fractional CPUs each), so they
        # never wait for CPUs the ranks hold.
        need = 0
        if config is not None:
            s = config.scaling
            need = int((s.max_workers + s.spares) * s.resources_per_worker.get("CPU", 1.0) + 0.999)
        ray.init(address="local", include_dashboard=False,
                 num_cpus=max(os.cpu_count() or 1, need + DATA_CPUS), **kwargs)


def _data_step(step: Any, config: JobConfig) -> None:
    """Run a recipe's data check or preparation; any failure becomes one sentence."""
    try:
        step(config)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a recipe's data step failing is the user's input
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"preparing data.path '{config.data.path}' failed: {type(e).__name__}: {msg}") from None


def default_callbacks(config: JobConfig, progress: bool = True) -> list[Callback]:
    """Progress printing and, unless ``mlflow.enabled`` is false, MLflow tracking."""
    cbs: list[Callback] = []
    if progress:
        cbs.append(ProgressPrinter())
    if config.mlflow.enabled:
        from raypod.tracking import MLflowCallback

        cbs.append(MLflowCallback())
    return cbs


def run(config: JobConfig, callbacks: list[Callback] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run ``config`` to the end and return its summary.

    Data and recipe problems are refused before any worker starts: the recipe's quick
    checks (:meth:`raypod.Recipe.check_data`) run before Ray starts, its preparation
    (tokenising with Ray Data) right after.

    Raises:
        ConfigError: bad data or recipe arguments, in one sentence.
        JobFailed: the job ran and failed (the summary is on the exception).
    """
    recipe = build_recipe(config)
    _data_step(recipe.check_data, config)
    from raypod.doctor import storage_check

    storage = storage_check(config.job_dir)  # the driver writes there too; ms, before any worker
    if not storage.ok:
        raise ConfigError(f"checkpoint.storage: {storage.detail}")
    connect_ray(config)
    _data_step(recipe.prepare_data, config)
    cbs = default_callbacks(config, progress) if callbacks is None else callbacks
    summary = Driver(config, callbacks=cbs, recipe=recipe).run()
    if summary.get("status") != "succeeded":
        raise JobFailed(f"job '{config.name}' failed: {summary.get('error', 'unknown error')}", summary)
    return summary
