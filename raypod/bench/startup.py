"""The ``startup`` suite: launch to first optimizer step, raypod beside its anchors.

Every system trains ``jobs/configs/tiny.yaml``'s model (GPT 2x128, seq 128, byte
vocabulary, global batch 16, micro batch 8, 2 CPU ranks, FSDP2 per block + root on
gloo, AdamW) and is launched cold, as a subprocess of this harness:

* ``raypod``: ``python -m raypod.cli run jobs/configs/tiny.yaml ...`` (raypod starts a
  local Ray itself). First step: ``summary.json`` ``started_at + first_step_s``, the
  moment the driver holds step 1's results from every rank.
* ``ray_train_v2``: :mod:`raypod.bench.anchors.ray_train_v2`, a Ray Train V2
  ``TorchTrainer`` on a local ``ray.init()``. First step: rank 0's ``time.time()``
  right after step 1's ``optimizer.step()``.
* ``torchrun``: :mod:`raypod.bench.anchors.torchrun_gpt` under
  ``python -m torch.distributed.run --standalone --nproc-per-node 2``. Same mark.

A trial's figure is that absolute first-step time minus ``time.time()`` taken just
before ``subprocess.Popen``. Trials run interleaved (raypod, ray_train_v2, torchrun,
raypod, ...). Each trial gets a private ``RAY_TMPDIR`` (so ``ray.init()`` starts a new
local cluster and never joins one that another program recorded in
``/tmp/ray/ray_current_cluster``) and an environment tag; after it, every process
carrying the tag is waited for (and killed by pid if it lingers), and the harness
waits for ``pgrep -f raylet`` to come back empty before the next trial. Before each
launch it also waits (bounded) for the CPUs to be mostly idle and records how busy
they were, since on a shared 2-core machine other programs skew startup times.

``cluster="running"`` (``python -m raypod.bench.startup --cluster running``) measures the
``ray job submit`` case instead: one ``ray start --head`` (token authentication on, ports
and temp folder of its own) before the first trial, then each raypod and Ray Train V2
trial is ``ray job submit --address http://127.0.0.1:<dashboard port> -- <the system's
command>`` and its figure runs from just before that ``Popen`` to the same first-step
mark. torchrun stays a plain local launch beside them. The cluster is stopped at the end,
also on error: its processes carry a tag of their own and are ended by pid (never
``ray stop``, which would stop every other Ray on the machine too). raypod's entrypoint
there is :func:`phase_main`, which runs ``raypod.cli.main`` unchanged and notes when its
phases ended (imports, ``ray.init``, the actors up, the ranks set up). Results go to
``startup_running.json`` / ``.md``; both modes compute the acceptance line (raypod at
most :data:`ACCEPT_VS_TORCHRUN` x torchrun's median and below Ray Train V2's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raypod.bench import table
from raypod.bench import trials as harness

LABELS = table.labels(ray_train_v2="Ray Train V2", torchrun="torchrun")
SYSTEMS = tuple(LABELS)
CLUSTER_MODES = ("cold", "running")
"""``cold``: every system starts its own everything; ``running``: raypod and Ray Train V2
are submitted to one Ray cluster started before the trials (torchrun as in ``cold``)."""
STEPS = 3
CORPUS = "~/.cache/raypod/data/stdlib_corpus.parquet"
TRIAL_TIMEOUT_S = 300.0
QUIET_TIMEOUT_S = 30.0
IDLE_BUSY_MAX = 0.25
ACCEPT_VS_TORCHRUN = 1.2
"""Issue 18's bar: raypod's median at most this many times torchrun's (and below Ray Train V2's)."""
CLUSTER_STOP_GRACE_S = 16.0
"""SIGTERM to SIGKILL for the cluster's processes: ``ray stop``'s default grace period."""
BIN = Path(sys.executable).parent

COMMANDS = {
    "raypod": "python -m raypod.cli run jobs/configs/tiny.yaml --set train.max_steps=3 "
              "--set checkpoint.storage=<tmp> --set name=bench-startup-<i> --quiet",
    "ray_train_v2": "RAY_TRAIN_V2_ENABLED=1 python raypod/bench/anchors/ray_train_v2.py "
                    "--mark <file> --storage <tmp> --name bench-startup-ray-train-<i>",
    "torchrun": "python -m torch.distributed.run --standalone --nproc-per-node 2 "
                "raypod/bench/anchors/torchrun_gpt.py --mark <file>",
}
RUNNING_COMMANDS = {
    "cluster": "RAY_AUTH_MODE=token ray start --head --num-cpus=<raypod's local count> "
               "--dashboard-host=127.0.0.1 (own ports and --temp-dir), once",
    "raypod": "RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:<dashboard> -- "
              "python -m raypod.bench.startup --phases-out <file> run jobs/configs/tiny.yaml "
              "--set train.max_steps=3 --set checkpoint.storage=<tmp> --set name=bench-startup-<i> --quiet "
              "(raypod.cli.main with its phases noted; --no-phases: python -m raypod.cli run ...)",
    "ray_train_v2": "RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:<dashboard> -- "
                    "env RAY_TRAIN_V2_ENABLED=1 python raypod/bench/anchors/ray_train_v2.py "
                    "--mark <file> --storage <tmp> --name bench-startup-ray-train-<i>",
    "torchrun": COMMANDS["torchrun"] + " (local, as in cold mode)",
}

PHASES = {
    "submit_s": "submit to the entrypoint's Python process (ray job submit, job supervisor)",
    "imports_s": "Python start, imports (torch, ray, raypod, mlflow), config, pre-flight checks",
    "connect_s": "ray.init joining the running cluster",
    "to_driver_s": "data preparation (Ray Data tokenising into the job's token cache), the Driver object",
    "to_group_s": "Driver to the group's start (checkpoint lookup)",
    "actors_s": "placement group, worker actors started with torch imported",
    "rank_setup_s": "rendezvous, gloo group, FSDP2, corpus load",
    "first_step_s": "step 1, to all its results at the driver",
}
"""raypod's phases on a running cluster, in order; they add up to the trial's figure."""


_log = harness.logger("bench startup")


# ---- the machine --------------------------------------------------------------------
def _cpu_busy(sample_s: float = 1.0) -> float:
    """Fraction of the machine's CPU time that was busy over ``sample_s`` (from /proc/stat)."""
    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v), idle

    t1, i1 = read()
    time.sleep(sample_s)
    t2, i2 = read()
    return 0.0 if t2 == t1 else 1.0 - (i2 - i1) / (t2 - t1)


