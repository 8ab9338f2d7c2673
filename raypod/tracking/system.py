"""System metrics of every node a job's ranks run on, and per-rank step times, for MLflow.

MLflow's own system-metrics monitor samples only the machine it runs in (the driver's).
Here one tiny Ray actor per node of the job's ranks (``num_cpus=0``, placed on the node
with a (hard) :class:`~ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy`)
answers a sample when asked: CPU utilisation since its last sample, memory in use and,
with ``nvidia-ml-py`` (``pynvml``) installed and an NVIDIA driver on the node, each GPU's
utilisation and memory. The names are MLflow's (``cpu_utilization_percentage``,
``system_memory_usage_megabytes``, ``gpu_0_utilization_percentage``, ...), logged as
``system/<node>/<name>`` where ``<node>`` is the first 8 hex digits of the Ray node id
(the run's ``raypod.node.<node>`` tag gives its address and host name).

A driver-side thread (:class:`NodeMetrics`) asks every node each interval and hands the
samples to the MLflow callback's sender thread, which batches them with the step
metrics; no Ray call ever runs in a driver hook or in the sender. :class:`DriverMonitor`
runs MLflow's own monitor (``system/*``, the driver's node) for the sender.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

logger = logging.getLogger("raypod.tracking")

PER_RANK_KEYS = ("compute_s", "wait_s", "data_s")
"""Per-rank step figures logged as ``rank/<r>/<key>``."""
RANKS_EVERY_STEP = 16
"""Worlds up to this many ranks log per-rank figures every step; larger ones every
``ceil(world_size / RANKS_EVERY_STEP)`` steps (about ``3 * RANKS_EVERY_STEP`` points a step)."""


def node_label(node_id: str) -> str:
    """The short name of a Ray node in metric keys (its id's first 8 hex digits)."""
    return node_id[:8]


def rank_metrics(step: int, ranks: dict[int, dict[str, Any]]) -> dict[str, float]:
    """``rank/<r>/compute_s``, ``rank/<r>/wait_s``, ``rank/<r>/data_s`` of one step.

    ``compute_s`` is the rank's own work (its step time less the waits), ``wait_s`` the
    wait for the slowest peer, ``data_s`` the wait for its batch. Empty on the steps a
    large world skips (see :data:`RANKS_EVERY_STEP`).
    """
    if not ranks or step % max(1, math.ceil(len(ranks) / RANKS_EVERY_STEP)):
        return {}
    out: dict[str, float] = {}
    for r, fig in ranks.items():
        for key in PER_RANK_KEYS:
            value = fig.get(key)
            if isinstance(value, int | float):
                out[f"rank/{r}/{key}"] = float(value)
    return out


class NodeSampler:
    """The per-node sampler (a Ray actor): psutil, and pynvml when present."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        psutil.cpu_percent()  # the first call starts the interval
        self._nvml: Any = None
        self._gpus: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._gpus = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._nvml = pynvml
        except Exception:  # noqa: BLE001 - no pynvml or no NVIDIA driver: no GPU figures
            self._gpus = []

    def info(self) -> dict[str, str]:
        """Where this sampler runs: node id, address, host name, GPUs seen."""
        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
                "ip": ray.util.get_node_ip_address(), "gpus": str(len(self._gpus))}

    def sample_with_info(self) -> tuple[dict[str, float], dict[str, str]]:
        """:meth:`sample` and :meth:`info` in one call (the first call of a new sampler)."""
        return self.sample(), self.info()

    def sample(self) -> dict[str, float]:
        """CPU utilisation since the last sample, memory now, and per-GPU figures."""
        ps = self._psutil
        mem = ps.virtual_memory()
        out = {"cpu_utilization_percentage": ps.cpu_percent(),
               "system_memory_usage_megabytes": round(mem.used / 1e6, 1),
               "system_memory_usage_percentage": round(mem.used / mem.total * 100, 1)}
        for i, h in enumerate(self._gpus):
            try:
                m = self._nvml.nvmlDeviceGetMemoryInfo(h)
                out[f"gpu_{i}_memory_usage_megabytes"] = round(m.used / 1e6, 1)
                out[f"gpu_{i}_memory_usage_percentage"] = round(m.used / m.total * 100, 1)
                out[f"gpu_{i}_utilization_percentage"] = float(
                    self._nvml.nvmlDeviceGetUtilizationRates(h).gpu)
            except Exception:  # noqa: BLE001 - one GPU's hiccup costs its figures only
                continue
        return out


class NodeMetrics:
    """Keeps one :class:`NodeSampler` per node of the job and forwards their samples.

    A sampler is asked again only once it answered (a slow one, still starting on a busy
    node, is waited for across rounds, never asked twice).

    Args:
        nodes: Returns the Ray node ids to sample now (the nodes of the job's ranks).
        emit: Called with ``(metrics, tags)`` per round: ``system/<node>/<name>`` values
            and ``raypod.node.<node>`` tags for nodes seen for the first time.
        interval_s: Seconds between rounds.
    """

    def __init__(self, nodes: Callable[[], Iterable[str]],
                 emit: Callable[[dict[str, float], dict[str, str]], None],
                 interval_s: float = 10.0) -> None:
        self._nodes = nodes
        self._emit = emit
        self.interval_s = max(0.1, interval_s)
        self._actors: dict[str, Any] = {}  # node id -> sampler actor
        self._asked: dict[str, Any] = {}  # node id -> its sample not answered yet
        self._named: set[str] = set()  # nodes whose sampler answered (and is on that node)
        self._remote: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="raypod-node-metrics", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Take a last sample of every node, stop, and end the samplers (bounded wait: up to
        ``timeout`` for a node not heard from yet, as in a job shorter than the interval)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive() and self._actors:
                silent = set(self._actors) - self._named
                try:
                    self.round(timeout=timeout if silent else min(2.0, timeout), wanted=set(self._actors))
                except Exception as e:  # noqa: BLE001
                    logger.debug("last node metrics round failed: %s", e)
        import ray

        for actor in self._actors.values():
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - a sampler on a lost node is gone already
                pass
        self._actors.clear()
        self._asked.clear()

    def _main(self) -> None:
        while not self._stop.is_set():
            if not self._actors and not any(self._nodes()):
                self._stop.wait(0.2)  # the first step names the nodes: sample from then on
                continue
            try:
                self.round()
            except Exception as e:  # noqa: BLE001 - system metrics are a bonus
                logger.debug("node metrics round failed: %s", e)
            self._stop.wait(self.interval_s)

    def round(self, timeout: float = 5.0, wanted: set[str] | None = None) -> None:
        """One sample of every node (new nodes get a sampler first)."""
        import ray

        wanted = {n for n in self._nodes() if n} if wanted is None else wanted
        for node in list(self._actors):
            if node not in wanted:
                self._drop(node)
        for node in wanted - set(self._actors):
            self._actors[node] = self._spawn(node)
        for node, actor in self._actors.items():
            if node not in self._asked:
                self._asked[node] = (actor.sample.remote() if node in self._named
                                     else actor.sample_with_info.remote())
        refs = list(self._asked.values())
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=timeout)[0])
        metrics: dict[str, float] = {}
        tags: dict[str, str] = {}
        for node, ref in list(self._asked.items()):
            if ref not in ready:
                continue
            del self._asked[node]
            try:
                values = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the node is gone: its sampler too
                logger.debug("sampler of node %s failed: %s", node_label(node), e)
                self._drop(node)
                continue
            label = node_label(node)
            if node not in self._named:
                values, info = values
                if info["node_id"] != node:  # not where it was asked to be: not this node's
                    logger.debug("sampler for node %s landed on %s", label, node_label(info["node_id"]))
                    self._drop(node)
                    continue
                self._named.add(node)
                tags[f"raypod.node.{label}"] = f"{info['ip']} {info['host']} ({info['gpus']} GPUs)"
            metrics.update({f"system/{label}/{k}": v for k, v in values.items()})
        if metrics or tags:
            self._emit(metrics, tags)

    def _drop(self, node: str) -> None:
        import ray

        actor = self._actors.pop(node, None)
        self._asked.pop(node, None)
        self._named.discard(node)
        if actor is not None:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001
                pass

    def _spawn(self, node: str) -> Any:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if self._remote is None:
            self._remote = ray.remote(num_cpus=0, max_restarts=0)(NodeSampler)
        # Hard affinity: Ray 2.60 places a zero-CPU actor with soft affinity on another node.
        # On a node that is gone the sampler fails and is dropped.
        return self._remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()


class DriverMonitor:
    """MLflow's own system-metrics monitor (``system/*``, the driver's node) for the job's run.

    Started when the run is set up and again after the store comes back (MLflow's monitor
    stops when the store fails); off when ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false``
    or without ``psutil``.

    Args:
        enabled: Log them at all.
        interval_s: Seconds between samples.
    """

    def __init__(self, enabled: bool, interval_s: float) -> None:
        self.enabled = enabled
        self.interval_s = interval_s
        self._monitor: Any = None

    def start(self, run_id: str | None, tracking_uri: str | None) -> None:
        """Start sampling into ``run_id`` (no-op when running already or off)."""
        if not self.enabled or run_id is None:
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
            self.enabled = False
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                run_id, sampling_interval=self.interval_s,
                resume_logging=True, tracking_uri=tracking_uri)
            self._monitor.start()
        except Exception as e:  # noqa: BLE001 - system metrics are a bonus
            logger.warning("cannot start MLflow system metrics: %s", e)
            self._monitor = None

    def stop(self, timeout: float) -> None:
        """Stop sampling, waiting ``timeout`` seconds at most for MLflow's last sample."""
        mon, self._monitor = self._monitor, None
        if mon is None:
            return
        stopper = threading.Thread(target=mon.finish, name="raypod-mlflow-sysmetrics-stop",
                                   daemon=True)
        stopper.start()
        stopper.join(timeout)
