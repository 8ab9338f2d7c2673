"""Run a job from Python: connect to Ray, build the callbacks, drive, report."""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import ray

from raypod import console
from raypod.callbacks import Callback
from raypod.checkpoint.lease import JobLease, JobOwned  # noqa: F401 - JobOwned: raised by run()
from raypod.config import ConfigError, JobConfig
from raypod.driver.controller import Driver
from raypod.driver.stop import StopSignals, exit_code, signal_name
from raypod.policies import policies_for
from raypod.progress import ProgressPrinter
from raypod.recipe import Recipe, build_recipe, check_sharding
from raypod.storage import join_uri

log = logging.getLogger("raypod")

DATA_CPUS = 1
"""Logical CPUs a local Ray keeps beyond the ranks' for Ray Data tasks."""
CPUS_PER_CORE = 2
"""A private local Ray offers at most this many rank CPUs per core: ranks oversubscribe
the cores on purpose (the demo runs 2 ranks and a spare on 2 cores), but not without bound."""
RANK_MEMORY = 2**29
"""Bytes of memory a rank process needs at least (Python, torch and gloo, before any model),
unless ``scaling.resources_per_worker`` says ``memory``."""
_LOCAL_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}


class JobStopped(RuntimeError):
    """A user stopped the job (SIGTERM, ``ray job stop``, Ctrl-C); the message is one sentence.

    ``exit_code`` is ``128 + signal``: 143 for SIGTERM, 130 for SIGINT.
    """

    def __init__(self, message: str, summary: dict[str, Any], signum: int) -> None:
        super().__init__(message)
        self.summary = summary
        self.signum = int(signum)
        self.exit_code = exit_code(self.signum)


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
    # Under raypod's console Ray's INFO records go to driver.log (raypod.console).
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": True,
                              "logging_level": logging.INFO if console.get() else logging.WARNING}
    console.adopt_loggers()  # Ray's logger hands its records to the console's (a no-op without one)
    if address:
        from raypod import ray_auth

        ray_auth.for_joining()  # a token cluster at RAY_ADDRESS (Ray never sends one on its own)
        ray.init(address=address, **kwargs)
    else:
        # Logical CPUs for every rank and spare, even on a small laptop, plus one for the
        # Ray Data tasks that tokenise and stream the data (fractional CPUs each), so they
        # never wait for CPUs the ranks hold.
        # Never more than CPUS_PER_CORE per core: a larger max_workers gets the ranks that
        # fit (the job is elastic), and check_local_fit refused a min_workers that cannot.
        need = 0
        if config is not None:
            s = config.scaling
            need = int((s.max_workers + s.spares) * s.resources_per_worker.get("CPU", 1.0) + 0.999)
        cores = os.cpu_count() or 1
        from raypod import ray_auth

        ray_auth.for_new_cluster()  # as Ray would for a new local cluster, the token kept private
        ray.init(address="local", include_dashboard=False,
                 num_cpus=max(cores, min(need, CPUS_PER_CORE * cores) + DATA_CPUS), **kwargs)


def check_local_fit(config: JobConfig) -> None:
    """Refuse, before anything starts, a job that the private local Ray can never hold.

    Only when raypod starts its own local Ray (no ``RAY_ADDRESS``): its ranks all run on
    this machine, so ``scaling.min_workers`` ranks must fit it. The rule: their CPUs
    (``resources_per_worker`` CPU each, default 1) at most :data:`CPUS_PER_CORE` per core;
    their memory (``resources_per_worker`` memory each, else :data:`RANK_MEMORY`) within the
    memory available now; their GPUs within ``torch.cuda.device_count()``; no other custom
    resource (a local Ray has none). On a cluster the driver waits for capacity instead.

    Raises:
        ConfigError: one sentence naming the key and the rule.
    """
    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        return
    import psutil

    from raypod.policies.scaling import worker_bundle

    s = config.scaling
    n = s.min_workers
    where = "on this machine (raypod starts a private local Ray because RAY_ADDRESS is not set)"
    for key in s.resources_per_worker:
        if key not in _LOCAL_RESOURCES and s.resources_per_worker[key]:
            raise ConfigError(f"scaling.resources_per_worker asks for '{key}', a resource that the private "
                              f"local Ray raypod starts never has (RAY_ADDRESS is not set)")
    gpus = worker_bundle(s).get("GPU", 0.0)
    if gpus:
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n * gpus > have:
            key = "scaling.use_gpu" if s.use_gpu and not s.resources_per_worker.get("GPU") \
                else "scaling.resources_per_worker.GPU"
            raise ConfigError(f"{key} asks for {gpus:g} GPU per rank, {n * gpus:g} for scaling.min_workers "
                              f"({n}) ranks, but {have} GPU{' is' if have == 1 else 's are'} visible {where}")
    cores = os.cpu_count() or 1
    cpus = n * s.resources_per_worker.get("CPU", 1.0)
    if cpus > CPUS_PER_CORE * cores:
        raise ConfigError(f"scaling.min_workers ({n}) ranks of {s.resources_per_worker.get('CPU', 1.0):g} CPU "
                          f"(scaling.resources_per_worker) need {cpus:g} CPUs, more than the {CPUS_PER_CORE} "
                          f"per core ({CPUS_PER_CORE * cores} on {cores} cores) that ranks may share {where}")
    per_rank = s.resources_per_worker.get("memory") or RANK_MEMORY
    free = psutil.virtual_memory().available
    if n * per_rank > free:
        raise ConfigError(f"scaling.min_workers ({n}) ranks need at least {n * per_rank / 2**30:.1f} GiB "
                          f"({per_rank / 2**30:.2g} GiB each), more than the {free / 2**30:.1f} GiB of "
                          f"memory available {where}")


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