def _wait_idle(timeout_s: float = QUIET_TIMEOUT_S, busy_max: float = IDLE_BUSY_MAX) -> float:
    """Wait (bounded) until the CPUs are mostly idle, so other programs skew less.

    Returns the busy fraction of the last one-second sample.
    """
    deadline = time.monotonic() + timeout_s
    busy = _cpu_busy()
    while busy > busy_max and time.monotonic() < deadline:
        busy = _cpu_busy()
    if busy > busy_max:
        _log(f"CPUs still {busy:.0%} busy with other programs after {timeout_s:.0f}s; going on "
             f"(timings may be contended)")
    return busy


# ---- the running cluster ----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_cpus(cores: int | None = None) -> int:
    """The logical CPUs the running cluster gets: what ``raypod run`` gives the private local
    Ray it starts for tiny.yaml (:func:`raypod.api.connect_ray`: 2 ranks + 1 spare, at most 2
    per core, plus 1 for Ray Data, never fewer than the cores), so both modes offer the same."""
    cores = cores or os.cpu_count() or 1
    return max(cores, min(3, 2 * cores) + 1)


@dataclass
class RunningCluster:
    """A Ray head started once with ``ray start --head`` for the ``running`` mode.

    Token authentication stays on (``RAY_AUTH_MODE=token`` for the head and every
    ``ray job submit``; the user's ``~/.ray/auth_token``, generated when missing). It has
    ports and a temp folder of its own, so it never collides with another Ray on the
    machine, and every process it starts carries :attr:`tag` (``trials.TAG_VAR``) in its
    environment, so that :meth:`stop` ends exactly those, by pid.
    """

    tag: str = field(default_factory=lambda: "cluster-" + uuid.uuid4().hex[:12])
    temp_dir: str = ""
    dashboard_port: int = 0
    started_s: float | None = None
    baseline: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        """The head's environment: the trials' (no RAY_ADDRESS, no MLflow URI, no V2 flag),
        token mode, the tag, the repository on ``PYTHONPATH``. Jobs inherit it."""
        env = {k: v for k, v in os.environ.items() if k not in harness.SCRUB}
        env.update(RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
                   PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **{harness.TAG_VAR: self.tag})
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(harness.REPO), os.environ.get("PYTHONPATH")) if p)
        return env

    def start_command(self) -> list[str]:
        """``ray start --head`` on fresh ports (every agent port too) and :attr:`temp_dir`."""
        return [str(BIN / "ray"), "start", "--head", f"--port={_free_port()}",
                f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
                f"--num-cpus={cluster_cpus()}", f"--temp-dir={self.temp_dir}", "--include-dashboard=true",
                "--disable-usage-stats", f"--dashboard-agent-listen-port={_free_port()}",
                f"--dashboard-agent-grpc-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
                f"--metrics-export-port={_free_port()}"]

    def start(self, attempts: int = 3, timeout_s: float = 120.0) -> None:
        """Start the head (retried on fresh ports: on a busy machine ``ray start`` can give
        up waiting for its own raylet), then submit one no-op job, untimed, so that the
        job server is up and has run a job, as on a cluster that has been running."""
        self._ensure_token()
        err = ""
        for attempt in range(1, attempts + 1):
            self.temp_dir = tempfile.mkdtemp(prefix="rpsc-", dir="/tmp")
            self.dashboard_port = _free_port()
            t0 = time.monotonic()
            try:
                out = subprocess.run(self.start_command(), env=self.env(), cwd=harness.REPO,
                                     capture_output=True, text=True, timeout=timeout_s)
                err = "" if out.returncode == 0 else out.stderr[-2000:]
            except subprocess.TimeoutExpired:
                err = f"ray start did not return in {timeout_s:.0f}s"
            if not err:
                self.started_s = round(time.monotonic() - t0, 2)
                break
            _log(f"ray start failed (attempt {attempt} of {attempts}): "
                 f"{err.strip().splitlines()[-1] if err.strip() else ''}")
            self.stop()
        else:
            raise RuntimeError(f"ray start --head failed {attempts} times: {err}")
        self._warm_up(timeout_s)

    def _ensure_token(self) -> None:
        """``ray get-auth-token --generate`` when this user has no Ray token yet."""
        if any(os.environ.get(v) for v in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
            return
        if not (Path.home() / ".ray" / "auth_token").exists():
            subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=self.env(),
                           capture_output=True, check=True, timeout=120)

    def _warm_up(self, timeout_s: float) -> None:
        """One no-op job; then note the cluster's own processes (:meth:`settle`'s baseline):
        those up after ``ray start`` and whatever of the job's outlives it by 10 s (the
        cluster's, started for its first job), so that later trials wait only for their own."""
        self.baseline = set(harness.tagged_pids(self.tag))
        cmd = self.submit_command(f"warmup-{self.tag}", [sys.executable, "-c", "pass"])
        out = subprocess.run(cmd, env=self.env(), cwd=harness.REPO, capture_output=True, text=True,
                             timeout=timeout_s)
        if out.returncode != 0:
            raise RuntimeError(f"the no-op warm-up job failed on the new cluster: {out.stdout[-1500:]}"
                               f"{out.stderr[-1500:]}")
        self.settle(10.0, quiet=True)
        self.baseline |= set(harness.tagged_pids(self.tag))

    def submit_command(self, submission_id: str, entrypoint: list[str]) -> list[str]:
        """``ray job submit`` of ``entrypoint`` to this cluster, waiting for the job's end."""
        return [str(BIN / "ray"), "job", "submit", "--address", self.url, "--submission-id", submission_id,
                "--", *entrypoint]

    def stop_job(self, submission_id: str) -> None:
        """``ray job stop`` (a trial that ran past its time), bounded."""
        try:
            subprocess.run([str(BIN / "ray"), "job", "stop", "--address", self.url, submission_id],
                           env=self.env(), cwd=harness.REPO, capture_output=True, timeout=60)
        except subprocess.TimeoutExpired:
            _log(f"ray job stop {submission_id} did not return in 60s")

    def busy_pids(self) -> list[int]:
        """The cluster's processes beyond its idle state: a job's driver, actors, supervisor
        (idle pooled workers, ``ray::IDLE``, do not count, nor do the detached actors Ray's
        own libraries leave behind for the cluster's life, ``ray::_StatsActor`` and the like:
        Ray Train V2's first job starts two)."""
        busy = []
        for pid in harness.tagged_pids(self.tag):
            if pid in self.baseline:
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ")
            except OSError:
                continue
            if not cmd.startswith((b"ray::IDLE", b"ray::_")):
                busy.append(pid)
        return busy

    def settle(self, timeout_s: float, quiet: bool = False) -> float:
        """Wait (bounded) until the last job's processes are gone; returns the seconds waited."""
        t0 = time.monotonic()
        while self.busy_pids() and time.monotonic() - t0 < timeout_s:
            time.sleep(0.25)
        if self.busy_pids() and not quiet:
            _log(f"the cluster still runs {len(self.busy_pids())} process(es) of the last job after "
                 f"{timeout_s:.0f}s; going on")
        return round(time.monotonic() - t0, 2)

    def stop(self) -> None:
        """End every process of the cluster by pid (SIGTERM, SIGKILL after
        :data:`CLUSTER_STOP_GRACE_S`, as ``ray stop`` does, but only this cluster's)."""
        pids = harness.tagged_pids(self.tag)
        harness.signal_pids(pids, signal.SIGTERM)
        deadline = time.monotonic() + CLUSTER_STOP_GRACE_S
        while pids and time.monotonic() < deadline:
            time.sleep(0.25)
            pids = harness.tagged_pids(self.tag)
        for _ in range(40):
            if not pids:
                break
            harness.signal_pids(pids, signal.SIGKILL)
            time.sleep(0.25)
            pids = harness.tagged_pids(self.tag)
        if pids:
            _log(f"cluster processes {pids} survive SIGKILL")
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = ""


