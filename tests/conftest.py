"""Shared fixtures: one real Ray cluster per test session, started with ``ray start --head``.

The cluster has a dashboard (for ``ray job submit``) and token authentication on, as a
user's cluster would. It is stopped by killing the processes of its own session
folder, never by ``ray stop`` (which would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

# Ray reads this when it is first imported; the session cluster has token auth on.
os.environ["RAY_AUTH_MODE"] = "token"

from support import BIN, REPO

# The per-user token cache (raypod.data.token_cache) goes to a folder of this session's,
# not the user's ~/.cache: the tests share it (same corpus, same tokens) and leave nothing.
_TOKEN_CACHE = tempfile.mkdtemp(prefix="raypod-test-token-cache-")
os.environ.setdefault("RAYPOD_TOKEN_CACHE", _TOKEN_CACHE)
# Likewise the empty MLflow store new local stores are copied from (raypod.tracking.sqlite_seed).
_MLFLOW_CACHE = tempfile.mkdtemp(prefix="raypod-test-mlflow-cache-")
os.environ.setdefault("RAYPOD_MLFLOW_CACHE", _MLFLOW_CACHE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(*patterns: str) -> set[int]:
    """The processes whose command line matches one of ``patterns`` and all their
    descendants: the raylet's dashboard and runtime-env agents rename themselves
    (``ray::DashboardAgent``), so only their parentage ties them to the cluster (they
    outlived it before)."""
    pids = {int(p) for pattern in patterns
            for p in subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()}
    pids -= {os.getpid()}
    children: dict[int, list[int]] = {}
    for line in subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.splitlines():
        pid, ppid = (int(x) for x in line.split())
        children.setdefault(ppid, []).append(pid)
    todo = list(pids)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in pids and c != os.getpid():
                pids.add(c)
                todo.append(c)
    return pids


def _kill_tree_matching(*patterns: str) -> None:
    """SIGTERM, then SIGKILL what is left after 2 s: Ray 2.60's GCS, raylet and autoscaler
    monitor do not exit on a SIGTERM at all (measured: all three still there after 20 s)."""
    pids = _tree(*patterns)
    for sig, wait_s in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 10.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait_s
        while time.time() < deadline:
            pids = {p for p in pids if _alive(p)}
            if not pids:
                return
            time.sleep(0.3)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray head with 4 logical CPUs, a dashboard and token auth; yields its addresses.

    ``ray start`` is tried up to three times (fresh ports and folder each time): on a cold,
    busy machine it can give up waiting 30 s for its own raylet to register.
    """
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{BIN}:{os.environ.get('PATH', '')}",
               RAY_USAGE_STATS_ENABLED="0")
    if not (Path.home() / ".ray" / "auth_token").exists():
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True,
                       capture_output=True)
    for attempt in range(3):
        temp_dir = tempfile.mkdtemp(prefix="rpt-", dir="/tmp")
        port, dash = free_port(), free_port()
        # Every port of its own, so that no other Ray on the machine (a user's, a benchmark's)
        # keeps this cluster's dashboard agent, which serves job submission, from starting.
        agent_ports = [f"--dashboard-agent-listen-port={free_port()}",
                       f"--dashboard-agent-grpc-port={free_port()}",
                       f"--runtime-env-agent-port={free_port()}",
                       f"--metrics-export-port={free_port()}"]
        cmd = [str(BIN / "ray"), "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
               "--dashboard-host=127.0.0.1", "--num-cpus=4", f"--temp-dir={temp_dir}",
               "--include-dashboard=true", "--disable-usage-stats", *agent_ports]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
        if out.returncode == 0:
            break
        _kill_tree_matching(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if attempt == 2:
            pytest.fail(f"ray start failed three times: {out.stderr[-2000:]}")
    info = {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}",
            "env": env, "temp_dir": temp_dir}
    try:
        yield info
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        # The Ray client server names the cluster by its GCS port only.
        _kill_tree_matching(temp_dir, f"ray.util.client.server --address=[^ ]*:{port} ")
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_connected(ray_cluster):
    """This test process connected to the session's cluster as a driver."""
    import ray

    os.environ["RAY_ADDRESS"] = ray_cluster["address"]
    if not ray.is_initialized():
        ray.init(address=ray_cluster["address"], log_to_driver=False)
    yield ray_cluster


