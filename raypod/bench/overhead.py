"""The ``overhead`` suite: steady-state step time of raypod beside torchrun and a plain loop.

Every system trains ``jobs/configs/mlp.yaml``'s workload: a 4-block MLP
(512→2048→GELU→512, 8.4 M parameters), FSDP2 ``fully_shard`` per block then the root
on gloo, 2 CPU ranks, global batch 32 (16 per rank, one micro-batch), AdamW lr 1e-3,
the same seeded sample order; nothing else (no persistent checkpoint inside the
measured window, MLflow off):

* ``raypod``: raypod with its defaults: in-memory snapshots of every rank's shard,
  replicated to the peer rank, at the ``auto`` cadence (every step while that costs at
  most 1% of the step time, else every ``k`` steps; :mod:`raypod.driver.cadence`).
* ``raypod_every``: the same with a snapshot after every step (``checkpoint.memory_every_steps=1``).
* ``raypod_nosnap``: the same with ``checkpoint.memory_every_steps=0``, so the cost
  of the snapshot shows as the difference.
* ``torchrun``: :mod:`raypod.bench.anchors.mlp_steps` under ``python -m
  torch.distributed.run --standalone --nproc-per-node 2`` (the exact step code of the
  recovery anchors).
* ``torchrun_snapshot``: the same plus raypod's own snapshot code after every step
  (``snapshot.take`` and the ``PeerReplicator`` exchange), without Ray or the driver:
  the snapshot's cost on its own.
* ``single``: the same model unsharded in one plain process (no process group,
  2 torch threads, the batch as 2 micro-batches of 16), a floor for the work itself.

**Step time**: the wall time between consecutive step completions, over steps
``warmup``..``steps`` (the first ``warmup`` steps are excluded); the trial's figure is
the median of those intervals (the mean is reported too). A step completes when rank 0
returns from ``optimizer.step()`` (anchors) or when the driver holds every rank's
result of the step (raypod, an ``after_step`` callback; with 2 steps in flight the
ranks never wait for the driver, so in steady state the interval is the ranks' step
time plus whatever raypod adds to it).

Trials are interleaved (each system once, then again ...), each a cold subprocess
with its own ``RAY_TMPDIR`` and an environment tag; after each, every process it
started is waited for (killed by pid if it lingers) and the harness waits for no
raylet to be up (bounded), as in the other suites.

    python -m raypod.bench.overhead --trials 3 --steps 60
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raypod.bench.trials import TAG_VAR, drain, kill_group, tail, versions, wait_no_raylets

REPO = Path(__file__).resolve().parents[2]
ANCHORS = REPO / "raypod" / "bench" / "anchors"
TRIAL_TIMEOUT_S = 420.0
QUIET_TIMEOUT_S = 30.0
STEPS = 120
WARMUP = 15
MLP_WORKLOAD = ("jobs/configs/mlp.yaml: 4 x [Linear(512->2048), GELU, Linear(2048->512)] (8.4 M params), "
                "FSDP2 per block + root, gloo, 2 CPU ranks (1 torch thread each), global batch 32 "
                "(16 per rank) of random normal inputs, loss mean(out^2), AdamW lr 1e-3")


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


def _log(msg: str) -> None:
    print(f"bench | {msg}", file=sys.stderr, flush=True)


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


def run_trial(system: System, i: int, logs: Path, steps: int, warmup: int,
              quiet_timeout_s: float = QUIET_TIMEOUT_S) -> dict[str, Any]:
    """Run ``system`` once as a cold subprocess; returns its step-time figures."""
    tag = uuid.uuid4().hex[:12]
    tmp = Path(tempfile.mkdtemp(prefix="rpb-", dir="/tmp"))  # short: Ray socket paths
    (tmp / "storage").mkdir()
    log_path = logs / f"{system.name}-{i}.log"
    cmd, extra = command(system, steps, tmp, i)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_TRAIN_V2_ENABLED")}
    env.update(extra, RAY_TMPDIR=str(tmp), PYTHONUNBUFFERED="1", **{TAG_VAR: tag})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    rec: dict[str, Any] = {"system": system.name, "trial": i, "ok": False,
                           "loadavg_before": round(os.getloadavg()[0], 2)}
    with open(log_path, "wb") as log:
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=TRIAL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = None
        rec["process_s"] = round(time.time() - t0, 2)
        kill_group(proc)
    rec["exit_code"] = rc
    rec["loadavg_after"] = round(os.getloadavg()[0], 2)
    try:
        if rc != 0:
            raise RuntimeError(f"exit code {rc}" if rc is not None else f"timed out after {TRIAL_TIMEOUT_S:.0f}s")
        gaps = intervals(read_steps(tmp / "steps.log"), warmup, steps)
        rec.update(ok=True, median_ms=round(statistics.median(gaps) * 1e3, 2),
                   mean_ms=round(statistics.mean(gaps) * 1e3, 2),
                   p90_ms=round(sorted(gaps)[int(0.9 * (len(gaps) - 1))] * 1e3, 2),
                   intervals_ms=[round(g * 1e3, 2) for g in gaps])
        if system.kind == "raypod":
            summary_path = Path((tmp / "steps.log.summary").read_text().strip())
            summary = json.loads(summary_path.read_text())
            rec["raypod_status"] = summary.get("status")
            rec["memory_snapshots"] = summary.get("memory_snapshots")
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        rec["why"] = f"{type(e).__name__}: {e}"
        rec["log_tail"] = tail(log_path)
    rec["log"] = str(log_path)
    rec.update(drain(tag, quiet_timeout_s, _log))
    shutil.rmtree(tmp, ignore_errors=True)
    return rec


def warm_page_cache() -> None:
    """Import every system's stack once, untimed, so the first trial does not pay a cold disk."""
    code = ("import torch, torch.distributed.run, torch.distributed.fsdp, torch.distributed.checkpoint, "
            "ray, ray.train.torch, raypod.api, raypod.worker.trainer, raypod.bench.anchors.mlp_common")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False, timeout=300)


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
    warm_page_cache()
    logs = Path(tempfile.mkdtemp(prefix=f"raypod-bench-{suite}-"))
    _log(f"{suite}: {trials} trial(s) of {len(systems)} systems, interleaved, {steps} steps, "
         f"intervals after step {warmup}; subprocess logs in {logs}")
    stray = wait_no_raylets(quiet_timeout_s, _log)
    started = _dt.datetime.now(_dt.timezone.utc)
    load_before = os.getloadavg()
    by_system: dict[str, list[dict[str, Any]]] = {s.name: [] for s in systems}
    for i in range(1, trials + 1):
        for s in systems:
            rec = run_trial(s, i, logs, steps, warmup, quiet_timeout_s)
            by_system[s.name].append(rec)
            what = (f"median {rec['median_ms']:.1f} ms, mean {rec['mean_ms']:.1f} ms" if rec["ok"]
                    else f"FAILED ({rec.get('why')})")
            _log(f"trial {i} {s.name:>20}: {what} (ran {rec['process_s']:.0f}s, load "
                 f"{rec['loadavg_before']} -> {rec['loadavg_after']})")
    machine = {"date": started.isoformat(timespec="seconds"),
               "platform": platform.platform(), "nproc": os.cpu_count(), **versions(),
               "loadavg_before": [round(x, 2) for x in load_before],
               "loadavg_after": [round(x, 2) for x in os.getloadavg()],
               "other_raylets_at_start": stray, "logs": str(logs)}
    return by_system, machine


