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
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from raypod.bench import table
from raypod.bench import trials as harness

LABELS = table.labels(ray_train_v2="Ray Train V2", torchrun="torchrun")
SYSTEMS = tuple(LABELS)
STEPS = 3
CORPUS = "~/.cache/raypod/data/stdlib_corpus.parquet"
TRIAL_TIMEOUT_S = 300.0
QUIET_TIMEOUT_S = 30.0
IDLE_BUSY_MAX = 0.25

COMMANDS = {
    "raypod": "python -m raypod.cli run jobs/configs/tiny.yaml --set train.max_steps=3 "
              "--set checkpoint.storage=<tmp> --set name=bench-startup-<i> --quiet",
    "ray_train_v2": "RAY_TRAIN_V2_ENABLED=1 python raypod/bench/anchors/ray_train_v2.py "
                    "--mark <file> --storage <tmp> --name bench-startup-ray-train-<i>",
    "torchrun": "python -m torch.distributed.run --standalone --nproc-per-node 2 "
                "raypod/bench/anchors/torchrun_gpt.py --mark <file>",
}


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


def _first_step_time(system: str, i: int, storage: Path, mark: Path) -> float:
    if system == "raypod":
        summary = json.loads((storage / f"bench-startup-{i}" / "summary.json").read_text())
        if summary.get("first_step_s") is None:
            raise RuntimeError(f"raypod summary has no first_step_s (status {summary.get('status')})")
        return float(summary["started_at"]) + float(summary["first_step_s"])
    return float(mark.read_text())


def run_trial(system: str, i: int, logs: Path) -> dict[str, Any]:
    """Launch ``system`` cold once; returns seconds from launch to first step and details."""
    trial = harness.Trial.new("rpb-", logs / f"{system}-{i}.log", ("storage",))
    storage = trial.tmp / "storage"
    mark = trial.tmp / "first_step"
    cmd, extra = _command(system, i, storage, mark)
    env = trial.env(extra)
    rec: dict[str, Any] = {"system": system, "trial": i, "seconds": None}
    rec["cpu_busy_before"] = round(_wait_idle(), 2)
    with harness.launched(cmd, env, trial.log_path) as (proc, t0):
        rc = harness.wait_rc(proc, TRIAL_TIMEOUT_S)
        exit_s = time.time() - t0
    rec["exit_code"] = rc
    rec["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    rec["process_s"] = round(exit_s, 2)
    try:
        if rc is None:
            raise RuntimeError(f"timed out after {TRIAL_TIMEOUT_S:.0f}s")
        if rc != 0:
            raise RuntimeError(f"exit code {rc}")
        first = _first_step_time(system, i, storage, mark)
        rec["seconds"] = round(first - t0, 3)
        if system == "raypod":  # where it went: up to the Driver object, then to step 1
            summary = json.loads((storage / f"bench-startup-{i}" / "summary.json").read_text())
            rec["launch_to_driver_s"] = round(float(summary["started_at"]) - t0, 3)
            rec["driver_to_first_step_s"] = round(float(summary["first_step_s"]), 3)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["log_tail"] = harness.tail(trial.log_path)
    return trial.finish(rec, QUIET_TIMEOUT_S, _log)


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


def _rows(result: dict[str, Any]) -> list[list[str]]:
    n = result["trials_per_system"]
    rows = []
    for s in SYSTEMS:
        per = [_fmt(t["seconds"]) for t in result["trials"][s]]
        per += [""] * (n - len(per))
        r = result["ratios"].get(f"raypod/{s}")
        ratio = "1.00" if s == "raypod" else ("n/a" if r is None else f"{r:.2f}")
        rows.append([LABELS[s], *per, _fmt(result["median_s"][s]), ratio])
    return rows


def _header(n: int) -> list[str]:
    return ["system", *[f"trial {k + 1} (s)" for k in range(n)], "median (s)", "raypod / system"]


def markdown_table(result: dict[str, Any]) -> str:
    return table.markdown_table(_header(result["trials_per_system"]), _rows(result))


def _contention_line(result: dict[str, Any]) -> str:
    busy = [t["cpu_busy_before"] for ts in result["trials"].values() for t in ts]
    load = [t["loadavg_1m_after"] for ts in result["trials"].values() for t in ts]
    return (f"Other programs on the machine: CPUs {min(busy):.0%}-{max(busy):.0%} busy in the second "
            f"before each launch; 1-minute load average {min(load):.1f}-{max(load):.1f} after the trials "
            f"({result['machine']['nproc']} CPUs).")


def print_table(result: dict[str, Any]) -> None:
    table.print_table("startup: launch to first optimizer step (tiny.yaml, 2 CPU ranks)",
                      _header(result["trials_per_system"]), _rows(result), lambda k: k != 0,
                      width=None if sys.stdout.isatty() else 120)


def run(trials: int = 3, out: str | os.PathLike = "benchmarks/results") -> dict[str, Any]:
    """Run the suite: ``trials`` interleaved trials per system; write JSON and Markdown to ``out``."""
    if trials < 1:
        raise ValueError("trials must be at least 1")
    _ensure_corpus()
    harness.warm_page_cache(GPT_STACK)
    session = harness.Session.open("startup", lambda logs: f"{trials} trial(s) per system, interleaved; "
                                                   f"subprocess logs in {logs}", _log, QUIET_TIMEOUT_S)

    def describe(rec: dict[str, Any]) -> str:
        what = f"{rec['seconds']:.2f}s" if rec["seconds"] is not None else f"FAILED ({rec['error']})"
        return f"{what} to first step (process ran {rec['process_s']:.1f}s, drained in {rec['drain_s']:.1f}s)"

    by_system, order = harness.interleave(SYSTEMS, trials, lambda s, i: run_trial(s, i, session.logs),
                                          describe, _log)
    medians = {s: table.median(t["seconds"] for t in by_system[s] if t["seconds"] is not None)
               for s in SYSTEMS}
    result: dict[str, Any] = {
        "suite": "startup",
        "metric": "seconds from time.time() just before subprocess.Popen to the first optimizer "
                  "step (raypod: summary started_at + first_step_s, all ranks' step-1 results at "
                  "the driver; anchors: rank 0 right after optimizer.step())",
        "date": session.date,
        "machine": session.machine(),
        "command": "raypod bench startup --trials " + str(trials),
        "system_commands": COMMANDS,
        "workload": "jobs/configs/tiny.yaml model: GPT n_layer 2, n_head 4, n_embd 128, seq_len 128, "
                    "vocab 256; global batch 16, micro batch 8; 2 ranks; FSDP2 per block + root; "
                    f"gloo; AdamW lr 3e-3; {STEPS} steps",
        "trials_per_system": trials,
        "order": order,
        "trials": by_system,
        "median_s": medians,
        "ratios": table.ratios_vs(medians, "raypod", SYSTEMS),
    }
    print_table(result)
    table.write_results(result, out, "startup", markdown(result), _log)
    return result


def markdown(result: dict[str, Any]) -> str:
    """``startup.md``: the table and what loaded the machine."""
    return "\n".join([
        "# startup: launch to first optimizer step",
        "",
        f"{table.machine_line(result['date'], result['machine'])}.",
        f"Command: `{result['command']}`. Trials interleaved in the order "
        f"{', '.join(SYSTEMS)}, ...; each launched cold as a subprocess.",
        "",
        markdown_table(result),
        "",
        _contention_line(result),
        "",
        "Seconds from just before `subprocess.Popen` to the first optimizer step; "
        "the ratio is raypod's median over the system's median (below 1: raypod is faster).",
        "",
    ])
