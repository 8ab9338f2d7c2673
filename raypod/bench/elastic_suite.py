"""The ``elastic`` suite: grow as nodes arrive, shrink when one goes — raypod beside Ray Train V2.

Both systems train ``jobs/configs/tiny.yaml``'s GPT (2 layers, 4 heads, 128 wide,
sequence 128; FSDP2 on gloo, 1 CPU per rank, global batch 16 at every world size, LR
schedule on the global step) for the same number of steps, each on its own fresh
:class:`raypod.bench.fake_cluster.FakeAutoscalingCluster` (Ray's fake multi-node
autoscaler: CPU-less head, 1-CPU worker nodes, one at the start, up to three), with
min 1 and max 3 workers, in the same scenario: start on what exists, let the autoscaler
add nodes, and once ``STEPS_AT_MAX`` steps ran at three workers terminate the node of
the highest rank (its raylet and every process on it, at once).

* ``raypod``: ``python -m raypod.bench.elastic --trial-out <tmp>/trial.json --set
  train.max_steps=<steps> --steps-at-max <k>`` (grows at a step boundary with the new
  ranks' state resharded in memory from live peers; shrinks in place).
* ``ray_train_v2``: ``RAY_TRAIN_V2_ENABLED=1 python -m
  raypod.bench.anchors.elastic_ray_train --trial-out <tmp>/trial.json --steps <steps>
  --steps-at-max <k>`` (``TorchTrainer``, ``ScalingConfig(num_workers=(1, 3))``,
  ``elastic_resize_monitor_interval_s`` at Ray's default 60 s, ``FailureConfig(
  max_failures=3)``, DCP checkpoint every 20 steps, as tiny.yaml's
  ``checkpoint.every_steps``). Ray Train resizes by restarting the whole group from the
  last checkpoint, at most once per monitor interval.
* ``ray_train_v2_5s``: the same with ``elastic_resize_monitor_interval_s=5``.

Figures:

* **node to step** (s): for each worker node that came up after the job started, from
  the harness first seeing it alive to the first step completed with a rank on it.
  raypod: driver clock (``figures`` of :mod:`raypod.bench.elastic`); Ray Train: unix
  clock, the step log's first line of an attempt whose group has a rank on that node.
* **shrink gap** (s): from the completion of the last step before the node loss to the
  completion of the first step after it (raypod: the failure event's ``resumed_s -
  last_step_s``; Ray Train: the step log around the termination time).
* **replayed**: step numbers completed more than once over the run (raypod: the sum of
  its events' ``lost_steps``; Ray Train: from the step log).

Trials run interleaved (raypod, ray_train_v2, ray_train_v2_5s, raypod, ...), each in its
own process with a timeout and an environment tag; after each, every tagged process is
waited for (killed by pid if it lingers) and ``pgrep -f rpfake-`` must come back empty.

    raypod bench elastic --trials 1
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from raypod.bench import table
from raypod.bench import trials as harness

LABELS = table.labels(ray_train_v2="Ray Train V2 elastic (monitor 60 s, default)",
                      ray_train_v2_5s="Ray Train V2 elastic (monitor 5 s)")
SYSTEMS = tuple(LABELS)
STEPS = 200
STEPS_AT_MAX = 10
TRIAL_TIMEOUT_S = 900.0
QUIET_TIMEOUT_S = 30.0

_log = harness.logger("bench elastic")


def _command(system: str, out: Path, steps: int, steps_at_max: int) -> tuple[list[str], dict[str, str]]:
    py = sys.executable
    if system == "raypod":
        return [py, "-m", "raypod.bench.elastic", "--trial-out", str(out), "--steps-at-max", str(steps_at_max),
                "--set", f"train.max_steps={steps}"], {}
    interval = {"ray_train_v2": "60", "ray_train_v2_5s": "5"}[system]
    return [py, "-m", "raypod.bench.anchors.elastic_ray_train", "--trial-out", str(out), "--steps", str(steps),
            "--steps-at-max", str(steps_at_max), "--monitor-interval-s", interval], {"RAY_TRAIN_V2_ENABLED": "1"}


def _shown(system: str, steps: int, steps_at_max: int) -> str:
    """The trial's command line as a reader would type it."""
    cmd, env = _command(system, Path("<tmp>/trial.json"), steps, steps_at_max)
    return " ".join([*(f"{k}={v}" for k, v in env.items()), "python", *cmd[1:]])