def run(config: JobConfig, callbacks: list[Callback] | None = None, progress: bool = True,
        handle_signals: bool = True) -> dict[str, Any]:
    """Run ``config`` to the end and return its summary.

    Data and recipe problems are refused before any worker starts: the recipe's quick
    checks (:meth:`raypod.Recipe.check_data`) run before Ray starts, its preparation
    (tokenising with Ray Data) right after. The job's owner lease
    (:mod:`raypod.checkpoint.lease`) is taken before anything is written for the job and
    released when it ends. With ``handle_signals`` (main thread only), SIGTERM and SIGINT
    stop the job cleanly (:mod:`raypod.driver.stop`).

    Raises:
        ConfigError: bad data or recipe arguments, in one sentence.
        JobOwned: another live driver runs the same job (a ``ConfigError``).
        JobFailed: the job ran and failed (the summary is on the exception).
        JobStopped: a user stopped it (the summary and the signal are on the exception).
    """
    recipe = build_recipe(config)
    _refuse_early(config, recipe)
    lease = JobLease(config.job_dir, config.name, config.fault.lease_ttl_s).acquire()
    out = console.get()
    if out is not None:  # the job owns its folder now: driver.log there (raypod.console)
        out.open_log(config.job_dir)
    stop = StopSignals()
    try:
        if handle_signals:
            stop.install()
        connect_ray(config)
        if handle_signals:
            stop.install()  # again: ray.init sets a SIGTERM handler of its own
        _data_step(recipe.prepare_data, config)
        cbs = default_callbacks(config, progress) if callbacks is None else callbacks
        summary = Driver(config, callbacks=cbs, recipe=recipe, lease=lease, stop=stop,
                         policies=policies_for(config)).run()
    except KeyboardInterrupt:  # a StopRequested, or the KeyboardInterrupt Ray raises for it
        signum = stop.signum  # what raised it recorded the signal there
        if signum is None:  # Ctrl-C without our handler (handle_signals=False): not ours to name
            raise
        raise JobStopped(f"job {config.name} stopped by {signal_name(signum)} before training started; "
                         "no step ran", {}, signum) from None
    finally:
        received_at = stop.received_at
        stop.restore()
        lease.release()
        if received_at is not None:  # `ray job stop` SIGKILLs 3 s after its SIGTERM: how close was it?
            log.info("stopping took %.2f s from the signal to the lease's release",
                     time.monotonic() - received_at)
    return _outcome(config, summary)


def _refuse_early(config: JobConfig, recipe: Recipe) -> None:
    """Every check that needs no worker, before Ray starts: the job fits a private local Ray,
    the recipe's data checks, FSDP2 sharding, the signing key, the storage is writable.

    Raises:
        ConfigError: one sentence.
    """
    check_local_fit(config)
    _data_step(recipe.check_data, config)
    from raypod.checkpoint.verify import signing_key
    from raypod.doctor import storage_check

    check_sharding(config, recipe)  # FSDP2 would wrap only the root: refused before Ray starts
    signing_key(config)  # checkpoint.signing_key_env names a variable that is set, before Ray starts
    storage = storage_check(config.job_dir)  # the driver writes there too; ms, before any worker
    if not storage.ok:
        raise ConfigError(f"checkpoint.storage: {storage.detail}")


def _outcome(config: JobConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """The summary of a job that succeeded; else the exception that says how it ended."""
    if summary.get("status") == "stopped":
        ev = next((e for e in reversed(summary.get("events", [])) if e.get("kind") == "stop"), {})
        sig = str(ev.get("signal", "SIGTERM"))
        raise JobStopped(f"job {config.name} stopped at step {summary.get('final_step')} by {sig}; latest "
                         f"committed checkpoint: step {summary.get('committed_step', 0)}; summary "
                         f"{join_uri(config.job_dir, 'summary.json')}; run it again to continue",
                         summary, getattr(signal, sig, signal.SIGTERM))
    if summary.get("status") != "succeeded":
        raise JobFailed(f"job '{config.name}' failed: {summary.get('error', 'unknown error')}", summary)
    return summary
