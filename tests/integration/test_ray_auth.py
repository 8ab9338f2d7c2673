"""Token authentication as a user meets it: no RAY_AUTH_MODE in the environment (the
conftest sets one for this process; these run in subprocesses without it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from support import REPO

pytestmark = pytest.mark.slow

# What ``python -m raypod.bench.elastic`` does before its job: start the fake autoscaling
# cluster (its head with ``ray start``) and join it as the driver. Then a client with a
# wrong token must be refused: authentication is on, not off.
_FAKE_CLUSTER = textwrap.dedent("""
    import os, subprocess, sys
    import ray
    from raypod.bench.fake_cluster import FakeAutoscalingCluster

    cluster = FakeAutoscalingCluster(worker_min=0)
    cluster.start()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        print("joined", ray.cluster_resources().get("CPU", 0.0), flush=True)
        env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token")
        probe = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{cluster.address}')"],
                               env=env, capture_output=True, text=True, timeout=120)
        refused = probe.returncode != 0 and "Authentication" in probe.stderr
        print("wrong token refused" if refused else "wrong token accepted: " + probe.stderr[-500:],
              flush=True)
    finally:
        ray.shutdown()
        cluster.stop()
""")


def _user_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: none of the conftest's Ray settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def test_fake_autoscaler_works_once_a_token_file_exists(tmp_path):
    """The issue's machine: ``ray start --head`` ran there once, so ~/.ray/auth_token exists."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("a" * 32)
    out = subprocess.run([sys.executable, "-c", _FAKE_CLUSTER], env=_user_env(HOME=str(home)),
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "joined" in out.stdout and "wrong token refused" in out.stdout, out.stdout + out.stderr[-2000:]


def test_raypod_joins_a_token_cluster_at_ray_address(ray_cluster, tmp_path):
    """``raypod doctor`` (the connection ``raypod run`` makes too) on the session's token
    cluster, from a shell that only has RAY_ADDRESS and the user's token file."""
    env = _user_env(RAY_ADDRESS=ray_cluster["address"])
    out = subprocess.run([sys.executable, "-m", "raypod.cli", "doctor"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert "Authentication" not in out.stderr, out.stderr[-3000:]
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