# ---- raypod's phases (the entrypoint on a running cluster) -----------------------------
def _process_start() -> float:
    """``time.time()`` at which this process started (``/proc``, to the clock tick)."""
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    ticks = int(stat[stat.rfind(b")") + 2:].split()[19])  # field 22, starttime
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def mark_calls(owner: Any, attr: str, marks: dict[str, Any], key: str) -> None:
    """Wrap ``owner.attr`` so that its first call notes ``<key>_begin`` / ``<key>_end``
    (``time.time()``) in ``marks``; a dict it returns lends its ``setup_s`` and ``load_s``.
    A name ``owner`` no longer has is noted in ``marks["unmarked"]`` and left alone: the job
    runs as it would, only that phase goes missing (:func:`phases` returns None)."""
    orig = getattr(owner, attr, None)
    if orig is None:
        marks.setdefault("unmarked", []).append(f"{getattr(owner, '__name__', owner)}.{attr}")
        return

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        first = f"{key}_begin" not in marks
        if first:
            marks[f"{key}_begin"] = time.time()
        try:
            result = orig(*args, **kwargs)
        finally:
            if first:
                marks[f"{key}_end"] = time.time()
        if first and isinstance(result, dict):
            marks.update({f"{key}_{k}": result[k] for k in ("setup_s", "load_s") if k in result})
        return result

    setattr(owner, attr, wrapped)


