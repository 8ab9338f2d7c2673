"""What ``raypod run`` prints: raypod's lines, not Ray's and MLflow's noise (raypod.console).

One real ``raypod run`` of the demo's tiny GPT as a user runs it (a subprocess, output to a
pipe as under ``ray job submit``), on the session's Ray cluster, with a worker killed part-way
and MLflow on with its default SQLite store (created by this job): Ray Data's notices, the
MLflow database set-up and Ray's "killed by the OOM killer" guess for the deliberate kill
stay off the console and are in ``<job_dir>/driver.log``.
"""

from __future__ import annotations

import re
import subprocess

import pytest
from support import BIN, TINY

pytestmark = pytest.mark.slow

NOISE = ("OOM killer", "A worker died", "Progress bars", "Execution plan", "alembic",
         "database tables", "(raylet)", "Token authentication", "Traceback")


def test_the_console_shows_raypod_and_driver_log_the_rest(ray_cluster, tmp_path):
    env = {k: v for k, v in ray_cluster["env"].items() if k != "MLFLOW_TRACKING_URI"}
    env["RAY_ADDRESS"] = ray_cluster["address"]
    cmd = [str(BIN / "raypod"), "run", str(TINY), f"--set=checkpoint.storage={tmp_path}",
           "--set=name=console", "--set=train.max_steps=10", "--set=checkpoint.every_steps=5",
           "--set=fault.inject=[{step: 6, rank: 1, kind: kill}]", "--set=mlflow.enabled=true"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    printed = out.stdout + out.stderr
    assert out.returncode == 0, printed[-4000:]
    for noise in NOISE:
        assert noise not in printed, printed
    lines = printed.splitlines()
    # Every line is raypod's: its header, progress lines (plain lines in a pipe) and the summary.
    assert all(re.match(r"raypod( \||:)|step +\d+/10 ", line) for line in lines), printed
    assert not any("(TrainWorker" in line for line in lines), printed
    failure = next(line for line in lines if "FAILURE" in line)
    assert "FAILURE kill on rank 1 at step 6" in failure and "on node " in failure, failure
    assert any("recovered from kill" in line for line in lines), printed
    assert "succeeded: step 10" in out.stdout

    log = (tmp_path / "console" / "driver.log").read_text()
    # Everything the console left out is in driver.log, from the driver and from the workers.
    for kept in ("killed by the OOM killer", "Progress bars disabled", "(TrainWorker pid=",
                 "injecting kill at step 6", "FAILURE kill on rank 1 at step 6"):
        assert kept in log, kept
    assert "INFO mlflow" in log or "INFO alembic" in log  # MLflow's own lines (its store, its system metrics)
    assert "\x1b[" not in log
