"""Process bookkeeping shared by the benchmark suites: tag a trial's processes, end them,
and wait until no Ray cluster is up before the next trial starts."""

from __future__ import annotations

import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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

    Then wait (bounded) for ``pgrep -f raylet`` to be empty, so the next trial starts
    with no Ray cluster up, ours or anyone's.
    """
    t0 = time.monotonic()
    killed: list[int] = []
    while True:
        left = tagged_pids(tag)
        if not left:
            break
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
    return {"drain_s": round(drain_s, 2), "killed_stragglers": killed,
            "other_raylets_after": wait_no_raylets(quiet_timeout_s, log)}


def tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def versions() -> dict[str, str]:
    import ray
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__}


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


def warm_page_cache() -> None:
    """Import every system's stack once, untimed, so the first trial does not pay a cold disk."""
    code = ("import torch, torch.distributed.run, torch.distributed.fsdp, torch.distributed.checkpoint, "
            "ray, ray.train.torch, raypod.api, raypod.worker.trainer, raypod.bench.anchors.mlp_common")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False, timeout=300)