def medians(by_system: dict[str, list[dict[str, Any]]], key: str) -> dict[str, float | None]:
    """Per system, the median over its good trials of the trials' ``key``."""
    out: dict[str, float | None] = {}
    for s, recs in by_system.items():
        xs = [r[key] for r in recs if r["ok"]]
        out[s] = round(statistics.median(xs), 2) if xs else None
    return out


def paired_ratios(by_system: dict[str, list[dict[str, Any]]], base: str,
                  key: str = "median_ms") -> dict[str, list[float | None]]:
    """Per system, per trial round: its step time (``key``) over ``base``'s in the same round.

    Rounds run back to back, so a round's ratio compares systems under about the same
    load from other programs; the median over trials mixes rounds run under different loads.
    """
    out: dict[str, list[float | None]] = {}
    for s, recs in by_system.items():
        out[s] = [ratio(a[key], b[key]) if a["ok"] and b["ok"] else None
                  for a, b in zip(recs, by_system.get(base, []), strict=False)]
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def write_results(result: dict[str, Any], out: str | os.PathLike | None, suite: str,
                  md: Callable[[dict[str, Any]], str]) -> None:
    if out is None:
        return
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    slim = json.loads(json.dumps(result))
    (out_dir / f"{suite}.json").write_text(json.dumps(slim, indent=2) + "\n")
    (out_dir / f"{suite}.md").write_text(md(result))
    _log(f"wrote {out_dir / (suite + '.json')} and {out_dir / (suite + '.md')}")


