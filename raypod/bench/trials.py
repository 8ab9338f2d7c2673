"""The trial skeleton every benchmark suite runs on.

A suite opens a :class:`Session` (a logs folder, no stray Ray cluster, the load before),
runs its systems interleaved with :func:`interleave`, and each trial is a
:class:`Trial`: a tag in the environment of every process it starts, a private
folder (its ``RAY_TMPDIR``), a cold subprocess :func:`launched` in its own session,
and at the end :meth:`Trial.finish`, which waits for every tagged process to exit
(killing stragglers by pid, stopped ones at once) and for no Ray cluster to be up
before the next trial.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raypod.bench.table import machine

TAG_VAR = "RAYPOD_BENCH_TRIAL"
"""Environment variable that marks every process a trial starts."""
DRAIN_TIMEOUT_S = 60.0
REPO = Path(__file__).resolve().parents[2]


def tagged_pids(tag: str) -> list[int]:
    """Processes whose environment carries ``TAG_VAR=tag`` (everything a trial started)."""
    needle = f"{TAG_VAR}={tag}".encode()
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def raylets() -> list[int]:
    """``pgrep -f raylet``: Ray node processes of any cluster on this machine."""
    r = subprocess.run(["pgrep", "-f", "raylet"], capture_output=True, text=True)
    return [int(x) for x in r.stdout.split()]


def stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (state ``T``/``t`` in ``/proc/<pid>/stat``: SIGSTOP, a tracer).

    A stopped process never exits by itself and holds a SIGTERM pending until it is
    continued; only SIGKILL ends it.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    fields = stat[stat.rfind(b")") + 2:].split()  # the name in (...) may hold spaces
    return bool(fields) and fields[0] in (b"T", b"t")


def signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_group(proc: subprocess.Popen) -> None:
    """End the trial's process group (it was started in its own session)."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_no_raylets(timeout_s: float, log: Callable[[str], None]) -> list[int]:
    """Wait until ``pgrep -f raylet`` is empty; returns what is left at the deadline."""
    deadline = time.monotonic() + timeout_s
    left = raylets()
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = raylets()
    if left:
        log(f"raylet processes of another program still up after {timeout_s:.0f}s "
            f"(pids {left}); going on (timings may be contended)")
    return left


def drain(tag: str, quiet_timeout_s: float, log: Callable[[str], None]) -> dict[str, Any]:
    """Wait for every process of the trial to exit, killing stragglers by pid.

    A stopped process (a frozen rank, :func:`stopped`) is SIGKILLed at once: it cannot
    exit and a SIGTERM would stay pending. The others get SIGTERM after half of
    :data:`DRAIN_TIMEOUT_S` and SIGKILL after all of it. Then wait (bounded) for
    ``pgrep -f raylet`` to be empty, so the next trial starts with no Ray cluster up,
    ours or anyone's.
    """
    t0 = time.monotonic()
    killed: list[int] = []
    killed_stopped: list[int] = []
    while True:
        left = tagged_pids(tag)
        if not left:
            break
        frozen = [p for p in left if stopped(p)]
        signal_pids(frozen, signal.SIGKILL)
        killed_stopped.extend(p for p in frozen if p not in killed_stopped)
        waited = time.monotonic() - t0
        if waited > DRAIN_TIMEOUT_S + 10:
            raise RuntimeError(f"trial processes {left} survive SIGKILL")
        if waited > DRAIN_TIMEOUT_S:
            signal_pids(left, signal.SIGKILL)
            killed.extend(p for p in left if p not in killed)
        elif waited > DRAIN_TIMEOUT_S / 2:
            signal_pids(left, signal.SIGTERM)
        time.sleep(0.25)
    drain_s = time.monotonic() - t0
    return {"drain_s": round(drain_s, 2), "killed_stragglers": killed, "killed_stopped": killed_stopped,
            "other_raylets_after": wait_no_raylets(quiet_timeout_s, log)}


def tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


_ERROR_LINE = re.compile(r"\b(\w+(?:Error|Exception)): (\S.*)")


def cause(path: Path) -> str | None:
    """The last ``SomeError: message`` line of a trial's log (its likely cause), shortened."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    found = None
    for line in text.splitlines():
        m = _ERROR_LINE.search(line)
        if m and m.group(1) != "ChildFailedError":
            found = f"{m.group(1)}: {m.group(2).strip()}"
    return found[:240] if found else None


MLP_STACK = ("torch, torch.distributed.run, torch.distributed.fsdp, torch.distributed.checkpoint, "
             "ray, ray.train.torch, raypod.api, raypod.worker.trainer, raypod.bench.anchors.mlp_common")
"""What the MLP suites' systems import."""


def warm_page_cache(modules: str = MLP_STACK) -> None:
    """Import every system's stack once, untimed, so the first trial does not pay a cold disk."""
    subprocess.run([sys.executable, "-c", f"import {modules}"], cwd=REPO, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False, timeout=300)


# ---- the skeleton: a log, a session, a trial, the interleaved loop -----------------------
SCRUB = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_TRAIN_V2_ENABLED")
"""Variables a trial never inherits: it starts its own Ray, logs nowhere, picks its own mode."""


def logger(prefix: str) -> Callable[[str], None]:
    """A suite's progress line on stderr: ``<prefix> | <msg>``."""
    def log(msg: str) -> None:
        print(f"{prefix} | {msg}", file=sys.stderr, flush=True)
    return log