def phase_main(out: str, argv: list[str]) -> int:
    """``raypod.cli.main(argv)`` unchanged, with the ends of its phases written to ``out``
    (JSON): process start, imports, ``ray.init``, the group's start, the actors up (their
    ``node_info`` answered, so torch is imported) and the ranks set up."""
    marks: dict[str, Any] = {"process_start": _process_start(), "wrapper": time.time()}
    import ray

    import raypod.api  # noqa: F401 - what `raypod run` imports before it connects
    import raypod.cli
    from raypod.driver.worker_group import WorkerGroup

    marks["imported"] = time.time()
    mark_calls(ray, "init", marks, "connect")
    mark_calls(WorkerGroup, "start", marks, "group")
    mark_calls(WorkerGroup, "_locate", marks, "located")
    try:
        return raypod.cli.main(argv)
    finally:
        Path(out).write_text(json.dumps(marks))


def phases(t0: float, marks: dict[str, Any], started_at: float, first: float) -> dict[str, float] | None:
    """:data:`PHASES` from the submit time ``t0``, :func:`phase_main`'s marks and the summary's
    ``started_at`` (the Driver) and first step; None when a mark is missing."""
    need = ("process_start", "imported", "connect_begin", "connect_end", "group_begin", "located_end",
            "group_end")
    if any(k not in marks for k in need):
        return None
    points = [t0, marks["process_start"], marks["imported"], marks["connect_end"], started_at,
              marks["group_begin"], marks["located_end"], marks["group_end"], first]
    out = {k: round(b - a, 3) for k, a, b in zip(PHASES, points, points[1:], strict=False)}
    out["connect_s"] = round(marks["connect_end"] - marks["connect_begin"], 3)
    out["imports_s"] = round(marks["connect_begin"] - marks["process_start"], 3)
    return out


# ---- one trial ---------------------------------------------------------------------
def _command(system: str, i: int, storage: Path, mark: Path) -> tuple[list[str], dict[str, str]]:
    py = sys.executable
    extra: dict[str, str] = {}
    if system == "raypod":
        cmd = [py, "-m", "raypod.cli", "run", "jobs/configs/tiny.yaml",
               "--set", f"train.max_steps={STEPS}", "--set", f"checkpoint.storage={storage}",
               "--set", f"name=bench-startup-{i}", "--quiet"]
    elif system == "ray_train_v2":
        cmd = [py, str(harness.REPO / "raypod/bench/anchors/ray_train_v2.py"), "--mark", str(mark),
               "--storage", str(storage), "--name", f"bench-startup-ray-train-{i}",
               "--steps", str(STEPS)]
        extra["RAY_TRAIN_V2_ENABLED"] = "1"
    elif system == "torchrun":
        cmd = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(harness.REPO / "raypod/bench/anchors/torchrun_gpt.py"), "--mark", str(mark),
               "--steps", str(STEPS)]
    else:
        raise ValueError(f"unknown system '{system}'")
    return cmd, extra


