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
from pathlib import Path

import pytest

# Ray reads this when it is first imported; the session cluster has token auth on.
os.environ["RAY_AUTH_MODE"] = "token"

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_tree_matching(pattern: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        subprocess.run(["pkill", f"-{int(sig)}", "-f", pattern], check=False)
        deadline = time.time() + 10
        while time.time() < deadline:
            if subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode != 0:
                return
            time.sleep(0.3)


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
        _kill_tree_matching(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_connected(ray_cluster):
    """This test process connected to the session's cluster as a driver."""
    import ray

    os.environ["RAY_ADDRESS"] = ray_cluster["address"]
    if not ray.is_initialized():
        ray.init(address=ray_cluster["address"], log_to_driver=False)
    yield ray_cluster
