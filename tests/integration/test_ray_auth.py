"""Token authentication as a user meets it: no RAY_AUTH_MODE in the environment (the
conftest sets one for this process; these run in subprocesses without it).

The fake autoscaling cluster with a token file in place (``ray start --head`` ran on the
machine once) is exercised by ``test_autoscale``, which runs the elastic job from a user's
environment.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from support import user_env

pytestmark = pytest.mark.slow


def test_raypod_joins_a_token_cluster_at_ray_address(ray_cluster, tmp_path):
    """``raypod doctor`` (the connection ``raypod run`` makes too) on the session's token
    cluster, from a shell that only has RAY_ADDRESS and the user's token file."""
    env = user_env(RAY_ADDRESS=ray_cluster["address"])
    out = subprocess.run([sys.executable, "-m", "raypod.cli", "doctor"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert "Authentication" not in out.stderr, out.stderr[-3000:]
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]


def test_a_wrong_token_is_refused(ray_cluster, tmp_path):
    """Authentication is on, not off: a client with another token is refused by the job
    server (``ray job submit``'s way in; Ray's GCS refuses it as well, but only after ~20 s
    of connection retries)."""
    code = (f"from ray.job_submission import JobSubmissionClient; "
            f"print(JobSubmissionClient({ray_cluster['dashboard']!r}).list_jobs())")
    for token, refused in (("not-the-token", True), (None, False)):
        env = user_env(RAY_AUTH_MODE="token", **({"RAY_AUTH_TOKEN": token} if token else {}))
        probe = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True,
                               text=True, timeout=120)
        assert (probe.returncode != 0 and "token" in probe.stderr) == refused, (token, probe.stderr[-2000:])