def _submitted(system: str, cmd: list[str], extra: dict[str, str], phases_out: Path | None) -> list[str]:
    """The entrypoint a job on the running cluster runs for ``system``'s cold command: its
    environment (the cluster's has no V2 flag) put in front with ``env``, and raypod's
    ``-m raypod.cli`` run through :func:`phase_main` when ``phases_out`` is given."""
    if system == "raypod" and phases_out is not None:
        cmd = [cmd[0], "-m", "raypod.bench.startup", "--phases-out", str(phases_out), *cmd[3:]]
    if system == "raypod":  # the config by absolute path: the job's cwd is the head's
        cmd = [str(harness.REPO / c) if c == "jobs/configs/tiny.yaml" else c for c in cmd]
    return ["env", *[f"{k}={v}" for k, v in extra.items()], *cmd] if extra else cmd


def _first_step_time(system: str, i: int, storage: Path, mark: Path) -> float:
    if system == "raypod":
        summary = json.loads((storage / f"bench-startup-{i}" / "summary.json").read_text())
        if summary.get("first_step_s") is None:
            raise RuntimeError(f"raypod summary has no first_step_s (status {summary.get('status')})")
        return float(summary["started_at"]) + float(summary["first_step_s"])
    return float(mark.read_text())


def _raypod_detail(rec: dict[str, Any], t0: float, storage: Path, i: int, phases_out: Path | None) -> None:
    """Where raypod's time went: up to the Driver object, then to step 1; and on a running
    cluster :func:`phases` from :func:`phase_main`'s marks."""
    summary = json.loads((storage / f"bench-startup-{i}" / "summary.json").read_text())
    started, first = float(summary["started_at"]), float(summary["started_at"]) + float(summary["first_step_s"])
    rec["launch_to_driver_s"] = round(started - t0, 3)
    rec["driver_to_first_step_s"] = round(float(summary["first_step_s"]), 3)
    if phases_out is not None and phases_out.exists():
        marks = json.loads(phases_out.read_text())
        rec["phases"] = phases(t0, marks, started, first)
        rec["rank_setup_reported_s"] = marks.get("group_setup_s")
        rec["corpus_load_s"] = marks.get("group_load_s")


def _drain_own(tag: str) -> dict[str, Any]:
    """Wait for the trial's own processes (the ``ray job submit`` client, a local torchrun) to
    exit, killing stragglers by pid; no wait for raylets, since the cluster's stays up."""
    t0 = time.monotonic()
    killed: list[int] = []
    while left := harness.tagged_pids(tag):
        if time.monotonic() - t0 > harness.DRAIN_TIMEOUT_S:
            harness.signal_pids(left, signal.SIGKILL)
            killed.extend(p for p in left if p not in killed)
            if time.monotonic() - t0 > harness.DRAIN_TIMEOUT_S + 10:
                raise RuntimeError(f"trial processes {left} survive SIGKILL")
        time.sleep(0.25)
    return {"drain_s": round(time.monotonic() - t0, 2), "killed_stragglers": killed}


