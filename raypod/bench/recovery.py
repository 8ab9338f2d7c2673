"""The ``recovery`` suite: one worker killed mid-run, raypod beside Ray Train V2 and torchrun.

Every system trains ``jobs/configs/mlp.yaml``'s workload (issue 5): a 4-block MLP
(512→2048→GELU→512), FSDP2 per block + root on gloo, 2 CPU ranks, global batch 32 of
random normal inputs, loss = mean squared output, AdamW lr 1e-3, 60 steps,
persistent checkpoints every 10 steps. Rank 1 dies (``os._exit``) once, right after
step 25 completed, i.e. at the start of step 26:

* ``raypod``: ``python -m raypod.cli run jobs/configs/mlp.yaml --quiet --set
  checkpoint.storage=<tmp> --set name=rec-<i> --set 'fault.inject=[{step: 26, rank: 1,
  kind: kill}]'`` (an injected kill fires when the rank *starts* that step).
* ``ray_train_v2``: :mod:`raypod.bench.anchors.mlp_ray_train` (``TorchTrainer``,
  ``FailureConfig(max_failures=2)``, DCP shards reported with ``ray.train.report``).
* ``torchrun``: :mod:`raypod.bench.anchors.mlp_torchrun` under ``python -m
  torch.distributed.run --standalone --nproc-per-node 2 --max-restarts 2`` (DCP).

Definitions, applied identically to the three systems:

* **gap** (recovery gap): wall seconds from the completion of the last step completed
  before the kill (step 25) to the completion of the first step completed after it,
  whichever step number that is. raypod: ``events[0].resumed_s -
  events[0].last_step_s`` of ``summary.json`` (both on the driver's clock, when the
  driver held every rank's result of the step). Anchors: from rank 0's step log
  (``step,unix_time,attempt``, written right after ``optimizer.step()``): the time of
  the first line of the next attempt minus the time of the last line of the killed one.
* **replayed** (steps replayed): the number of step numbers whose work the failure
  threw away and that had to be run again = (step numbers completed before the kill
  and completed again after it) + 1 for the interrupted step (step 26, started by the
  surviving rank but never completed). raypod: ``events[0].lost_steps + 1``
  (``lost_steps`` = steps completed before the failure that the restore rolled back).
  Anchors: the number of step numbers that appear more than once in the step log,
  + 1. A restore from the checkpoint of step 20 replays 21..26 = 6; a restore of the
  state after step 25 replays only step 26 = 1.
* **recovered**: the run exited 0 and its last completed step is 60 (raypod:
  ``status == "succeeded"`` and ``final_step == 60``), after the kill fired.

torchrun as shipped shares its rendezvous ``TCPStore`` with the workers' process groups
(torch 2.13), and a restarted group can read the dead group's gloo addresses from it:
``connectFullMesh`` then fails or hangs ("Connection refused" to the old port; see
pytorch/pytorch#135712). That is what a torchrun user gets, so it is measured as is;
``torchrun_fresh_store=True`` (``--torchrun-fresh-store``) sets torch's own workaround,
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, to measure torchrun's recovery without it.

Trials run interleaved (raypod, ray_train_v2, torchrun, raypod, ...), each as a cold
subprocess with a timeout, its own ``RAY_TMPDIR`` (so a ``ray.init()`` never joins a
cluster that some other program recorded) and an environment tag; after each trial
every tagged process is waited for (and killed by pid if it lingers) and the harness
waits for ``pgrep -f raylet`` to come back empty before the next one.

    python -m raypod.bench.recovery --trials 3 --out benchmarks/results
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from raypod.bench import table
from raypod.bench import trials as harness
from raypod.bench.table import fmt

LABELS = table.labels(ray_train_v2="Ray Train V2 TorchTrainer", torchrun="torchrun --max-restarts 2")
SYSTEMS = tuple(LABELS)
MAX_STEPS = 60
KILL_AFTER = 25
"""Rank 1 dies right after completing this step (raypod: ``inject`` at step 26)."""
TRIAL_TIMEOUT_S = 300.0
QUIET_TIMEOUT_S = 60.0

COMMANDS = {
    "raypod": "python -m raypod.cli run jobs/configs/mlp.yaml --quiet --set checkpoint.storage=<tmp> "
              f"--set name=rec-<i> --set checkpoint.memory_every_steps=1 "
              f"--set 'fault.inject=[{{step: {KILL_AFTER + 1}, rank: 1, kind: kill}}]'",
    "ray_train_v2": "RAY_TRAIN_V2_ENABLED=1 python raypod/bench/anchors/mlp_ray_train.py "
                    "--workdir <tmp>/work --storage <tmp>/storage --name rec-ray-train-<i>",
    "torchrun": "python -m torch.distributed.run --standalone --nproc-per-node 2 --max-restarts 2 "
                "raypod/bench/anchors/mlp_torchrun.py --workdir <tmp>/work",
}


_log = harness.logger("bench recovery")


# ---- figures -----------------------------------------------------------------------
def read_step_log(path: str | os.PathLike) -> list[tuple[int, float, int]]:
    """``(step, unix_time, attempt)`` per line of an anchor's step log, in file order."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            step, t, attempt = line.split(",")
            rows.append((int(step), float(t), int(attempt)))
    return rows


