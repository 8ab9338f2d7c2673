"""The step-time trials the ``overhead``, ``checkpoint`` and ``gpu`` suites share.

A :class:`System` is one way of running a workload (raypod with some overrides, an
anchor under torchrun, Ray Train or one plain process); :func:`run_interleaved` runs
each system ``trials`` times as cold subprocesses, interleaved, and a trial's figures
are the wall times between consecutive step completions after ``warmup`` steps
(:func:`intervals`): their median, mean and p90. A step completes when rank 0 returns
from ``optimizer.step()`` (anchors) or when the driver holds every rank's result of
the step (raypod, an ``after_step`` callback of ``anchors/raypod_steps.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raypod.bench import table
from raypod.bench import trials as harness

ANCHORS = harness.REPO / "raypod" / "bench" / "anchors"
TRIAL_TIMEOUT_S = 420.0
QUIET_TIMEOUT_S = 30.0
MLP_WORKLOAD = ("jobs/configs/mlp.yaml: 4 x [Linear(512->2048), GELU, Linear(2048->512)] (8.4 M params), "
                "FSDP2 per block + root, gloo, 2 CPU ranks (1 torch thread each), global batch 32 "
                "(16 per rank) of random normal inputs, loss mean(out^2), AdamW lr 1e-3")

_log = harness.logger("bench")


@dataclass(frozen=True)
class System:
    """One way of running the workload: a label and how to launch it."""

    name: str
    label: str
    kind: str
    """``raypod`` (``anchors/raypod_steps.py``), ``torchrun`` or ``single``
    (``anchors/mlp_steps.py``), ``ray_train`` (``anchors/mlp_ray_train_steps.py``),
    ``plain`` (``anchors/plain_steps.py``: the config's recipe in one plain process)."""
    args: tuple[str, ...] = ()
    """raypod and plain: ``--set`` overrides; anchors: extra arguments (``<tmp>`` is the trial's folder)."""
    env: dict[str, str] = field(default_factory=dict)
    config: str = "jobs/configs/mlp.yaml"
    """The job config (``raypod`` and ``plain``)."""


def command(system: System, steps: int, tmp: Path, i: int) -> tuple[list[str], dict[str, str]]:
    """The argv and extra environment of one trial of ``system``."""
    py = sys.executable
    log = str(tmp / "steps.log")
    extra = [a.replace("<tmp>", str(tmp)) for a in system.args]
    env = dict(system.env)
    if system.kind in ("raypod", "plain"):
        script = "raypod_steps.py" if system.kind == "raypod" else "plain_steps.py"
        cmd = [py, str(ANCHORS / script), system.config, "--log", log,
               "--set", f"train.max_steps={steps}", "--set", f"checkpoint.storage={tmp / 'storage'}",
               "--set", f"name=bench-{system.name}-{i}"]
        for a in extra:
            cmd += ["--set", a]
    elif system.kind == "torchrun":
        cmd = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ANCHORS / "mlp_steps.py"), "--steps", str(steps), "--step-log", log, *extra]
    elif system.kind == "single":
        cmd = [py, str(ANCHORS / "mlp_steps.py"), "--single", "--steps", str(steps), "--step-log", log,
               *extra]
    elif system.kind == "ray_train":
        cmd = [py, str(ANCHORS / "mlp_ray_train_steps.py"), "--steps", str(steps), "--step-log", log,
               "--storage", str(tmp / "storage"), "--name", f"bench-{system.name}-{i}", *extra]
        env["RAY_TRAIN_V2_ENABLED"] = "1"
    else:
        raise ValueError(f"unknown system kind '{system.kind}'")
    return cmd, env


def read_steps(path: str | os.PathLike) -> dict[int, float]:
    """``step -> unix time`` from a ``step,unix_time`` log."""
    out: dict[int, float] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            s, t = line.split(",")
            out.setdefault(int(s), float(t))
    return out