def run_trial(system: str, i: int, logs: Path, cluster: RunningCluster | None = None,
              phases_on: bool = True) -> dict[str, Any]:
    """Launch ``system`` once; returns seconds from launch (or submit) to first step and details.

    Without ``cluster`` everything starts cold. With one, raypod and Ray Train V2 are
    submitted to it (``ray job submit``) and torchrun is launched locally as before.
    """
    trial = harness.Trial.new("rpb-", logs / f"{system}-{i}.log", ("storage",))
    storage, mark = trial.tmp / "storage", trial.tmp / "first_step"
    cmd, extra = _command(system, i, storage, mark)
    submitted = cluster is not None and system != "torchrun"
    phases_out = trial.tmp / "phases.json" if submitted and system == "raypod" and phases_on else None
    submission_id = f"bench-startup-{system}-{i}-{trial.tag}"
    if submitted:
        assert cluster is not None
        cmd, extra = cluster.submit_command(submission_id, _submitted(system, cmd, extra, phases_out)), \
            {"RAY_AUTH_MODE": "token"}
    env = trial.env(extra)
    rec: dict[str, Any] = {"system": system, "trial": i, "seconds": None,
                           "launch": "ray job submit" if submitted else "local"}
    rec["cpu_busy_before"] = round(_wait_idle(), 2)
    with harness.launched(cmd, env, trial.log_path) as (proc, t0):
        rc = harness.wait_rc(proc, TRIAL_TIMEOUT_S)
        exit_s = time.time() - t0
        if rc is None and submitted and cluster is not None:
            cluster.stop_job(submission_id)
    rec.update(exit_code=rc, loadavg_1m_after=round(os.getloadavg()[0], 2), process_s=round(exit_s, 2))
    try:
        if rc is None:
            raise RuntimeError(f"timed out after {TRIAL_TIMEOUT_S:.0f}s")
        if rc != 0:
            raise RuntimeError(f"exit code {rc}")
        rec["seconds"] = round(_first_step_time(system, i, storage, mark) - t0, 3)
        if system == "raypod":
            _raypod_detail(rec, t0, storage, i, phases_out)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["log_tail"] = harness.tail(trial.log_path)
    if cluster is None:
        return trial.finish(rec, QUIET_TIMEOUT_S, _log)
    rec.update(_drain_own(trial.tag))
    rec["cluster_settle_s"] = cluster.settle(QUIET_TIMEOUT_S)
    shutil.rmtree(trial.tmp, ignore_errors=True)
    return rec


# ---- the suite ---------------------------------------------------------------------
def _ensure_corpus() -> None:
    path = os.path.expanduser(CORPUS)
    if not os.path.exists(path):
        from raypod.data.corpus import build_stdlib_corpus

        _log(f"building the corpus at {path} (untimed)")
        build_stdlib_corpus(CORPUS)


GPT_STACK = ("torch, torch.distributed.run, torch.distributed.fsdp, ray, ray.train.torch, "
             "mlflow, raypod.api, raypod.worker.trainer, raypod.bench.anchors.common")
"""What this suite's systems import (warmed once, untimed)."""


def _fmt(x: float | None) -> str:
    return "failed" if x is None else f"{x:.2f}"


def spread(trials: list[dict[str, Any]]) -> float | None:
    """Max minus min of a system's successful trials (None with fewer than two)."""
    xs = [t["seconds"] for t in trials if t["seconds"] is not None]
    return round(max(xs) - min(xs), 3) if len(xs) > 1 else None


def acceptance(medians: dict[str, float | None]) -> dict[str, Any]:
    """Issue 18's line: raypod's median at most :data:`ACCEPT_VS_TORCHRUN` x torchrun's and
    below Ray Train V2's, in the same run (``met`` None when a median is missing)."""
    r, t, v = medians.get("raypod"), medians.get("torchrun"), medians.get("ray_train_v2")
    vs_torchrun = table.ratio(r, t)
    ok_torchrun = None if vs_torchrun is None else vs_torchrun <= ACCEPT_VS_TORCHRUN
    ok_v2 = None if r is None or v is None else r < v
    met = None if ok_torchrun is None or ok_v2 is None else ok_torchrun and ok_v2
    return {"raypod_over_torchrun": vs_torchrun, "limit_vs_torchrun": ACCEPT_VS_TORCHRUN,
            "within_torchrun_limit": ok_torchrun, "below_ray_train_v2": ok_v2, "met": met}


def acceptance_line(result: dict[str, Any]) -> str:
    a = result["acceptance"]

    def word(x: bool | None) -> str:
        return "n/a" if x is None else ("yes" if x else "no")

    ratio = "n/a" if a["raypod_over_torchrun"] is None else f"{a['raypod_over_torchrun']:.2f}x"
    return (f"Acceptance (raypod <= {a['limit_vs_torchrun']:g}x torchrun and below Ray Train V2, medians of "
            f"this run): raypod / torchrun {ratio} ({word(a['within_torchrun_limit'])}); below Ray Train V2: "
            f"{word(a['below_ray_train_v2'])}; **{'met' if a['met'] else 'not met' if a['met'] is False else 'n/a'}**.")


def _rows(result: dict[str, Any]) -> list[list[str]]:
    n = result["trials_per_system"]
    launch = {s: ("ray job submit" if result.get("cluster") == "running" and s != "torchrun" else "local")
              for s in SYSTEMS}
    rows = []
    for s in SYSTEMS:
        per = [_fmt(t["seconds"]) for t in result["trials"][s]]
        per += [""] * (n - len(per))
        r = result["ratios"].get(f"raypod/{s}")
        ratio = "1.00" if s == "raypod" else ("n/a" if r is None else f"{r:.2f}")
        sp = result.get("spread_s", {}).get(s)
        rows.append([LABELS[s], launch[s], *per, _fmt(result["median_s"][s]),
                     "n/a" if sp is None else f"{sp:.2f}", ratio])
    return rows


