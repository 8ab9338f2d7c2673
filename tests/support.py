"""What many tests share: the repository's paths and the tiny test job's config.

Importable from every test module (``pythonpath = ["tests"]`` in pyproject.toml).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from raypod.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIGS = REPO / "jobs" / "configs"
TINY = CONFIGS / "tiny.yaml"
"""The small GPT on 2 CPU ranks: the integration tests' job."""
MLP = CONFIGS / "mlp.yaml"


def tiny_job(storage: Path | str, *overrides: str, name: str = "it", max_steps: int = 20,
             mlflow: bool = False) -> Any:
    """``tiny.yaml`` as the integration tests run it: its own storage and name, a
    checkpoint every 5 steps, no MLflow unless asked; ``overrides`` (``key=value``) last.
    Fault-free reference runs pass ``scaling.spares=0``: they never need the spare, and it is
    one process less importing torch on 2 cores (~1.2 s a job)."""
    from raypod.config import load_config

    base = [f"checkpoint.storage={storage}", f"name={name}", f"train.max_steps={max_steps}",
            "checkpoint.every_steps=5", "fault.hang_timeout_s=60"]
    if not mlflow:
        base.append("mlflow.enabled=false")
    return load_config(TINY, base + list(overrides))


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell for a subprocess: none of the conftest's Ray
    settings (``RAY_AUTH_MODE`` above all: a user's shell has only the token file that
    ``ray start --head`` wrote), the repository importable."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


# ---- ``ray job`` on the session's cluster ---------------------------------------------


def ray_job(ray_cluster: dict, verb: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``ray job <verb> --address <dashboard> ...``: the CLI a user types, token auth on."""
    cmd = [str(BIN / "ray"), "job", verb, "--address", ray_cluster["dashboard"], *args]
    return subprocess.run(cmd, env=ray_cluster["env"], capture_output=True, text=True, timeout=timeout)


def ray_job_submit(ray_cluster: dict, job_id: str, entry: list[str]) -> tuple[str, subprocess.CompletedProcess]:
    """``ray job submit --no-wait`` of ``entry`` with the repository as working dir, tried again
    (as ``<job_id>-retry``) while the dashboard's job agent is still starting."""
    deadline = time.time() + 240
    while True:
        try:
            out = ray_job(ray_cluster, "submit", "--no-wait", "--submission-id", job_id,
                          "--working-dir", str(REPO), "--", *entry, timeout=60)
        except subprocess.TimeoutExpired:
            out = subprocess.CompletedProcess([], 1, "", "submit timed out (No available agent?)")
        if "No available agent" not in out.stderr or time.time() > deadline:
            return job_id, out
        job_id += "-retry"
        time.sleep(2)


def ray_job_status(ray_cluster: dict, job_id: str) -> str:
    """The job's status (``PENDING``, ``RUNNING``, ``SUCCEEDED``, ...) through the job SDK: a
    poll costs milliseconds here, where each ``ray job status`` is a new Python process of
    seconds of CPU taken from the job it watches on this 2-core machine."""
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(ray_cluster["dashboard"]).get_job_status(job_id)).rsplit(".", 1)[-1]


def ray_job_done(status: str) -> bool:
    return status in ("SUCCEEDED", "FAILED", "STOPPED")


# ---- rank processes of a job with planned faults ------------------------------------


def job_pids(job_dir: str) -> dict[int, dict[str, int]]:
    """``rank -> {"pid", "attempt"}`` as the job's ranks noted them (every node of this host;
    ranks note their pids when the job plans a fault)."""
    from raypod.worker.injector import node_pids, pid_dir

    root = os.path.dirname(pid_dir(job_dir, "node"))
    out: dict[int, dict[str, int]] = {}
    for node in os.listdir(root) if os.path.isdir(root) else []:
        out.update(node_pids(job_dir, node))
    return out


def kill_stopped(job_dir: str) -> None:
    """SIGKILL any rank process of this job still stopped (a failed test leaves none behind)."""
    for entry in job_pids(job_dir).values():
        pid = entry["pid"]
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # gone
        if state in ("T", "t") and b"ray::" in cmdline:
            os.kill(pid, signal.SIGKILL)


def run_faulted(cfg: Any) -> tuple[dict, dict, PidsAtFailure, float]:
    """Run ``cfg`` (a job with ``fault.inject``) to its end on the connected Ray: its summary,
    its first event, the ranks' pids at the failure, and how long after the fault fired (its
    marker's time) the driver declared it. A stopped rank left behind is killed."""
    from raypod.api import run

    pids = PidsAtFailure(cfg.job_dir)
    try:
        summary = run(cfg, callbacks=[pids])
    finally:
        kill_stopped(cfg.job_dir)
    ev = summary["events"][0]
    return summary, ev, pids, detected_after_firing(cfg, summary, 0)


def detected_after_firing(cfg: Any, summary: dict, i: int) -> float:
    """How long after fault ``i`` fired (its marker's time) the driver declared it (event ``i``)."""
    import json

    marker = json.loads((Path(cfg.job_dir) / "faults" / f"fired_{i}.json").read_text())
    return summary["started_at"] + summary["events"][i]["detected_s"] - marker["time"]


class PidsAtFailure(Callback):
    """The ranks' pids as they were when the failure was seen (before the group re-formed)."""

    def __init__(self, job_dir: str) -> None:
        self.job_dir = job_dir
        self.pids: dict[int, dict[str, int]] = {}
        self.history: list[dict[int, dict[str, int]]] = []
        """The pids at each failure, in order (``pids`` is the latest)."""

    def after_failure(self, event: Any) -> None:
        self.pids = job_pids(self.job_dir)
        self.history.append(self.pids)


# ---- the driver's group contract -----------------------------------------------------


def assert_implements_group_protocol(group: Any) -> None:
    """``group`` has every member of :class:`raypod.protocol.WorkerGroupProtocol`, methods with
    the protocol's parameter names in its order (the real group, the simulator's, the fake)."""
    import inspect

    from raypod.protocol import WorkerGroupProtocol

    assert isinstance(group, WorkerGroupProtocol)
    cls = WorkerGroupProtocol
    names = set(getattr(cls, "__annotations__", {}))
    names |= {n for n, v in vars(cls).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))}
    for name in sorted(names):
        assert hasattr(group, name), f"{type(group).__name__} has no {name}"
        want = getattr(cls, name, None)
        if inspect.isfunction(want):
            have = getattr(type(group), name)
            assert list(inspect.signature(have).parameters) == list(inspect.signature(want).parameters), name