def intervals(times: dict[int, float], warmup: int, last: int) -> list[float]:
    """Seconds between completions of steps ``k`` and ``k + 1`` for ``warmup <= k < last``."""
    missing = [s for s in range(warmup, last + 1) if s not in times]
    if missing:
        raise RuntimeError(f"steps {missing[:5]}... never completed (last step {max(times, default=0)})")
    return [times[k + 1] - times[k] for k in range(warmup, last)]


def step_figures(gaps: list[float]) -> dict[str, Any]:
    """A trial's figures from its step intervals (seconds)."""
    return {"median_ms": round(statistics.median(gaps) * 1e3, 2),
            "mean_ms": round(statistics.mean(gaps) * 1e3, 2),
            "p90_ms": round(sorted(gaps)[int(0.9 * (len(gaps) - 1))] * 1e3, 2),
            "intervals_ms": [round(g * 1e3, 2) for g in gaps]}


def run_trial(system: System, i: int, logs: Path, steps: int, warmup: int,
              quiet_timeout_s: float = QUIET_TIMEOUT_S) -> dict[str, Any]:
    """Run ``system`` once as a cold subprocess; returns its step-time figures."""
    trial = harness.Trial.new("rpb-", logs / f"{system.name}-{i}.log", ("storage",))
    cmd, extra = command(system, steps, trial.tmp, i)
    env = trial.env(extra)
    rec: dict[str, Any] = {"system": system.name, "trial": i, "ok": False,
                           "loadavg_before": round(os.getloadavg()[0], 2)}
    with harness.launched(cmd, env, trial.log_path) as (proc, t0):
        rc = harness.wait_rc(proc, TRIAL_TIMEOUT_S)
        rec["process_s"] = round(time.time() - t0, 2)
    rec["exit_code"] = rc
    rec["loadavg_after"] = round(os.getloadavg()[0], 2)
    try:
        if rc != 0:
            raise RuntimeError(f"exit code {rc}" if rc is not None
                               else f"timed out after {TRIAL_TIMEOUT_S:.0f}s")
        rec.update(ok=True, **step_figures(intervals(read_steps(trial.tmp / "steps.log"), warmup, steps)))
        if system.kind == "raypod":
            summary_path = Path((trial.tmp / "steps.log.summary").read_text().strip())
            summary = json.loads(summary_path.read_text())
            rec["raypod_status"] = summary.get("status")
            rec["memory_snapshots"] = summary.get("memory_snapshots")
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        rec["why"] = f"{type(e).__name__}: {e}"
        rec["log_tail"] = harness.tail(trial.log_path)
    rec["log"] = str(trial.log_path)
    return trial.finish(rec, quiet_timeout_s, _log)