# ---- a real MLflow tracking server -----------------------------------------------------


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with a SQLite store and a local artifact root.

    Args:
        root: Folder for ``db.sqlite``, ``artifacts/`` and ``server.log``.
        port: Port to listen on (kept across :meth:`stop` / :meth:`start`).
    """

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90.0) -> None:
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - the child keeps it
        cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root}/db.sqlite",
               "--default-artifact-root", str(self.root / "artifacts"),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                                     start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {timeout:.0f} s: {self.log_tail()}")

    def stop(self) -> None:
        """Stop the server and every process it started (its own process group)."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the server's pid
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self._alive(pgid):
                time.sleep(0.1)
            if not self._alive(pgid):
                break
        self.proc.wait(timeout=10)
        self.proc = None

    def _alive(self, pgid: int) -> bool:
        """Whether any process of the group still runs (zombies do not count)."""
        assert self.proc is not None
        self.proc.poll()  # reap the leader once it exited
        out = subprocess.run(["ps", "-e", "-o", "pgid=,stat="], capture_output=True, text=True)
        return any(line.split()[0] == str(pgid) and not line.split()[1].startswith("Z")
                   for line in out.stdout.splitlines() if len(line.split()) == 2)

    def log_tail(self) -> str:
        try:
            return (self.root / "server.log").read_text()[-3000:]
        except OSError:
            return ""


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real ``mlflow server`` for the test session (tests that stop it start it again);
    always stopped at teardown."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    with pytest.MonkeyPatch.context() as mp:
        # What the callback would set for an http URI; set here so it is undone afterwards.
        mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        mp.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        server.start()
        try:
            yield server
        finally:
            server.stop()


# ---- one raypod job on a 2-node cluster, logged to the session's MLflow server ---------------

MLFLOW_CLUSTER_JOB = "mlflow-nodes"
MLFLOW_CLUSTER_EXPERIMENT = "raypod-nodes"
MLFLOW_REGISTERED_MODEL = "raypod-mlp"
MLFLOW_CLUSTER_MODEL = "recipe.args={n_blocks: 2, dim: 32, hidden: 64, num_samples: 4096}"


@pytest.fixture(scope="session")
def mlflow_cluster_job(mlflow_server, tmp_path_factory):
    """The MLP for 30 steps, one rank on each of two worker nodes of a ``ray.cluster_utils.Cluster``
    (in a subprocess: ``tests/integration/mlflow_cluster_job.py``), logged to ``mlflow_server``
    with the final model registered as ``MLFLOW_REGISTERED_MODEL``; yields its summary."""
    import json

    storage = tmp_path_factory.mktemp("mlflow-nodes")
    out = storage / "summary.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    settings = [f"name={MLFLOW_CLUSTER_JOB}", "train.max_steps=30", "checkpoint.every_steps=100",
                MLFLOW_CLUSTER_MODEL,
                f"mlflow.tracking_uri={mlflow_server.uri}", f"mlflow.experiment={MLFLOW_CLUSTER_EXPERIMENT}",
                f"mlflow.registered_model={MLFLOW_REGISTERED_MODEL}"]
    cmd = [sys.executable, str(REPO / "tests" / "integration" / "mlflow_cluster_job.py"),
           "--out", str(out), "--storage", str(storage)]
    for s in settings:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert proc.returncode == 0, summary.get("error") or proc.stderr[-3000:]
    summary["log"] = proc.stderr
    return summary


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_TOKEN_CACHE, ignore_errors=True)
    shutil.rmtree(_MLFLOW_CACHE, ignore_errors=True)
