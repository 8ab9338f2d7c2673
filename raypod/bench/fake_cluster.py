"""A local autoscaling Ray cluster: Ray's fake multi-node provider, started privately.

:class:`FakeAutoscalingCluster` starts ``ray start --head`` with
``jobs/clusters/fake_multinode.yaml`` as its autoscaling config and
``RAY_FAKE_CLUSTER=1``; the autoscaler then "launches" worker nodes as extra raylets
on this machine when demand (a job's ``request_resources``) asks for them. Unlike
``ray.cluster_utils.AutoscalingCluster`` it never runs ``ray stop`` (which would stop
every Ray on the machine): it has its own ports and temp folder and stops exactly the
processes under that folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "jobs" / "clusters" / "fake_multinode.yaml"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_matching(pattern: str, sig: int = signal.SIGKILL) -> None:
    subprocess.run(["pkill", f"-{int(sig)}", "-f", pattern], check=False)


class FakeAutoscalingCluster:
    """Start with :meth:`start`, connect with ``ray.init(address=cluster.address)``, :meth:`stop`.

    Args:
        config: the autoscaling config (``provider.gcs_address`` is filled in).
        worker_min / worker_max: override the worker node type's bounds.
    """

    def __init__(self, config: str | os.PathLike = CONFIG, worker_min: int | None = None,
                 worker_max: int | None = None) -> None:
        self.config = yaml.safe_load(Path(config).read_text())
        node_type = next(k for k in self.config["available_node_types"] if k != self.config["head_node_type"])
        self.worker_type = node_type
        if worker_min is not None:
            self.config["available_node_types"][node_type]["min_workers"] = worker_min
        if worker_max is not None:
            self.config["available_node_types"][node_type]["max_workers"] = worker_max
            self.config["max_workers"] = worker_max
        self.temp_dir = ""
        self.address = ""

    def start(self, timeout: float = 120, attempts: int = 3) -> None:
        """Start the head (and its autoscaler); retried on fresh ports and a fresh folder.

        On a cold, busy machine ``ray start`` can give up waiting for its own raylet to
        register (Ray waits 30 s); that says nothing about the cluster, so it is tried again.
        The head enforces token authentication and this process sends the token (generated
        when missing): see :func:`raypod.ray_auth.for_new_cluster`.
        """
        from raypod import ray_auth

        ray_auth.for_new_cluster()
        for attempt in range(1, attempts + 1):
            err = self._start_once(timeout)
            if err is None:
                return
            self.stop()
            if attempt < attempts:
                print(f"ray start (fake autoscaler) failed, attempt {attempt} of {attempts}; "
                      f"trying again: {err.strip().splitlines()[-1] if err.strip() else ''}",
                      file=sys.stderr)
                time.sleep(2.0)
        raise RuntimeError(f"ray start (fake autoscaler) failed {attempts} times: {err[-2000:]}")

    def _start_once(self, timeout: float) -> str | None:
        """One ``ray start --head``; its error output when it failed, else ``None``."""
        import ray

        self.temp_dir = tempfile.mkdtemp(prefix="rpfake-", dir="/tmp")
        port = _free_port()
        ip = ray.util.get_node_ip_address()
        self.config["provider"]["gcs_address"] = f"{ip}:{port}"
        cfg_path = Path(self.temp_dir) / "autoscaler.yaml"
        cfg_path.write_text(json.dumps(self.config))
        env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
                   RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}:{os.environ.get('PATH', '')}")
        env.pop("RAY_ADDRESS", None)
        cmd = [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=0",
               f"--autoscaling-config={cfg_path}", f"--temp-dir={self.temp_dir}",
               "--include-dashboard=false", "--disable-usage-stats",
               f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
               f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            tail = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            return f"ray start did not return in {timeout:.0f} s: {tail}"
        if out.returncode != 0:
            return out.stderr
        self.address = f"{ip}:{port}"
        return None

    def alive_workers(self) -> list[dict[str, Any]]:
        """Worker nodes the cluster currently counts as alive."""
        import ray

        return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]

    def wait_for_workers(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.alive_workers()) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the autoscaler did not bring up {n} worker node(s) in {timeout:.0f} s")
            time.sleep(0.5)

    def terminate_node(self, node_id: str) -> None:
        """End a worker node abruptly, as a spot VM goes: its raylet and every process it
        started (the actors on it) are killed at once."""
        found = subprocess.run(["pgrep", "-f", f"node_id={node_id}"], capture_output=True, text=True)
        raylets = [int(p) for p in found.stdout.split()]
        victims = set(raylets)
        frontier = list(raylets)
        while frontier:  # the raylet's children, and theirs
            kids = subprocess.run(["pgrep", "-P", str(frontier.pop())], capture_output=True, text=True)
            for pid in (int(p) for p in kids.stdout.split()):
                if pid not in victims:
                    victims.add(pid)
                    frontier.append(pid)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        if not self.temp_dir:
            return
        # Processes that renamed themselves (``ray::DashboardAgent``) no longer show the
        # temp dir in their command line: take every descendant of those that do, first.
        import psutil

        family: set[psutil.Process] = set()
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if self.temp_dir in " ".join(proc.info["cmdline"] or []):
                    family.add(proc)
                    family.update(proc.children(recursive=True))
            except psutil.Error:
                continue
        for proc in family:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(list(family), timeout=5)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            _kill_matching(self.temp_dir, sig)
            deadline = time.time() + 10
            while time.time() < deadline:
                if subprocess.run(["pgrep", "-f", self.temp_dir], capture_output=True).returncode != 0:
                    break
                time.sleep(0.3)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.temp_dir = ""