def anchor_figures(rows: list[tuple[int, float, int]], exit_code: int | None) -> dict[str, Any]:
    """Gap, steps replayed and recovered, from an anchor's step log (see the module doc)."""
    if not rows:
        raise RuntimeError("the step log is empty")
    first_attempt = rows[0][2]
    before = [r for r in rows if r[2] == first_attempt]
    after = [r for r in rows if r[2] != first_attempt]
    final_step = max(r[0] for r in rows)
    out: dict[str, Any] = {
        "last_step_before": before[-1][0],
        "first_step_after": after[0][0] if after else None,
        "restored_from": f"checkpoint step {after[0][0] - 1}" if after else None,
        "attempts": len({r[2] for r in rows}),
        "final_step": final_step,
        "gap_s": round(after[0][1] - before[-1][1], 3) if after else None,
        "replayed": (sum(1 for c in Counter(r[0] for r in rows).values() if c > 1) + 1) if after else None,
        "recovered": bool(after) and exit_code == 0 and final_step == MAX_STEPS,
    }
    if not after:
        out["why"] = f"no step completed after the kill (last step {before[-1][0]})"
    return out


def raypod_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """Gap, steps replayed and recovered, from raypod's ``summary.json`` (see the module doc)."""
    events = summary.get("events") or []
    ok = summary.get("status") == "succeeded" and summary.get("final_step") == MAX_STEPS
    out: dict[str, Any] = {"final_step": summary.get("final_step"), "status": summary.get("status"),
                           "failures": summary.get("failures"), "gap_s": None, "replayed": None,
                           "recovered": False}
    if not events:
        out["why"] = "summary.json has no failure event (the kill did not fire)"
        return out
    ev = events[0]
    out.update(event_step=ev.get("step"), restored_from=ev.get("restored_from"),
               lost_steps=ev.get("lost_steps"))
    if ev.get("resumed_s") is not None and ev.get("last_step_s") is not None:
        out["gap_s"] = round(ev["resumed_s"] - ev["last_step_s"], 3)
        out["detect_s"] = round(ev["detected_s"] - ev["last_step_s"], 3)
    if ev.get("lost_steps") is not None:
        out["replayed"] = int(ev["lost_steps"]) + 1
    out["recovered"] = ok and out["gap_s"] is not None
    if not ok:
        out["why"] = f"status {summary.get('status')}, final step {summary.get('final_step')}: " \
                     f"{(summary.get('error') or '')[:300]}"
    return out