@dataclass
class Session:
    """A suite run: its logs folder, the raylets up at the start, when and under what load."""

    logs: Path
    stray: list[int] | None
    started: _dt.datetime = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc))
    load_before: tuple[float, float, float] = field(default_factory=os.getloadavg)

    @classmethod
    def open(cls, suite: str, note: Callable[[Path], str], log: Callable[[str], None],
             quiet_timeout_s: float | None) -> Session:
        """Make ``raypod-bench-<suite>-*``, log ``note(logs)``, then (unless ``quiet_timeout_s``
        is None) wait for no raylet to be up."""
        logs = Path(tempfile.mkdtemp(prefix=f"raypod-bench-{suite}-"))
        log(note(logs))
        stray = None if quiet_timeout_s is None else wait_no_raylets(quiet_timeout_s, log)
        return cls(logs, stray)

    @property
    def date(self) -> str:
        return self.started.isoformat(timespec="seconds")

    def machine(self, **extra: Any) -> dict[str, Any]:
        """The result's machine record (with ``other_raylets_at_start`` when it waited for them)."""
        if self.stray is not None:
            extra = {"other_raylets_at_start": self.stray, **extra}
        return machine(self.load_before, **extra)


@dataclass
class Trial:
    """One trial's tag, private folder (short: Ray socket paths live in it) and log file."""

    tag: str
    tmp: Path
    log_path: Path

    @classmethod
    def new(cls, prefix: str, log_path: Path, subdirs: Sequence[str] = ()) -> Trial:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        for d in subdirs:
            (tmp / d).mkdir()
        return cls(uuid.uuid4().hex[:12], tmp, log_path)

    def env(self, extra: Mapping[str, str] | None = None, scrub: Sequence[str] = SCRUB,
            ray_tmp: bool = True) -> dict[str, str]:
        """This process's environment less ``scrub``, plus ``extra``, the tag, unbuffered output,
        the repository on ``PYTHONPATH`` and (``ray_tmp``) the trial's folder as ``RAY_TMPDIR``."""
        env = {k: v for k, v in os.environ.items() if k not in scrub}
        env.update(extra or {}, PYTHONUNBUFFERED="1", **{TAG_VAR: self.tag})
        if ray_tmp:
            env["RAY_TMPDIR"] = str(self.tmp)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        return env

    def finish(self, rec: dict[str, Any], quiet_timeout_s: float,
               log: Callable[[str], None]) -> dict[str, Any]:
        """Drain the trial's processes into ``rec`` and remove its folder (kept, and named in
        ``rec["kept"]``, when ``RAYPOD_BENCH_KEEP`` is set: the job's driver.log and summary,
        Ray's worker logs); returns ``rec``."""
        rec.update(drain(self.tag, quiet_timeout_s, log))
        if os.environ.get("RAYPOD_BENCH_KEEP"):
            rec["kept"] = str(self.tmp)
            log(f"kept {self.tmp} (RAYPOD_BENCH_KEEP)")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return rec


@contextmanager
def launched(cmd: list[str], env: Mapping[str, str], log_path: Path
             ) -> Iterator[tuple[subprocess.Popen, float]]:
    """Start ``cmd`` in the repository, in its own session, output to ``log_path``; yields the
    process and ``time.time()`` taken just before it started; ends its process group on exit."""
    with open(log_path, "wb") as log:
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, env=dict(env), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc, t0
        finally:
            kill_group(proc)


def wait_rc(proc: subprocess.Popen, timeout_s: float) -> int | None:
    """The exit code, or None when the process still runs after ``timeout_s``."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None


def interleave(names: Sequence[str], trials: int, run_one: Callable[[str, int], dict[str, Any]],
               describe: Callable[[dict[str, Any]], str], log: Callable[[str], None], width: int = 12
               ) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Run every system once, then again, ``trials`` rounds; log ``describe(rec)`` per trial.

    Returns:
        The trials per system and the order they ran in (``<system>-<i>``).
    """
    by_system: dict[str, list[dict[str, Any]]] = {s: [] for s in names}
    order = []
    for i in range(1, trials + 1):
        for s in names:
            rec = run_one(s, i)
            by_system[s].append(rec)
            order.append(f"{s}-{i}")
            log(f"trial {i} {s:>{width}}: {describe(rec)}")
    return by_system, order


# ---- command lines -------------------------------------------------------------------------
RESULTS = "benchmarks/results"
"""Where the suites write ``<suite>.json`` and ``<suite>.md`` by default."""


def suite_parser(description: str, trials: int = 3) -> argparse.ArgumentParser:
    """A suite's ``python -m`` parser with its ``--trials`` and ``--out``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--trials", type=int, default=trials)
    p.add_argument("--out", default=RESULTS)
    return p


def one_trial_main(run: Callable[[], dict[str, Any]], trial_out: str,
                   figures: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """Run one in-process trial (``--trial-out``): raypod's decisions logged, the job summary
    written to ``trial_out``, its figures printed; exit 0 when the job succeeded."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("raypod").setLevel(logging.INFO)
    summary = run()
    Path(trial_out).write_text(json.dumps(summary, indent=2, default=str))
    print(json.dumps(figures(summary)))
    return 0 if summary.get("status") == "succeeded" else 1