# ---- the overhead suite --------------------------------------------------------------
SYSTEMS = [
    System("raypod", "raypod (defaults: snapshot cadence auto, 1% budget)", "raypod",
           ("checkpoint.every_steps=0",)),
    System("raypod_every", "raypod, snapshot + replica every step", "raypod",
           ("checkpoint.every_steps=0", "checkpoint.memory_every_steps=1")),
    System("raypod_nosnap", "raypod, snapshots off", "raypod",
           ("checkpoint.every_steps=0", "checkpoint.memory_every_steps=0")),
    System("torchrun", "torchrun", "torchrun"),
    System("torchrun_snapshot", "torchrun + raypod's snapshot code", "torchrun", ("--snapshot",)),
    System("single", "plain loop, 1 process, no FSDP", "single"),
]


def run_overhead_bench(trials: int = 3, steps: int = STEPS, warmup: int = WARMUP,
                       out: str | os.PathLike | None = "benchmarks/results",
                       systems: list[str] | None = None) -> dict[str, Any]:
    """Measure steady-state step time of every system; print and write the table.

    Args:
        trials: trials per system (interleaved).
        steps: steps per trial.
        warmup: steps excluded at the start.
        out: folder for ``overhead.json`` / ``overhead.md`` (None: write nothing).
        systems: run only these (names of :data:`SYSTEMS`).
    """
    chosen = [s for s in SYSTEMS if systems is None or s.name in systems]
    by_system, machine = run_interleaved(chosen, trials, steps, warmup, "overhead")
    med, mean = medians(by_system, "median_ms"), medians(by_system, "mean_ms")
    tr, snap_tr = med.get("torchrun"), med.get("torchrun_snapshot")
    rp, rp1, rp0 = mean.get("raypod"), mean.get("raypod_every"), mean.get("raypod_nosnap")
    tr, snap_tr = mean.get("torchrun"), mean.get("torchrun_snapshot")
    result: dict[str, Any] = {
        "suite": "overhead",
        "date": machine["date"],
        "machine": machine,
        "command": f"raypod bench overhead --trials {trials} (steps={steps}, warmup={warmup})",
        "workload": MLP_WORKLOAD,
        "definition": f"wall time between consecutive step completions over steps "
                      f"{warmup}..{steps}, per trial its median and its mean (the mean carries the "
                      "amortised cost of snapshots taken every k steps), then the median over trials; "
                      "ratios are of the means; anchors: rank 0 after optimizer.step(); raypod: the "
                      "driver holding every rank's result",
        "systems": {s.name: {"label": s.label, "kind": s.kind, "args": list(s.args)} for s in chosen},
        "trials": by_system,
        "median_step_ms": med,
        "mean_step_ms": mean,
        "ratios_vs_torchrun": {s: ratio(v, tr) for s, v in mean.items()},
        "paired_ratios_vs_torchrun": paired_ratios(by_system, "torchrun", "mean_ms"),
        "target": "raypod / torchrun <= 1.03",
        "breakdown_ms": {
            "snapshot_in_raypod": None if rp is None or rp0 is None else round(rp - rp0, 2),
            "snapshot_every_step_in_raypod": None if rp1 is None or rp0 is None else round(rp1 - rp0, 2),
            "snapshot_without_ray": None if snap_tr is None or tr is None else round(snap_tr - tr, 2),
            "ray_and_driver": None if rp0 is None or tr is None else round(rp0 - tr, 2),
        },
    }
    print_table(result)
    write_results(result, out, "overhead", markdown)
    return result