def _header(n: int) -> list[str]:
    return ["system", "launch", *[f"trial {k + 1} (s)" for k in range(n)], "median (s)", "spread (s)",
            "raypod / system"]


def markdown_table(result: dict[str, Any]) -> str:
    n = result["trials_per_system"]
    return table.markdown_table(_header(n), _rows(result), "|---|---|" + "---:|" * (n + 3))


def phase_rows(result: dict[str, Any]) -> list[list[str]]:
    """raypod's :data:`PHASES`: the median of each over the trials that have them, and each trial's."""
    got = [t["phases"] for t in result["trials"]["raypod"] if t.get("phases")]
    return [[PHASES[k], f"{table.median(p[k] for p in got):.2f}", ", ".join(f"{p[k]:.2f}" for p in got)]
            for k in PHASES] if got else []


def _contention_line(result: dict[str, Any]) -> str:
    busy = [t["cpu_busy_before"] for ts in result["trials"].values() for t in ts]
    load = [t["loadavg_1m_after"] for ts in result["trials"].values() for t in ts]
    return (f"Other programs on the machine: CPUs {min(busy):.0%}-{max(busy):.0%} busy in the second "
            f"before each launch; 1-minute load average {min(load):.1f}-{max(load):.1f} after the trials "
            f"({result['machine']['nproc']} CPUs).")


def _title(result: dict[str, Any]) -> str:
    if result.get("cluster") == "running":
        return "startup on a running Ray cluster: ray job submit to first optimizer step (tiny.yaml, 2 CPU ranks)"
    return "startup: launch to first optimizer step (tiny.yaml, 2 CPU ranks)"


def print_table(result: dict[str, Any]) -> None:
    table.print_table(_title(result), _header(result["trials_per_system"]), _rows(result), lambda k: k > 1,
                      width=None if sys.stdout.isatty() else 140)
    rows = phase_rows(result)
    if rows:
        table.print_table("raypod's phases on the running cluster (median, per trial)", ["phase", "median (s)",
                          "trials (s)"], rows, lambda k: k > 0, width=None if sys.stdout.isatty() else 140)
    print(acceptance_line(result).replace("**", ""))


def _interleaved(trials: int, logs: Path, cluster: RunningCluster | None,
                 phases_on: bool) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    def describe(rec: dict[str, Any]) -> str:
        what = f"{rec['seconds']:.2f}s" if rec["seconds"] is not None else f"FAILED ({rec['error']})"
        return f"{what} to first step (process ran {rec['process_s']:.1f}s, drained in {rec['drain_s']:.1f}s)"

    def run_one(system: str, i: int) -> dict[str, Any]:
        return run_trial(system, i, logs, cluster, phases_on)

    return harness.interleave(SYSTEMS, trials, run_one, describe, _log)


def run(trials: int = 3, out: str | os.PathLike | None = "benchmarks/results", cluster: str = "cold",
        phases: bool = True) -> dict[str, Any]:
    """Run the suite: ``trials`` interleaved trials per system; write JSON and Markdown to ``out``.

    Args:
        cluster: ``cold`` (``startup.json``) or ``running`` (``startup_running.json``): see
            :data:`CLUSTER_MODES`.
        phases: on a running cluster, raypod's entrypoint is :func:`phase_main` (its phases
            noted); False submits ``python -m raypod.cli run`` itself.
    """
    if trials < 1:
        raise ValueError("trials must be at least 1")
    if cluster not in CLUSTER_MODES:
        raise ValueError(f"cluster must be one of {', '.join(CLUSTER_MODES)}, not '{cluster}'")
    _ensure_corpus()
    harness.warm_page_cache(GPT_STACK)
    suite = "startup" if cluster == "cold" else "startup_running"
    how = "launched cold" if cluster == "cold" else "raypod and Ray Train V2 submitted to one running Ray cluster"
    session = harness.Session.open(suite, lambda logs: f"{trials} trial(s) per system, interleaved, {how}; "
                                                       f"subprocess logs in {logs}", _log, QUIET_TIMEOUT_S)
    head = None
    if cluster == "running":
        head = RunningCluster()
        try:
            head.start()
        except BaseException:
            head.stop()
            raise
        _log(f"cluster up in {head.started_s:.1f}s (untimed), dashboard {head.url}, token auth")
    try:
        by_system, order = _interleaved(trials, session.logs, head, phases)
    finally:
        if head is not None:
            head.stop()
            _log("cluster stopped")
    result = _result(trials, cluster, session, by_system, order, head)
    print_table(result)
    table.write_results(result, out, suite, markdown(result), _log)
    return result