def median_step_s(rows: list[tuple]) -> float | None:
    """Median seconds between consecutive steps (``step, time, world_size[, attempt]`` rows) of the
    same world size (and attempt), i.e. the step time outside resizes and restarts."""
    d = [b[1] - a[1] for a, b in zip(rows, rows[1:], strict=False)
         if b[0] == a[0] + 1 and b[2] == a[2] and tuple(a[3:]) == tuple(b[3:])]
    return round(statistics.median(d), 3) if d else None


def raypod_record(summary: dict[str, Any], steps: int) -> dict[str, Any]:
    """The suite's figures from raypod's trial summary."""
    from raypod.bench.elastic import figures

    f = figures(summary)
    events = summary.get("events") or []
    return {"node_to_step_s": f["node_to_step_s"], "shrink_gap_s": f["shrink_gap_s"],
            "replayed": sum(int(e.get("lost_steps") or 0) for e in events),
            "world_sizes": f["world_sizes"], "resizes": [list(r) for r in f["resizes"]],
            "samples": f["samples"], "terminated": (summary.get("elastic") or {}).get("terminated"),
            "final_step": summary.get("final_step"),
            "step_s": median_step_s([tuple(r) for r in (summary.get("elastic") or {}).get("steps", [])]),
            "succeeded": summary.get("status") == "succeeded" and summary.get("final_step") == steps}


def anchor_record(rec: dict[str, Any]) -> dict[str, Any]:
    """The suite's figures from the anchor's trial record."""
    f = rec["figures"]
    return {"node_to_step_s": f["node_to_step_s"], "shrink_gap_s": f["shrink_gap_s"],
            "replayed": f["replayed"], "world_sizes": f["world_sizes"],
            "resizes": [list(r) for r in f["resizes"]], "nodes_never_used": f["nodes_never_used"],
            "shrink": f["shrink"], "terminated": rec.get("terminated"), "final_step": f["final_step"],
            "attempts": f["attempts"], "error": rec.get("error"), "succeeded": bool(rec.get("succeeded")),
            "step_s": median_step_s([tuple(r) for r in rec.get("step_log", [])])}


def _rpfake() -> list[int]:
    r = subprocess.run(["pgrep", "-f", "rpfake-"], capture_output=True, text=True)
    return [int(x) for x in r.stdout.split()]


def run_trial(system: str, i: int, logs: Path, steps: int, steps_at_max: int) -> dict[str, Any]:
    trial = harness.Trial.new("rpes-", logs / f"{system}-{i}.log")
    out = trial.tmp / "trial.json"
    cmd, extra = _command(system, out, steps, steps_at_max)
    env = trial.env(extra, ("RAY_ADDRESS", "RAY_TRAIN_V2_ENABLED"), ray_tmp=False)
    env.setdefault("RAY_AUTH_MODE", "token")
    rec: dict[str, Any] = {"system": system, "trial": i, "node_to_step_s": [], "shrink_gap_s": [],
                           "replayed": None, "succeeded": False}
    with harness.launched(cmd, env, trial.log_path) as (proc, t0):
        rc = harness.wait_rc(proc, TRIAL_TIMEOUT_S)
        rec["process_s"] = round(time.time() - t0, 2)
    rec["exit_code"] = rc
    try:
        data = json.loads(out.read_text())
        rec.update(raypod_record(data, steps) if system == "raypod" else anchor_record(data))
    except (OSError, ValueError, KeyError) as e:
        rec["why"] = f"no trial record ({type(e).__name__}: {e})"
    if rc is None:
        rec["succeeded"] = False
        rec["why"] = f"timed out after {TRIAL_TIMEOUT_S:.0f}s"
    elif rc != 0 and "why" not in rec:
        rec["why"] = f"exit code {rc}" + (f": {rec['error'][:300]}" if rec.get("error") else "")
    if not rec.get("terminated") and "why" not in rec:
        rec["why"] = "the node was never terminated (the job did not run the steps at 3 workers)"
    if not rec["succeeded"] or rec.get("why"):
        rec["log_tail"] = harness.tail(trial.log_path, 3000)
    rec["log"] = str(trial.log_path)
    if out.exists():  # the raw trial record (summary / step log) stays beside the log
        raw = logs / f"{system}-{i}.trial.json"
        shutil.copy(out, raw)
        rec["raw"] = str(raw)
    trial.finish(rec, QUIET_TIMEOUT_S, _log)
    left = _rpfake()
    deadline = time.monotonic() + QUIET_TIMEOUT_S
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _rpfake()
    rec["rpfake_left"] = left
    return rec