def run_interleaved(systems: list[System], trials: int, steps: int, warmup: int, suite: str,
                    quiet_timeout_s: float = QUIET_TIMEOUT_S
                    ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Run every system ``trials`` times, interleaved; returns the trials and the machine record.

    After each trial the harness waits up to ``quiet_timeout_s`` for no raylet to be up
    (other programs' clusters included).
    """
    if trials < 1:
        raise ValueError("trials must be at least 1")
    if not 1 <= warmup < steps:
        raise ValueError("need 1 <= warmup < steps")
    harness.warm_page_cache()
    session = harness.Session.open(
        suite, lambda logs: f"{suite}: {trials} trial(s) of {len(systems)} systems, interleaved, {steps} steps, "
                            f"intervals after step {warmup}; subprocess logs in {logs}", _log, quiet_timeout_s)
    by_name = {s.name: s for s in systems}

    def describe(rec: dict[str, Any]) -> str:
        what = (f"median {rec['median_ms']:.1f} ms, mean {rec['mean_ms']:.1f} ms" if rec["ok"]
                else f"FAILED ({rec.get('why')})")
        return f"{what} (ran {rec['process_s']:.0f}s, load {rec['loadavg_before']} -> {rec['loadavg_after']})"

    def one(s: str, i: int) -> dict[str, Any]:
        return run_trial(by_name[s], i, session.logs, steps, warmup, quiet_timeout_s)

    by_system, _ = harness.interleave(list(by_name), trials, one, describe, _log, width=20)
    return by_system, {"date": session.date, **session.machine(logs=str(session.logs))}


def medians(by_system: dict[str, list[dict[str, Any]]], key: str) -> dict[str, float | None]:
    """Per system, the median over its good trials of the trials' ``key``."""
    return {s: table.median((r[key] for r in recs if r["ok"]), 2) for s, recs in by_system.items()}


def paired_ratios(by_system: dict[str, list[dict[str, Any]]], base: str,
                  key: str = "median_ms") -> dict[str, list[float | None]]:
    """Per system, per trial round: its step time (``key``) over ``base``'s in the same round.

    Rounds run back to back, so a round's ratio compares systems under about the same
    load from other programs; the median over trials mixes rounds run under different loads.
    """
    out: dict[str, list[float | None]] = {}
    for s, recs in by_system.items():
        out[s] = [table.ratio(a[key], b[key]) if a["ok"] and b["ok"] else None
                  for a, b in zip(recs, by_system.get(base, []), strict=False)]
    return out


def ms(x: float | None, spec: str = ".1f") -> str:
    """A milliseconds cell (``—`` when missing)."""
    return table.fmt(x, spec)


def systems_record(chosen: list[System]) -> dict[str, dict[str, Any]]:
    """The result's ``systems``: label, kind and arguments of each system run."""
    return {s.name: {"label": s.label, "kind": s.kind, "args": list(s.args)} for s in chosen}


def failed_md(r: dict[str, Any]) -> list[str]:
    """The ``Failed trials:`` section of a step-time page (nothing when none failed)."""
    return table.problems_md("Failed trials:", [f"{r['systems'][s]['label']} trial {t['trial']}: {t.get('why')}"
                                                 for s, recs in r["trials"].items() for t in recs if not t["ok"]])


def page_md(title: str, r: dict[str, Any], rows: list[str], notes: list[str]) -> str:
    """A step-time results page: title, machine and load, command, workload, the table, ``notes``
    (which end with a blank line) and the failed trials."""
    m = r["machine"]
    return "\n".join([
        f"# {title}",
        "",
        f"{table.machine_line(r['date'], m)}; load average (1 min) {m['loadavg_before'][0]} before, "
        f"{m['loadavg_after'][0]} after (per trial in the JSON).",
        f"Command: `{r['command']}`. Trials interleaved, each a cold subprocess.",
        "",
        f"Workload: {r['workload']}.",
        "",
        *rows,
        "",
        *notes,
        *failed_md(r),
    ])


def write_results(result: dict[str, Any], out: str | os.PathLike | None, suite: str,
                  md: Callable[[dict[str, Any]], str]) -> None:
    """Write ``<out>/<suite>.json`` and ``md(result)`` as ``<suite>.md`` (nothing when ``out`` is None)."""
    table.write_results(result, out, suite, md(result) if out is not None else "", _log)


def parser(description: str, trials: int, steps: int, warmup: int,
           systems: list[str] | None = None) -> argparse.ArgumentParser:
    """A step-time suite's ``python -m`` parser: ``--trials``, ``--out``, ``--steps``, ``--warmup``
    and, given the suite's system names, ``--systems``."""
    p = harness.suite_parser(description, trials)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--warmup", type=int, default=warmup)
    if systems is not None:
        p.add_argument("--systems", default=None, help="comma-separated subset of " + ",".join(systems))
    return p


def named_systems(arg: str | None) -> list[str] | None:
    """The names a ``--systems`` value lists (None: the suite's default)."""
    return arg.split(",") if arg else None


def print_rows(rows: list[str]) -> None:
    """A step-time table on stderr, between blank lines."""
    print("\n".join(["", *rows, ""]), file=sys.stderr)