def _result(trials: int, cluster: str, session: harness.Session, by_system: dict[str, list[dict[str, Any]]],
            order: list[str], head: RunningCluster | None) -> dict[str, Any]:
    medians = {s: table.median(t["seconds"] for t in by_system[s] if t["seconds"] is not None)
               for s in SYSTEMS}
    running = cluster == "running"
    result: dict[str, Any] = {
        "suite": "startup" if not running else "startup_running",
        "cluster": cluster,
        "metric": ("seconds from time.time() just before subprocess.Popen (running: of `ray job submit`; "
                   "torchrun: its local launch) to the first optimizer step (raypod: summary started_at + "
                   "first_step_s, all ranks' step-1 results at the driver; anchors: rank 0 right after "
                   "optimizer.step())"),
        "date": session.date,
        "machine": session.machine(),
        "command": (f"python -m raypod.bench.startup --cluster running --trials {trials}" if running
                    else f"raypod bench startup --trials {trials}"),
        "system_commands": RUNNING_COMMANDS if running else COMMANDS,
        "workload": "jobs/configs/tiny.yaml model: GPT n_layer 2, n_head 4, n_embd 128, seq_len 128, "
                    "vocab 256; global batch 16, micro batch 8; 2 ranks; FSDP2 per block + root; "
                    f"gloo; AdamW lr 3e-3; {STEPS} steps",
        "trials_per_system": trials,
        "order": order,
        "trials": by_system,
        "median_s": medians,
        "spread_s": {s: spread(by_system[s]) for s in SYSTEMS},
        "ratios": table.ratios_vs(medians, "raypod", SYSTEMS),
        "acceptance": acceptance(medians),
    }
    if head is not None:
        result["cluster_start_s"] = head.started_s
        result["cluster_cpus"] = cluster_cpus()
        ph = [t["phases"] for t in by_system["raypod"] if t.get("phases")]
        result["raypod_phases_median_s"] = {k: table.median(p[k] for p in ph) for k in PHASES} if ph else None
    return result


def markdown(result: dict[str, Any]) -> str:
    """``startup.md`` / ``startup_running.md``: the table, raypod's phases, the acceptance line
    and what loaded the machine."""
    running = result.get("cluster") == "running"
    how = ("raypod and Ray Train V2 each submitted with `ray job submit` to one Ray cluster started "
           "before the trials (untimed), torchrun launched locally" if running
           else "each launched cold as a subprocess")
    lines = [
        f"# {_title(result)}",
        "",
        f"{table.machine_line(result['date'], result['machine'])}.",
        f"Command: `{result['command']}`. Trials interleaved in the order "
        f"{', '.join(SYSTEMS)}, ...; {how}.",
        "",
        markdown_table(result),
        "",
    ]
    rows = phase_rows(result)
    if rows:
        lines += ["raypod's phases (from the submit; they add up to its figure):", "",
                  table.markdown_table(["phase", "median (s)", "trials (s)"], rows), ""]
    return "\n".join([
        *lines,
        acceptance_line(result),
        "",
        _contention_line(result),
        "",
        "Seconds from just before `subprocess.Popen` to the first optimizer step; the spread is the "
        "slowest trial minus the fastest; the ratio is raypod's median over the system's median "
        "(below 1: raypod is faster).",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    """``python -m raypod.bench.startup [--cluster cold|running] [--trials N] [--out DIR]``; or, as
    a job's entrypoint, ``--phases-out FILE <raypod arguments>`` (:func:`phase_main`)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--phases-out"]:
        if len(argv) < 3:
            print("--phases-out needs a file and raypod's arguments", file=sys.stderr)
            return 2
        return phase_main(argv[1], argv[2:])
    p: argparse.ArgumentParser = harness.suite_parser(__doc__.splitlines()[0])
    p.add_argument("--cluster", choices=CLUSTER_MODES, default="cold",
                   help="cold: every system starts its own Ray; running: raypod and Ray Train V2 are "
                        "submitted with `ray job submit` to one Ray cluster started first")
    p.add_argument("--no-phases", action="store_true",
                   help="running: submit `python -m raypod.cli run` itself, without noting raypod's phases")
    args = p.parse_args(argv)
    run(trials=args.trials, out=args.out, cluster=args.cluster, phases=not args.no_phases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