def table(result: dict[str, Any]) -> list[str]:
    trials = max(len(v) for v in result["trials"].values())
    head = "| system | " + " | ".join(f"trial {i} (ms)" for i in range(1, trials + 1)) + \
        " | median (ms) | mean (ms) | / torchrun |"
    rows = [head, "|---|" + "---:|" * (trials + 3)]
    for s, recs in result["trials"].items():
        cells = [_fmt(r["median_ms"]) if r["ok"] else "failed" for r in recs]
        rows.append(f"| {result['systems'][s]['label']} | " + " | ".join(cells) +
                    f" | {_fmt(result['median_step_ms'][s])} | {_fmt(result['mean_step_ms'][s])} | "
                    f"{_fmt(result['ratios_vs_torchrun'][s], '.3f')} |")
    return rows


def print_table(result: dict[str, Any]) -> None:
    print("\n".join(["", *table(result), ""]), file=sys.stderr)


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    b = r["breakdown_ms"]
    failed = [f"- {r['systems'][s]['label']} trial {t['trial']}: {t.get('why')}"
              for s, recs in r["trials"].items() for t in recs if not t["ok"]]
    return "\n".join([
        "# overhead: steady-state step time",
        "",
        f"Date: {r['date']}. Machine: {m['platform']}, {m['nproc']} CPUs, Python {m['python']}, "
        f"torch {m['torch']}, Ray {m['ray']}; load average (1 min) {m['loadavg_before'][0]} before, "
        f"{m['loadavg_after'][0]} after (per trial in the JSON).",
        f"Command: `{r['command']}`. Trials interleaved, each a cold subprocess.",
        "",
        f"Workload: {r['workload']}.",
        "",
        *table(r),
        "",
        "Per trial round, each system's mean over torchrun's in the same round (the rounds ran "
        "back to back, so these compare systems under about the same load; the load average before "
        "each round's torchrun trial is given):",
        "",
        "| system | " + " | ".join(f"round {i + 1} (load {t['loadavg_before']})"
                                  for i, t in enumerate(r["trials"].get("torchrun", []))) + " |",
        "|---|" + "---:|" * len(r["trials"].get("torchrun", [])),
        *[f"| {r['systems'][s]['label']} | " + " | ".join(_fmt(x, ".3f") for x in xs) + " |"
          for s, xs in r.get("paired_ratios_vs_torchrun", {}).items()],
        "",
        f"- **step time**: {r['definition']}.",
        f"- Target: {r['target']}.",
        f"- Breakdown (means): snapshots cost {_fmt(b['snapshot_in_raypod'])} ms a step in raypod at its "
        f"default cadence and {_fmt(b.get('snapshot_every_step_in_raypod'))} ms when taken every step "
        f"(minus snapshots off), {_fmt(b['snapshot_without_ray'])} ms every step with the same code "
        f"under torchrun; Ray and the driver add {_fmt(b['ray_and_driver'])} ms "
        "(raypod with snapshots off minus torchrun).",
        "",
        *(["Failed trials:", "", *failed, ""] if failed else []),
    ])


def run(trials: int = 3, out: str | os.PathLike | None = "benchmarks/results") -> dict[str, Any]:
    """Entry point for ``raypod bench overhead``."""
    return run_overhead_bench(trials=trials, out=out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="raypod vs torchrun vs a plain loop: steady-state step time")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--warmup", type=int, default=WARMUP)
    p.add_argument("--systems", default=None, help="comma-separated subset of " +
                   ",".join(s.name for s in SYSTEMS))
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    run_overhead_bench(trials=args.trials, steps=args.steps, warmup=args.warmup,
                       out=None if args.out == "-" else args.out,
                       systems=args.systems.split(",") if args.systems else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
