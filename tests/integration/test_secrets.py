"""No secret reaches what raypod prints, logs, writes to ``summary.json`` or sends to MLflow.

A whole job logs to the session's real ``mlflow server`` through a tracking URI with
basic-auth credentials in it (the server has no auth: MLflow's client still sends the
header, the server ignores it), run as a user runs it, ``raypod -v run`` in a
subprocess; ``raypod check`` prints a config whose recipe takes an ``hf_token``; log
records and warnings of MLflow's and Ray's own loggers go through the redaction too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support import BIN, MLP

SECRET = "s3cr3t-Pa55w0rd"
HF_TOKEN = "hf_" + "Zq7" * 10

KW_RECIPE = '''
from raypod.recipes.mlp import MLPRecipe


class TokenRecipe(MLPRecipe):
    def __init__(self, hf_token: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hf_token = hf_token
'''

pytestmark = pytest.mark.slow


def test_check_redacts_recipe_args_and_uris(tmp_path):
    (tmp_path / "tokenrecipe.py").write_text(KW_RECIPE)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH")) if p)
    cmd = [str(BIN / "raypod"), "check", str(MLP), "--set=recipe.target=tokenrecipe:TokenRecipe",
           f"--set=recipe.args.hf_token={HF_TOKEN}",
           f"--set=mlflow.tracking_uri=http://raypod:{SECRET}@127.0.0.1:5000",
           f"--set=checkpoint.storage=s3://bucket/runs?X-Amz-Signature={SECRET}"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert HF_TOKEN not in out.stdout + out.stderr and SECRET not in out.stdout + out.stderr
    assert "hf_token: '***REDACTED***'" in out.stdout  # the key is still shown
    assert "tracking_uri: '***REDACTED***'" in out.stdout
    assert "X-Amz-Signature=***" in out.stdout
    # A bad value that holds a secret is refused without echoing it.
    bad = subprocess.run(cmd + [f"--set=train.lr=http://u:{SECRET}@h"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "train.lr" in bad.stderr and SECRET not in bad.stderr, bad.stderr


def test_log_records_and_warnings_of_every_logger_are_redacted(tmp_path):
    """MLflow's and Ray's loggers have handlers of their own (not propagating to raypod's)."""
    code = textwrap.dedent(f'''
        import logging, warnings
        import mlflow  # configures the "mlflow" logger with its own handler
        from raypod.redact import install_log_redaction
        logging.basicConfig(level=logging.WARNING)
        install_log_redaction()
        uri = "http://raypod:{SECRET}@127.0.0.1:1/api?token={SECRET}"
        logging.getLogger("mlflow.tracking").warning("store %s is down", uri)
        logging.getLogger("raypod.tracking").warning("MLflow tracking store %s failed", uri)
        try:
            raise ConnectionError(f"cannot reach {{uri}}")
        except ConnectionError:
            logging.getLogger("ray").exception("lost")
        warnings.warn(f"retrying {{uri}}")
        print("done")
    ''')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr
    assert SECRET not in out.stderr, out.stderr
    assert out.stderr.count("http://raypod:***@127.0.0.1:1/api?token=***") >= 4, out.stderr


def test_credentials_in_the_tracking_uri_reach_no_output(ray_cluster, mlflow_server, tmp_path):
    if mlflow_server.proc is None:  # a test that stops the shared server starts it again; be sure
        mlflow_server.start()
    from mlflow.tracking import MlflowClient

    uri = mlflow_server.uri.replace("http://", f"http://raypod:{SECRET}@")
    env = dict(ray_cluster["env"], RAY_ADDRESS=ray_cluster["address"])
    cmd = [str(BIN / "raypod"), "-v", "run", str(MLP), f"--set=checkpoint.storage={tmp_path}",
           "--set=name=secrets", "--set=train.max_steps=4", "--set=checkpoint.every_steps=2",
           "--set=scaling.spares=0", "--set=mlflow.enabled=true", f"--set=mlflow.tracking_uri={uri}",
           "--set=mlflow.experiment=raypod-secrets"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    printed = out.stdout + out.stderr
    assert SECRET not in printed, [line for line in printed.splitlines() if SECRET in line]
    # The final lines link the run's page on the server, without the credentials.
    assert f": http://127.0.0.1:{mlflow_server.port}/#/experiments/" in out.stdout, out.stdout[-2000:]
    log = (tmp_path / "secrets" / "driver.log").read_text()  # every logger's INFO records: raypod.console
    assert SECRET not in log and "INFO mlflow" in log, log[-3000:]

    summary = json.loads((tmp_path / "secrets" / "summary.json").read_text())
    assert SECRET not in json.dumps(summary)
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run = client.get_run(summary["mlflow_run_id"])  # logged through the URI with credentials
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2, 3, 4]
    assert run.data.params["mlflow.tracking_uri"] == "***REDACTED***"
    assert SECRET not in json.dumps({**run.data.params, **run.data.tags})
    for name in ("config.yaml", "summary.json"):
        text = Path(client.download_artifacts(run.info.run_id, name, str(tmp_path))).read_text()
        assert SECRET not in text, name