# ---- summary and tables ------------------------------------------------------------
def summarise(by_system: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over all trials (node to step: over every grown node of every trial) and ratios."""
    medians: dict[str, dict[str, Any]] = {}
    for s, recs in by_system.items():
        medians[s] = {
            "node_to_step_s": table.median(x for r in recs for x in r.get("node_to_step_s") or []),
            "shrink_gap_s": table.median(x for r in recs for x in r.get("shrink_gap_s") or []),
            "replayed": table.median(r["replayed"] for r in recs if r.get("replayed") is not None),
            "step_s": table.median(r["step_s"] for r in recs if r.get("step_s") is not None),
            "succeeded": f"{sum(1 for r in recs if r.get('succeeded'))}/{len(recs)}",
        }
    ratios = {f"{k} raypod/{s}": table.ratio(medians.get("raypod", {}).get(k), medians[s][k])
              for s in by_system if s != "raypod" for k in ("node_to_step_s", "shrink_gap_s")}
    return {"median": medians, "ratios": ratios}


def _fmt_list(xs: list[float] | None) -> str:
    return ", ".join(f"{x:.2f}" for x in xs) if xs else "—"


def _fmt(x: Any) -> str:
    return table.fmt(x, ".2f" if isinstance(x, float) else None)


HEADER = ["system", "trial", "node to step (s)", "shrink gap (s)", "steps replayed", "median step (s)",
          "world sizes", "finished", "ratio raypod/this (node→step, gap)"]


def _rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for s, recs in result["trials"].items():
        for r in recs:
            ok = "yes" if r.get("succeeded") else f"NO ({(r.get('why') or r.get('error') or '?')[:70]})"
            rows.append([LABELS[s], str(r["trial"]), _fmt_list(r.get("node_to_step_s")),
                         _fmt_list(r.get("shrink_gap_s")), _fmt(r.get("replayed")), _fmt(r.get("step_s")),
                         "→".join(str(w) for w in r.get("world_sizes") or []) or "—", ok, ""])
    for s in result["trials"]:
        m = result["median"][s]
        if s == "raypod":
            ratio = "1.00, 1.00"
        else:
            a = result["ratios"].get(f"node_to_step_s raypod/{s}")
            b = result["ratios"].get(f"shrink_gap_s raypod/{s}")
            ratio = f"{_fmt(a)}, {_fmt(b)}"
        rows.append([f"**{LABELS[s]}**", "median", _fmt(m["node_to_step_s"]), _fmt(m["shrink_gap_s"]),
                     _fmt(m["replayed"]), _fmt(m["step_s"]), "", m["succeeded"], ratio])
    return rows


def markdown_table(result: dict[str, Any]) -> str:
    return table.markdown_table(HEADER, _rows(result), "|---|---|---:|---:|---:|---:|---|---|---|")


def print_table(result: dict[str, Any]) -> None:
    table.print_table(f"elastic: tiny GPT, min 1 max 3 workers on Ray's fake autoscaler, {result['steps']} "
                      f"steps, highest rank's node terminated after {result['steps_at_max']} steps at 3",
                      HEADER, _rows(result), lambda k: k in (2, 3, 4, 5), width=180)


DEFINITIONS = {
    "node_to_step_s": "per worker node that came up after the job started: seconds from the harness "
                      "first seeing it alive to the first step completed with a rank on it",
    "shrink_gap_s": "seconds from the completion of the last step before the node was terminated to "
                    "the completion of the first step after it",
    "replayed": "step numbers completed more than once over the run (raypod: sum of events' "
                "lost_steps; Ray Train: from rank 0's step log)",
    "step_s": "median seconds between consecutive steps at the same world size (and attempt)",
}


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run_elastic_bench(trials: int = 1, out: str | os.PathLike | None = "benchmarks/results",
                      steps: int = STEPS, steps_at_max: int = STEPS_AT_MAX,
                      systems: tuple[str, ...] = SYSTEMS) -> dict[str, Any]:
    """Run the suite: ``trials`` interleaved trials per system; write JSON and Markdown to ``out``."""
    if trials < 1:
        raise ValueError("trials must be at least 1")
    session = harness.Session.open("elastic", lambda logs: f"{trials} trial(s) per system, interleaved; "
                                                   f"subprocess logs in {logs}", _log, None)
    uptime_before = _uptime()

    def describe(rec: dict[str, Any]) -> str:
        done = "finished" if rec.get("succeeded") else "NOT finished: " + str(rec.get("why"))
        return (f"node to step {_fmt_list(rec.get('node_to_step_s'))} s, shrink gap "
                f"{_fmt_list(rec.get('shrink_gap_s'))} s, replayed {rec.get('replayed')}, world sizes "
                f"{rec.get('world_sizes')}, {done} (process {rec['process_s']:.0f}s)")

    by_system, order = harness.interleave(
        systems, trials, lambda s, i: run_trial(s, i, session.logs, steps, steps_at_max), describe, _log, width=0)
    result: dict[str, Any] = {
        "suite": "elastic",
        "definitions": DEFINITIONS,
        "date": session.date,
        "machine": session.machine(uptime_before=uptime_before, uptime_after=_uptime()),
        "command": f"raypod bench elastic --trials {trials}",
        "steps": steps, "steps_at_max": steps_at_max,
        "system_commands": {s: _shown(s, steps, steps_at_max) for s in systems},
        "workload": f"jobs/configs/tiny.yaml GPT (2 layers, 4 heads, 128 wide, seq 128), FSDP2 on gloo, 1 CPU "
                    f"per rank, global batch 16 at every world size, {steps} steps, min 1 max 3 workers on "
                    "Ray's fake autoscaler (CPU-less head, 1-CPU worker nodes, 1 at start, up to 3); the "
                    f"highest rank's node terminated after {steps_at_max} steps at 3 workers",
        "trials_per_system": trials,
        "order": order,
        "trials": by_system,
        **summarise(by_system),
    }
    print_table(result)
    table.write_results(result, out, "elastic", markdown(result), _log, default=str)
    return result


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    bad = [r for recs in result["trials"].values() for r in recs if not r.get("succeeded") or r.get("why")]
    md = [
        "# elastic: grow as nodes arrive, shrink when one goes",
        "",
        f"Date: {result['date']}. Machine: {m['platform']}, {m['nproc']} CPUs, Python {m['python']}, torch "
        f"{m['torch']}, Ray {m['ray']}; load (`uptime`) before: `{m['uptime_before']}`; after: "
        f"`{m['uptime_after']}` (a machine shared with other work).",
        f"Command: `{result['command']}`. Trials interleaved in the order {', '.join(result['trials'])}, ...; "
        "each a cold subprocess on its own fresh fake autoscaling cluster.",
        "",
        f"Workload: {result['workload']}.",
        "",
        markdown_table(result),
        "",
        f"- **node to step**: {result['definitions']['node_to_step_s']}; one figure per such node.",
        f"- **shrink gap**: {result['definitions']['shrink_gap_s']}.",
        f"- **steps replayed**: {result['definitions']['replayed']}.",
        f"- **median step**: {result['definitions']['step_s']}.",
        "- Ray Train V2 resizes a running group only when `elastic_resize_monitor_interval_s` (default 60 s) "
        "passed since the group started or was last considered, by stopping every worker and starting a "
        "group of the new size from the last checkpoint (every 20 steps); a lost node fails the group, "
        "which restarts at the size the cluster has. raypod adds ranks at a step boundary with state "
        "resharded in memory and shrinks in place.",
        "- The ratio is raypod's median over the system's (below 1: raypod is faster).",
        "",
        *(["Trials with a problem:", ""] + [
            f"- {LABELS[r['system']]} trial {r['trial']}: {r.get('why') or r.get('error')}" for r in bad] + [""]
          if bad else []),
        "Commands:",
        "",
        *[f"- {LABELS[s]}: `{c}`" for s, c in result["system_commands"].items()],
        "",
    ]
    return "\n".join(md)


run = run_elastic_bench
"""Entry point for ``raypod bench elastic`` (called with ``trials=`` and ``out=``)."""


def main(argv: list[str] | None = None) -> int:
    p = harness.suite_parser("raypod vs Ray Train V2 elastic mode: grow and shrink", trials=1)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--steps-at-max", type=int, default=STEPS_AT_MAX)
    p.add_argument("--systems", default=",".join(SYSTEMS))
    a = p.parse_args(argv)
    result = run_elastic_bench(a.trials, a.out, a.steps, a.steps_at_max, tuple(a.systems.split(",")))
    print(json.dumps({"median": result["median"], "ratios": result["ratios"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