# ---- processes ---------------------------------------------------------------------
def _dump_stacks(tag: str, log_path: Path) -> str | None:
    """``py-spy dump`` the trial's processes into ``log_path``; returns a worker's innermost frame."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return None
    where = None
    with open(log_path, "w") as log:
        for pid in harness.tagged_pids(tag):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if not any(k in cmdline for k in ("anchors/mlp_", "raypod.cli", "ray::")):
                continue
            try:
                r = subprocess.run([str(spy), "dump", "--pid", str(pid)], capture_output=True,
                                   text=True, timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                continue
            log.write(f"\n==== py-spy dump of pid {pid} ({cmdline.strip()[:200]}) at timeout ====\n")
            log.write(r.stdout + r.stderr)
            frames = [ln.strip() for ln in r.stdout.splitlines() if ln.startswith("    ")]
            worker = "ray::" in cmdline or ("mlp_torchrun" in cmdline and "distributed.run" not in cmdline)
            if where is None and frames and worker:
                where = frames[0]
    return where


# ---- one trial ---------------------------------------------------------------------
def _command(system: str, i: int, tmp: Path, torchrun_fresh_store: bool = False
             ) -> tuple[list[str], dict[str, str]]:
    py = sys.executable
    extra: dict[str, str] = {}
    if system == "raypod":
        cmd = [py, "-m", "raypod.cli", "run", "jobs/configs/mlp.yaml", "--quiet",
               "--set", f"checkpoint.storage={tmp / 'storage'}", "--set", f"name=rec-{i}",
               "--set", "checkpoint.memory_every_steps=1",
               "--set", f"fault.inject=[{{step: {KILL_AFTER + 1}, rank: 1, kind: kill}}]"]
    elif system == "ray_train_v2":
        cmd = [py, str(harness.REPO / "raypod/bench/anchors/mlp_ray_train.py"), "--workdir", str(tmp / "work"),
               "--storage", str(tmp / "storage"), "--name", f"rec-ray-train-{i}",
               "--steps", str(MAX_STEPS)]
        extra["RAY_TRAIN_V2_ENABLED"] = "1"
    elif system == "torchrun":
        cmd = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", "2", str(harness.REPO / "raypod/bench/anchors/mlp_torchrun.py"),
               "--workdir", str(tmp / "work"), "--steps", str(MAX_STEPS)]
        if torchrun_fresh_store:
            extra["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    else:
        raise ValueError(f"unknown system '{system}'")
    return cmd, extra


def run_trial(system: str, i: int, logs: Path, torchrun_fresh_store: bool = False) -> dict[str, Any]:
    """Run ``system`` once with the kill; returns its gap, replayed steps and recovered flag."""
    trial = harness.Trial.new("rpr-", logs / f"{system}-{i}.log", ("storage", "work"))
    tmp = trial.tmp
    cmd, extra = _command(system, i, tmp, torchrun_fresh_store)
    env = trial.env(extra, (*harness.SCRUB, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"))
    rec: dict[str, Any] = {"system": system, "trial": i, "gap_s": None, "replayed": None,
                           "recovered": False}
    with harness.launched(cmd, env, trial.log_path) as (proc, t0):
        rc = harness.wait_rc(proc, TRIAL_TIMEOUT_S)
        rec["process_s"] = round(time.time() - t0, 2)
        if rc is None:
            rec["stuck_in"] = _dump_stacks(trial.tag, logs / f"{system}-{i}.stacks.txt")
    rec["exit_code"] = rc
    try:
        if system == "raypod":
            summary = json.loads((tmp / "storage" / f"rec-{i}" / "summary.json").read_text())
            rec.update(raypod_figures(summary))
        else:
            rec.update(anchor_figures(read_step_log(tmp / "work" / "steps.log"), rc))
        if rc is None:
            rec["recovered"] = False
            rec["why"] = f"timed out after {TRIAL_TIMEOUT_S:.0f}s" + (
                f", a worker stuck in {rec['stuck_in']}" if rec.get("stuck_in") else "")
        elif rc != 0:
            rec["recovered"] = False
            rec["why"] = f"exit code {rc}" + (f": {rec['why']}" if rec.get("why") else "")
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        rec["recovered"] = False
        rec["why"] = f"{type(e).__name__}: {e}" + (f" (timed out after {TRIAL_TIMEOUT_S:.0f}s)"
                                                   if rc is None else "")
    if not rec["recovered"]:
        rec["cause"] = harness.cause(trial.log_path)
        rec["log_tail"] = harness.tail(trial.log_path)
    rec["log"] = str(trial.log_path)
    return trial.finish(rec, QUIET_TIMEOUT_S, _log)


# ---- the suite ---------------------------------------------------------------------
def _summarise(by_system: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    medians: dict[str, dict[str, Any]] = {}
    for s, recs in by_system.items():
        medians[s] = {
            "gap_s": table.median(r["gap_s"] for r in recs if r["recovered"] and r["gap_s"] is not None),
            "replayed": table.median(r["replayed"] for r in recs
                                     if r["recovered"] and r["replayed"] is not None),
            "recovered": f"{sum(1 for r in recs if r['recovered'])}/{len(recs)}",
        }
    gaps = {s: m["gap_s"] for s, m in medians.items()}
    return {"median": medians, "ratios": table.ratios_vs(gaps, "raypod", SYSTEMS)}


def _rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for s in SYSTEMS:
        for r in result["trials"][s]:
            rows.append([LABELS[s], str(r["trial"]), fmt(r["gap_s"], ".2f"), fmt(r["replayed"]),
                         "yes" if r["recovered"] else f"NO ({r.get('why', '?')[:80]})",
                         fmt(r.get("restored_from"))])
    for s in SYSTEMS:
        m = result["median"][s]
        ratio = result["ratios"].get(f"raypod/{s}")
        rows.append([f"**{LABELS[s]}**", "median", fmt(m["gap_s"], ".2f"), fmt(m["replayed"]), m["recovered"],
                     "gap ratio 1.00" if s == "raypod" else f"gap ratio raypod/this {fmt(ratio, '.2f')}"])
    return rows


HEADER = ["system", "trial", "gap (s)", "steps replayed", "recovered", "restored from / ratio"]


def markdown_table(result: dict[str, Any]) -> str:
    return table.markdown_table(HEADER, _rows(result), "|---|---|---:|---:|---|---|")


def print_table(result: dict[str, Any]) -> None:
    table.print_table(f"recovery: rank 1 killed after step {KILL_AFTER} (mlp.yaml, 2 CPU ranks, "
                      "checkpoint every 10 steps)", HEADER, _rows(result), lambda k: k in (2, 3))


DEFINITIONS = {
    "gap_s": f"seconds from the completion of the last step before the kill (step {KILL_AFTER}) "
             "to the completion of the first step after it (raypod: summary events[0] "
             "resumed_s - last_step_s on the driver; anchors: rank 0's step log, right after "
             "optimizer.step())",
    "replayed": "step numbers completed before the kill and again after it, + 1 for the "
                "interrupted step (raypod: events[0].lost_steps + 1; anchors: step numbers "
                "logged more than once + 1)",
    "recovered": f"exit 0 and last step {MAX_STEPS} (raypod: status succeeded, final_step "
                 f"{MAX_STEPS})",
}


def run_recovery_bench(trials: int = 3, out: str | os.PathLike | None = "benchmarks/results",
                       torchrun_fresh_store: bool = False) -> dict[str, Any]:
    """Run the suite: ``trials`` interleaved trials per system; write JSON and Markdown to ``out``.

    ``torchrun_fresh_store`` runs torchrun with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``
    (see the module doc); off by default, so torchrun is measured as shipped.
    """
    if trials < 1:
        raise ValueError("trials must be at least 1")
    harness.warm_page_cache()
    session = harness.Session.open("recovery", lambda logs: f"{trials} trial(s) per system, interleaved; "
                                                    f"subprocess logs in {logs}", _log, QUIET_TIMEOUT_S)

    def describe(rec: dict[str, Any]) -> str:
        what = (f"gap {rec['gap_s']:.2f}s, {rec['replayed']} steps replayed, recovered"
                if rec["recovered"] else f"NOT RECOVERED ({rec.get('why')}; cause: {rec.get('cause')})")
        return f"{what} (process ran {rec['process_s']:.1f}s, drained in {rec['drain_s']:.1f}s)"

    by_system, order = harness.interleave(SYSTEMS, trials, lambda s, i: run_trial(s, i, session.logs,
                                                                          torchrun_fresh_store),
                                  describe, _log)
    result: dict[str, Any] = {
        "suite": "recovery",
        "definitions": DEFINITIONS,
        "date": session.date,
        "machine": session.machine(),
        "command": f"run_recovery_bench(trials={trials}, torchrun_fresh_store={torchrun_fresh_store})",
        "torchrun_env": {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if torchrun_fresh_store else {},
        "system_commands": COMMANDS,
        "workload": "jobs/configs/mlp.yaml: 4 x [Linear(512->2048), GELU, Linear(2048->512)], FSDP2 "
                    "per block + root, gloo, 2 CPU ranks, global batch 32 (16 per rank) of random "
                    "normal inputs, loss mean(out^2), AdamW lr 1e-3, 60 steps, persistent checkpoint "
                    f"every 10 steps, rank 1 killed (os._exit) once right after step {KILL_AFTER}",
        "trials_per_system": trials,
        "order": order,
        "trials": by_system,
        **_summarise(by_system),
    }
    print_table(result)
    table.write_results(result, out, "recovery", markdown(result, torchrun_fresh_store), _log)
    return result


def markdown(result: dict[str, Any], torchrun_fresh_store: bool = False) -> str:
    """``recovery.md``: the table, the definitions, the trials that did not recover, the commands."""
    m = result["machine"]
    failed = [f"{LABELS[r['system']]} trial {r['trial']}: {r.get('why')}"
              + (f"; cause: `{r['cause']}`" if r.get("cause") else "")
              + (f"; stuck in `{r['stuck_in']}`" if r.get("stuck_in") else "")
              for s in SYSTEMS for r in result["trials"][s] if not r["recovered"]]
    return "\n".join([
        "# recovery: a worker killed mid-run",
        "",
        f"{table.machine_line(result['date'], m)}; load average "
        f"{m['loadavg_before'][0]} before, {m['loadavg_after'][0]} after.",
        f"Command: `{result['command']}` (`python -m raypod.bench.recovery --trials "
        f"{result['trials_per_system']}{' --torchrun-fresh-store' if torchrun_fresh_store else ''}`). "
        f"Trials interleaved in the order {', '.join(SYSTEMS)}, ...; each a cold subprocess.",
        "",
        f"Workload: {result['workload']}.",
        "",
        markdown_table(result),
        "",
        f"- **gap**: {result['definitions']['gap_s']}.",
        f"- **steps replayed**: {result['definitions']['replayed']}.",
        f"- **recovered**: {result['definitions']['recovered']}.",
        "- torchrun ran " + ("with `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` (a fresh rendezvous "
                             "store per restart)" if torchrun_fresh_store else
                             "as shipped (its rendezvous store shared with the workers; a restart "
                             "can read the dead group's gloo addresses, pytorch/pytorch#135712)") + ".",
        "- Medians are over recovered trials; the ratio is raypod's median gap over the "
        "system's (below 1: raypod recovers faster).",
        "",
        *table.problems_md("Trials that did not recover:", failed),
        *table.commands_md(LABELS, COMMANDS),
    ])


run = run_recovery_bench
"""Entry point for ``raypod bench recovery`` (called with ``trials=`` and ``out=``)."""


def main(argv: list[str] | None = None) -> int:
    p = harness.suite_parser("raypod vs Ray Train V2 vs torchrun: recovery from a killed worker")
    p.add_argument("--torchrun-fresh-store", action="store_true",
                   help="run torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (see the module doc)")
    args = p.parse_args(argv)
    result = run_recovery_bench(trials=args.trials, out=args.out,
                                torchrun_fresh_store=args.torchrun_fresh_store)
    print(json.dumps({"median": result["median"], "ratios": result["ratios"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
