"""The ``goodput`` suite: a long run with a worker SIGKILLed every minute, raypod beside
Ray Train V2, torchrun, Ray Train V2 with ``TorchftConfig`` and torchft.

Every system trains ``jobs/configs/mlp.yaml``'s workload (the recovery suite's: a
4-block MLP, FSDP2 per block + root on gloo, 2 CPU ranks, global batch 32, AdamW,
persistent checkpoint every 10 steps) for ``duration`` seconds (default 600) with a
step budget it never reaches. The harness, from outside, SIGKILLs the process of one
rank every ``kill_every`` seconds (default 60), counted from the system's first
completed step; the rank is drawn by a ``random.Random(seed)`` that every system
replays, so every system sees the same sequence of ranks. No kill fires in the last
``kill_every / 2`` seconds before the deadline (every kill gets time to recover).

* ``raypod``: :mod:`raypod.bench.anchors.raypod_steps` (``raypod run`` plus a callback
  that appends each step completion to a step log and stops the driver at the
  deadline) with ``mlp.yaml`` as is (``scaling.spares: 1``), MLflow off,
  ``fault.max_failures=1000``, ``checkpoint.memory_every_steps=1`` (a snapshot after
  every step: on a cluster losing a rank a minute, the setting that loses least; the
  default ``auto`` cadence snapshots only every 20 steps on a busy 2-core box). The victim is a rank's actor process
  (``ray::TrainWorker...``), never the warm spare: each live actor's Ray worker log
  (``worker-*-<pid>.err``) names the rank it last joined as ("[rank r] joining ...");
  the spare has joined nothing.
* ``ray_train_v2``: :mod:`raypod.bench.anchors.mlp_ray_train` with
  ``FailureConfig(max_failures=-1)``, ``CheckpointConfig(num_to_keep=2)``; the victim
  is the Ray Train worker actor's process of that rank (each rank writes its pid to
  ``<work>/pids/rank<r>``).
* ``torchrun``: :mod:`raypod.bench.anchors.mlp_torchrun` under ``torchrun
  --max-restarts 1000``, keeping the 2 newest checkpoints; the victim is the worker
  process of that rank (its pid file, as for Ray Train).
* ``ray_train_torchft`` and ``torchft``: :mod:`raypod.bench.anchors.mlp_ray_train_torchft`
  (``FailureConfig(max_failures=-1)``) and :mod:`raypod.bench.anchors.mlp_torchft`
  (each replica group's torchrun ``--max-restarts 1000``): two replica groups of one rank;
  the victim is that group's rank (its pid file). The survivor keeps training alone while
  the lost group comes back, so their step completions are merged from the groups' logs
  (:func:`group_rows`) and their samples counted per group (:func:`sample_figures`).

Each system stops by itself at the absolute deadline (launch + ``duration``), passed
on its command line so a group restarted late knows it too; the anchors' ranks agree
on it with an all-reduce every 10 steps, raypod's driver at the first step it sees
after it. Only step completions up to the deadline count.

Definitions, applied identically to the three systems, from the step log
(``step,unix_time,attempt`` per completion; anchors: rank 0 right after
``optimizer.step()``; raypod: the driver holding every rank's result) and the
harness's kill times:

* **window**: from the first step completion to the deadline.
* **steady step time**: the median interval between consecutive step completions,
  over the intervals that contain no kill (measured in the same run).
* **kept steps**: step number of the state at the end (the last completion before the
  deadline) minus that of the first completion: the steps done inside the window that
  the final state keeps. Work that a restore threw away is not kept.
* **productive time** = kept steps x steady step time.
* **goodput** = productive time / window (1.0: as if no kill and no save stall had
  ever happened; persistent saves count as lost time for every system alike).
* **ETTR** (effective training time ratio, as in Kokolis et al. 2024, "Revisiting
  Reliability in Large-Scale Machine Learning Research Clusters") = kept steps x the
  *mean* fault-free interval / window: the share of the window spent in steps whose work
  was kept. Unlike goodput, it does not charge a system for its own step-time spread
  (save stalls, snapshot jitter), which the overhead and checkpoint suites measure.
* **recoveries**: kills followed by a step completion before the next kill (or the
  deadline). **recovery gap**: that completion's time minus the time of the last
  completion before the kill (as in the recovery suite); the mean over recoveries.
* **steps replayed**: completions of a step number already completed before.
* **samples goodput** (throughput goodput): samples kept in the window per second over the
  fault-free rate (global batch / steady step time); the same as goodput where every step
  trains the whole batch, lower for torchft's steps without the lost group.
* **lost rank back**: per kill, seconds until the killed rank trains again (torchft: its
  group's next committed step with samples; the others: the next step completion).

    python -m raypod.bench.goodput [--duration 600] [--kill-every 60] [--seed 0]
    raypod bench goodput [--duration 600] [--kill-every 60]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from raypod.bench import table
from raypod.bench import trials as harness
from raypod.bench.recovery import GLOBAL_BATCH, MATH, TORCHFT_SYSTEMS, Line, read_group_log, read_step_log
from raypod.bench.table import fmt

LABELS = table.labels(raypod_peer="raypod, peer memory only",
                      ray_train_v2="Ray Train V2 TorchTrainer", torchrun="torchrun --max-restarts 1000",
                      ray_train_torchft="Ray Train V2 TorchTrainer + TorchftConfig",
                      torchft="torchft (Manager + lighthouse, torchrun --max-restarts 1000 per group)")
SYSTEMS = tuple(LABELS)
RAYPOD_SYSTEMS = ("raypod", "raypod_peer")
"""raypod's rows: ``mlp.yaml`` as it is (a persistent checkpoint every 10 steps, the durability of
the checkpoint-restart anchors), and with only its peers' in-memory replicas between the start
and the end, the durability of the torchft anchors (which write no persistent checkpoint)."""
MATH_GOODPUT = {**MATH, "raypod_peer": MATH["raypod"] + "; no persistent checkpoint is written "
                "before the end, so a loss of every rank at once would go back to the start, as for "
                "the torchft anchors"}
DURATION_S = 600.0
KILL_EVERY_S = 60.0
SEED = 0
MAX_STEPS = 10**9
"""A step budget no run reaches: every system stops at its deadline."""
KEEP = 2
"""Persistent checkpoints the anchors keep (raypod keeps ``checkpoint.keep``, 3)."""
GRACE_S = 60.0
"""After the deadline: time to stop and shut down before the harness ends the process group."""
QUIET_TIMEOUT_S = 60.0

COMMANDS = {
    "raypod": "python raypod/bench/anchors/raypod_steps.py jobs/configs/mlp.yaml --log <tmp>/first.log "
              "--live-log <tmp>/work/steps.log --deadline <launch+duration> --set checkpoint.storage=<tmp> "
              f"--set name=goodput --set train.max_steps={MAX_STEPS} --set fault.max_failures=1000 "
              "--set checkpoint.memory_every_steps=1",
    "ray_train_v2": "RAY_TRAIN_V2_ENABLED=1 python raypod/bench/anchors/mlp_ray_train.py --workdir <tmp>/work "
                    f"--storage <tmp>/storage --name goodput-ray-train --steps {MAX_STEPS} --deadline "
                    f"<launch+duration> --no-kill --max-failures -1 --keep {KEEP}",
    "torchrun": "python -m torch.distributed.run --standalone --nproc-per-node 2 --max-restarts 1000 "
                f"raypod/bench/anchors/mlp_torchrun.py --workdir <tmp>/work --steps {MAX_STEPS} "
                f"--deadline <launch+duration> --no-kill --keep {KEEP}",
    "ray_train_torchft": "RAY_TRAIN_V2_ENABLED=1 python raypod/bench/anchors/mlp_ray_train_torchft.py "
                         "--workdir <tmp>/work --storage <tmp>/storage --name goodput-ray-train-torchft "
                         f"--steps {MAX_STEPS} --deadline <launch+duration> --no-kill --max-failures -1",
    "torchft": f"python raypod/bench/anchors/mlp_torchft.py --workdir <tmp>/work --steps {MAX_STEPS} "
               "--deadline <launch+duration> --no-kill --max-restarts 1000",
}
COMMANDS["raypod_peer"] = COMMANDS["raypod"] + " --set checkpoint.every_steps=0"


_log = harness.logger("bench goodput")


# ---- figures (pure) ----------------------------------------------------------------
Row = tuple[int, float, int]
"""``(step, unix_time, attempt)``: one step completion."""


def fault_free_intervals(rows: list[Row], kills: list[float]) -> list[float]:
    """Intervals between consecutive completions that contain no kill."""
    return [b[1] - a[1] for a, b in zip(rows[:-1], rows[1:], strict=True)
            if not any(a[1] < k <= b[1] for k in kills)]


def steady_step_s(rows: list[Row], kills: list[float]) -> float | None:
    """Median interval between consecutive completions, over intervals that contain no kill."""
    ivs = fault_free_intervals(rows, kills)
    return statistics.median(ivs) if ivs else None


def recoveries(rows: list[Row], kills: list[float], end: float) -> list[dict[str, Any]]:
    """Per kill: the last completion before it, the first after it (before the next kill or
    ``end``), the gap between the two, and whether it recovered."""
    out = []
    for i, k in enumerate(kills):
        nxt = kills[i + 1] if i + 1 < len(kills) else end
        before = [r for r in rows if r[1] < k]
        after = [r for r in rows if k <= r[1] <= nxt]
        rec: dict[str, Any] = {"kill_t": k, "last_step_before": before[-1][0] if before else None,
                               "first_step_after": after[0][0] if after else None,
                               "recovered": bool(before and after), "gap_s": None}
        if before and after:
            rec["gap_s"] = after[0][1] - before[-1][1]
        out.append(rec)
    return out


def kept_base(rows: list[Row]) -> int:
    """The step the final state's kept steps count from: the first completion's; for a state restarted
    from before it (torchft with every group lost: from scratch), the step below its lowest step."""
    lowest = min(r[0] for r in rows)
    return rows[0][0] if lowest >= rows[0][0] else lowest - 1


def goodput_figures(rows: list[Row], kills: list[float], end: float) -> dict[str, Any]:
    """Goodput and its parts from a step log and the kill times (see the module doc).

    Args:
        rows: step completions in file order (any after ``end`` are ignored).
        kills: unix times of the kills fired.
        end: the deadline (unix time).
    """
    rows = [r for r in rows if r[1] <= end]
    kills = sorted(kills)
    if not rows:
        raise RuntimeError("no step completed before the deadline")
    first, last = rows[0], rows[-1]
    window = end - first[1]
    step_s = steady_step_s(rows, kills)
    ivs = fault_free_intervals(rows, kills)
    kept = last[0] - kept_base(rows)
    seen = 0
    replayed = 0
    for r in rows:
        if r[0] <= seen:
            replayed += 1
        seen = max(seen, r[0])
    recs = recoveries(rows, [k for k in kills if k > first[1]], end)
    gaps = [r["gap_s"] for r in recs if r["recovered"]]
    productive = kept * step_s if step_s is not None else 0.0
    return {
        "window_s": round(window, 3),
        "steady_step_s": None if step_s is None else round(step_s, 4),
        "mean_fault_free_step_s": round(statistics.mean(ivs), 4) if ivs else None,
        "first_step": first[0],
        "final_step": last[0],
        "completions": len(rows),
        "kept_steps": kept,
        "productive_s": round(productive, 3),
        "goodput": round(productive / window, 4) if window > 0 else None,
        "ettr": round(kept * statistics.mean(ivs) / window, 4) if ivs and window > 0 else None,
        "kills": len(kills),
        "recoveries": sum(1 for r in recs if r["recovered"]),
        "steps_replayed": replayed,
        "mean_gap_s": round(statistics.mean(gaps), 3) if gaps else None,
        "gaps_s": [round(g, 3) for g in gaps],
        "per_kill": [{**r, "kill_t": round(r["kill_t"], 3),
                      "gap_s": None if r["gap_s"] is None else round(r["gap_s"], 3)} for r in recs],
    }


def group_rows(groups: dict[int, list[Line]]) -> list[Row]:
    """A torchft anchor's step completions from its groups' logs (``steps.rg<g>.log``).

    A step completes when the last group that committed it logged it; the groups restart on
    their own (no whole-job attempt), so ``attempt`` is 0. A killed first group leaves no hole:
    the survivor's commits count.
    """
    done: dict[int, float] = {}
    for lines in groups.values():
        for step, t, _, _, committed in lines:
            if committed:
                done[step] = max(done.get(step, t), t)
    return sorted(((step, t, 0) for step, t in done.items()), key=lambda r: r[1])


def sample_figures(rows: list[Row], groups: dict[int, list[Line]] | None, kills: list[dict[str, Any]],
                   end: float, step_s: float | None) -> dict[str, Any]:
    """Samples kept in the window, the throughput goodput and per kill the seconds until the killed
    rank trains again.

    Args:
        rows: step completions (``end`` and later ignored).
        groups: a torchft anchor's per-group logs (None: a system whose every step trains the
            whole global batch).
        kills: the harness's kills (``t``, ``rank``, ``fired``).
        end: the deadline.
        step_s: the steady (fault-free) step time.
    """
    rows = [r for r in rows if r[1] <= end]
    first_t, base = rows[0][1], kept_base(rows)
    if groups is None:
        kept = (rows[-1][0] - base) * GLOBAL_BATCH
    else:
        since = first_t
        if base != rows[0][0]:  # restarted from scratch: only the new state's steps count
            since = min(max(ln[1] for ln in lines if ln[0] == base + 1 and ln[4])
                        for lines in groups.values() if any(ln[0] == base + 1 and ln[4] for ln in lines)) - 1e-6
        kept = sum(ln[3] for lines in groups.values() for ln in lines if ln[4] and since < ln[1] <= end)
    window = end - first_t
    backs = []
    for k in (k for k in kills if k.get("fired")):
        if groups is None:
            after = [r[1] for r in rows if r[1] > k["t"]]
        else:
            after = [ln[1] for ln in groups.get(k["rank"], []) if ln[1] > k["t"] and ln[3] > 0 and ln[4]]
        backs.append(round(after[0] - k["t"], 3) if after and after[0] <= end else None)
    known = [b for b in backs if b is not None]
    return {
        "kept_samples": kept,
        "sample_goodput": round(kept * step_s / (GLOBAL_BATCH * window), 4) if step_s and window > 0 else None,
        "lost_back_s": backs,
        "mean_lost_back_s": round(statistics.mean(known), 3) if known else None,
    }


# ---- finding the ranks' processes --------------------------------------------------
def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


_JOIN = re.compile(r"\[rank (\d+)\] joining a group of \d+ \(attempt \d+, pid (\d+)\)")


def raypod_ranks(tag: str, ray_tmp: Path) -> dict[int, int]:
    """``rank -> pid`` of raypod's rank actors (not the spare) among the trial's processes.

    An actor's Ray worker log ``worker-*-<pid>.err`` holds the trainer's "[rank r]
    joining ..." line each time it joins a group; the latest one is its rank now. The
    spare has joined no group. When two live actors claim a rank, the later join wins.
    """
    claims: dict[int, tuple[float, int]] = {}
    for pid in harness.tagged_pids(tag):
        if not _cmdline(pid).startswith("ray::TrainWorker"):
            continue
        files = glob.glob(str(ray_tmp / "**" / "session_latest" / "logs" / f"worker-*-{pid}.err"),
                          recursive=True)
        for path in files:
            try:
                joins = _JOIN.findall(Path(path).read_text(errors="replace"))
                mtime = os.path.getmtime(path)
            except OSError:
                continue
            joins = [j for j in joins if int(j[1]) == pid]
            if joins:
                rank = int(joins[-1][0])
                if rank not in claims or claims[rank][0] < mtime:
                    claims[rank] = (mtime, pid)
    return {r: pid for r, (_, pid) in claims.items()}


def pidfile_ranks(tag: str, workdir: Path) -> dict[int, int]:
    """``rank -> pid`` from the anchors' ``<work>/pids/rank<r>`` files, live trial processes only."""
    live = set(harness.tagged_pids(tag))
    out = {}
    for path in glob.glob(str(workdir / "pids" / "rank*")):
        try:
            pid = int(Path(path).read_text().strip())
        except (OSError, ValueError):
            continue
        if pid in live:
            out[int(Path(path).name[4:])] = pid
    return out


def find_ranks(system: str, tag: str, tmp: Path) -> dict[int, int]:
    if system in RAYPOD_SYSTEMS:
        return raypod_ranks(tag, tmp)
    return pidfile_ranks(tag, tmp / "work")


# ---- one run -------------------------------------------------------------------------
def _command(system: str, tmp: Path, deadline: float, torchrun_fresh_store: bool = False
             ) -> tuple[list[str], dict[str, str]]:
    py = sys.executable
    extra: dict[str, str] = {}
    anchors = harness.REPO / "raypod/bench/anchors"
    if system in RAYPOD_SYSTEMS:
        cmd = [py, str(anchors / "raypod_steps.py"), "jobs/configs/mlp.yaml", "--log", str(tmp / "first.log"),
               "--live-log", str(tmp / "work" / "steps.log"), "--deadline", f"{deadline:.3f}",
               "--set", f"checkpoint.storage={tmp / 'storage'}", "--set", "name=goodput",
               "--set", f"train.max_steps={MAX_STEPS}", "--set", "fault.max_failures=1000",
               "--set", "checkpoint.memory_every_steps=1"]
        if system == "raypod_peer":
            cmd += ["--set", "checkpoint.every_steps=0"]
    elif system == "ray_train_v2":
        cmd = [py, str(anchors / "mlp_ray_train.py"), "--workdir", str(tmp / "work"),
               "--storage", str(tmp / "storage"), "--name", "goodput-ray-train", "--steps", str(MAX_STEPS),
               "--deadline", f"{deadline:.3f}", "--no-kill", "--max-failures", "-1", "--keep", str(KEEP)]
        extra["RAY_TRAIN_V2_ENABLED"] = "1"
    elif system == "torchrun":
        cmd = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", "1000", str(anchors / "mlp_torchrun.py"), "--workdir", str(tmp / "work"),
               "--steps", str(MAX_STEPS), "--deadline", f"{deadline:.3f}", "--no-kill", "--keep", str(KEEP)]
        if torchrun_fresh_store:
            extra["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    elif system == "ray_train_torchft":
        cmd = [py, str(anchors / "mlp_ray_train_torchft.py"), "--workdir", str(tmp / "work"),
               "--storage", str(tmp / "storage"), "--name", "goodput-ray-train-torchft", "--steps", str(MAX_STEPS),
               "--deadline", f"{deadline:.3f}", "--no-kill", "--max-failures", "-1"]
        extra["RAY_TRAIN_V2_ENABLED"] = "1"
    elif system == "torchft":
        cmd = [py, str(anchors / "mlp_torchft.py"), "--workdir", str(tmp / "work"), "--steps", str(MAX_STEPS),
               "--deadline", f"{deadline:.3f}", "--no-kill", "--max-restarts", "1000"]
    else:
        raise ValueError(f"unknown system '{system}'")
    return cmd, extra


def _first_step_time(path: Path) -> float | None:
    try:
        with open(path) as f:
            line = f.readline()
    except OSError:
        return None
    parts = line.strip().split(",")
    return float(parts[1]) if len(parts) >= 3 and line.endswith("\n") else None


def _drive(system: str, proc: subprocess.Popen, tag: str, tmp: Path, steps_log: Path, deadline: float,
           kill_every: float, rng: random.Random, kills: list[dict[str, Any]], t0: float) -> int | None:
    """Fire the kills on schedule until the process exits or the grace after the deadline ends;
    returns its exit code (``None``: still running)."""
    first_t = None
    next_kill = None
    rc = None
    while rc is None and time.time() < deadline + GRACE_S:
        now = time.time()
        if first_t is None:
            first_t = _first_step_time(steps_log)
            if first_t is not None:
                next_kill = first_t + kill_every
        if next_kill is not None and now >= next_kill:
            if next_kill <= deadline - kill_every / 2:
                rank = rng.randrange(2)
                ranks = find_ranks(system, tag, tmp)
                k: dict[str, Any] = {"t": time.time(), "rank": rank, "pid": ranks.get(rank)}
                if k["pid"] is not None:
                    try:
                        os.kill(k["pid"], signal.SIGKILL)
                        k["fired"] = True
                    except ProcessLookupError:
                        k["fired"], k["why"] = False, "the process was gone"
                else:
                    k["fired"], k["why"] = False, f"no live process of rank {rank} (found {ranks})"
                kills.append(k)
                _log(f"{system}: kill {len(kills)} at +{k['t'] - t0:.1f}s: rank {rank} pid {k['pid']}"
                     + ("" if k["fired"] else f" NOT FIRED ({k['why']})"))
                next_kill += kill_every
            else:
                next_kill = float("inf")
        try:
            rc = proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            rc = None
    return rc


def run_system(system: str, logs: Path, duration: float = DURATION_S, kill_every: float = KILL_EVERY_S,
               seed: int = SEED, torchrun_fresh_store: bool = False) -> dict[str, Any]:
    """Run ``system`` for ``duration`` s, SIGKILLing a rank every ``kill_every`` s; returns its figures."""
    trial = harness.Trial.new("rpg-", logs / f"{system}.log", ("storage", "work"))
    tmp = trial.tmp
    rng = random.Random(seed)
    steps_log = tmp / "work" / "steps.log"
    kills: list[dict[str, Any]] = []
    rec: dict[str, Any] = {"system": system, "ok": False}
    deadline = time.time() + duration
    cmd, extra = _command(system, tmp, deadline, torchrun_fresh_store)
    env = trial.env(extra, (*harness.SCRUB, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"))
    with harness.launched(cmd, env, trial.log_path) as (proc, t0):
        try:
            rc = _drive(system, proc, trial.tag, tmp, steps_log, deadline, kill_every, rng, kills, t0)
        finally:  # also when the harness itself is interrupted
            rec["process_s"] = round(time.time() - t0, 2)
            rec["stopped_s_after_deadline"] = round(time.time() - deadline, 2)
    rec.update(exit_code=rc, started=t0, deadline=deadline,
               kill_log=[{**k, "t": round(k["t"], 3)} for k in kills])
    try:
        groups = None
        if system in TORCHFT_SYSTEMS:
            groups = {int(p.name[len("steps.rg"):-len(".log")]): read_group_log(p)
                      for p in (tmp / "work").glob("steps.rg*.log")}
            rows = group_rows(groups)
        else:
            rows = read_step_log(steps_log)
        rec.update(goodput_figures(rows, [k["t"] for k in kills if k["fired"]], deadline))
        rec.update(sample_figures(rows, groups, kills, deadline, rec.get("steady_step_s")))
        rec["kills_fired"] = sum(1 for k in kills if k["fired"])
        rec["first_step_after_launch_s"] = round(rows[0][1] - t0, 3)
        rec["timeline"] = [[round(t - t0, 2), step] for step, t, _ in rows if t <= deadline]
        """``[seconds from launch, step]`` per completion, for the plot."""
        rec["ok"] = rc is not None and rc == 0
        if rc is None:
            rec["why"] = f"still running {GRACE_S:.0f}s after the deadline"
        elif rc != 0:
            rec["why"] = f"exit code {rc}"
    except (OSError, ValueError, RuntimeError) as e:
        rec["why"] = f"{type(e).__name__}: {e}"
        rec["goodput"] = None
    if not rec["ok"]:
        rec["cause"] = harness.cause(trial.log_path)
        rec["log_tail"] = harness.tail(trial.log_path)
    rec["log"] = str(trial.log_path)
    return trial.finish(rec, QUIET_TIMEOUT_S, _log)


# ---- the suite -----------------------------------------------------------------------
HEADER = ["system", "goodput", "ETTR", "samples goodput", "raypod / this", "raypod peer-only / this",
          "window (s)", "steady step (ms)",
          "kept steps", "kept samples", "kills fired", "recoveries", "steps replayed", "mean gap (s)",
          "mean lost rank back (s)", "ran to deadline"]


def _rows(result: dict[str, Any]) -> list[list[str]]:
    out = []
    for s in result["systems"]:
        r = result["results"][s]
        ratio, peer = (result["ratios"].get(f"{base}/{s}") if s != base else 1.0
                       for base in RAYPOD_SYSTEMS)
        step_ms = None if r.get("steady_step_s") is None else r["steady_step_s"] * 1000
        out.append([LABELS[s], fmt(r.get("goodput"), ".3f"), fmt(r.get("ettr"), ".3f"),
                    fmt(r.get("sample_goodput"), ".3f"), fmt(ratio, ".2f"), fmt(peer, ".2f"),
                    fmt(r.get("window_s"), ".1f"), fmt(step_ms, ".0f"), fmt(r.get("kept_steps")),
                    fmt(r.get("kept_samples")), fmt(r.get("kills_fired")), fmt(r.get("recoveries")),
                    fmt(r.get("steps_replayed")), fmt(r.get("mean_gap_s"), ".2f"),
                    fmt(r.get("mean_lost_back_s"), ".2f"),
                    "yes" if r["ok"] else f"NO ({(r.get('why') or '?')[:60]})"])
    return out


def markdown_table(result: dict[str, Any]) -> str:
    return table.markdown_table(HEADER, _rows(result), "|---|" + "---:|" * (len(HEADER) - 2) + "---|")


def print_table(result: dict[str, Any]) -> None:
    table.print_table(f"goodput: {result['duration_s']:.0f} s, a rank SIGKILLed every "
                      f"{result['kill_every_s']:.0f} s (mlp.yaml, 2 CPU ranks, checkpoint every 10 steps)",
                      HEADER, _rows(result), lambda k: k not in (0, len(HEADER) - 1), width=180)


DEFINITIONS = {
    "window_s": "first step completion to the deadline (launch + duration)",
    "steady_step_s": "median interval between consecutive step completions, over intervals containing "
                     "no kill, in the same run",
    "kept_steps": "step of the last completion before the deadline minus step of the first completion "
                  "(work thrown away by a restore is not kept)",
    "goodput": "kept_steps x steady_step_s / window_s",
    "ettr": "effective training time ratio: kept_steps x the mean interval over intervals containing no "
            "kill / window_s (the share of the window spent in steps whose work was kept)",
    "recoveries": "kills followed by a step completion before the next kill or the deadline",
    "mean_gap_s": "mean over recoveries of (first completion after the kill - last completion before it)",
    "steps_replayed": "completions of a step number already completed before",
    "kept_samples": "samples the state keeps from completions after the first up to the deadline: kept_steps x "
                    f"{GLOBAL_BATCH} for raypod and the checkpoint-restart anchors; the torchft anchors: every "
                    "group's committed samples (a step trained by one of the two groups counts 16)",
    "sample_goodput": f"throughput goodput: kept_samples / window_s over the fault-free rate {GLOBAL_BATCH} / "
                      "steady_step_s (equal to goodput where every step trains the whole batch; lower for "
                      "torchft, whose steps without the lost group train half of it)",
    "mean_lost_back_s": "mean over fired kills of the seconds until the killed rank trains again (raypod and "
                        "the checkpoint-restart anchors: the next step completion, every rank trains it; "
                        "the torchft anchors: the killed group's next committed step with samples)",
    "final_state": "not compared here: each system stops at a deadline, at a step of its own, and no "
                   "fault-free run is made (the recovery suite compares final states)",
}


def run_goodput_bench(duration: float = DURATION_S, kill_every: float = KILL_EVERY_S, seed: int = SEED,
                      out: str | os.PathLike | None = "benchmarks/results",
                      systems: tuple[str, ...] = SYSTEMS, torchrun_fresh_store: bool = False,
                      plot: str | os.PathLike | None = "benchmarks/plots") -> dict[str, Any]:
    """Run every system once for ``duration`` s with a kill every ``kill_every`` s; write
    ``<out>/goodput.json`` and ``.md`` and, when ``plot`` is a folder, ``<plot>/goodput.png``."""
    if duration <= kill_every:
        raise ValueError("duration must be longer than kill_every")
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system(s) {unknown} (known: {', '.join(SYSTEMS)})")
    harness.warm_page_cache()
    session = harness.Session.open(
        "goodput", lambda logs: f"{', '.join(systems)}: {duration:.0f} s each, a kill every {kill_every:.0f} s; "
                                f"logs in {logs}", _log, QUIET_TIMEOUT_S)
    results = {}
    for s in systems:
        r = run_system(s, session.logs, duration, kill_every, seed, torchrun_fresh_store)
        results[s] = r
        _log(f"{s}: goodput {fmt(r.get('goodput'), '.3f')}, {r.get('kills_fired')} kills, "
             f"{r.get('recoveries')} recoveries, {r.get('steps_replayed')} steps replayed, mean gap "
             f"{fmt(r.get('mean_gap_s'), '.2f')} s" + ("" if r["ok"] else f" (NOT OK: {r.get('why')})"))
    samples = {s: r.get("sample_goodput", r.get("goodput")) for s, r in results.items()}
    ratios = {k: v for base in RAYPOD_SYSTEMS if base in results
              for k, v in table.ratios_vs(samples, base, systems).items()}
    cmd = (f"python -m raypod.bench.goodput --duration {duration:g} --kill-every {kill_every:g} --seed {seed}"
           + (f" --systems {','.join(systems)}" if tuple(systems) != SYSTEMS else "")
           + (" --torchrun-fresh-store" if torchrun_fresh_store else ""))
    result: dict[str, Any] = {
        "suite": "goodput",
        "definitions": DEFINITIONS,
        "date": session.date,
        "machine": session.machine(),
        "command": cmd,
        "duration_s": duration,
        "kill_every_s": kill_every,
        "seed": seed,
        "target": "raypod ETTR >= 0.97",
        "torchrun_env": {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if torchrun_fresh_store else {},
        "system_commands": {s: COMMANDS[s] for s in systems},
        "workload": "jobs/configs/mlp.yaml: 4 x [Linear(512->2048), GELU, Linear(2048->512)], FSDP2 per "
                    "block + root, gloo, 2 CPU ranks, global batch 32, AdamW lr 1e-3, persistent checkpoint "
                    f"every 10 steps; a seeded-random rank SIGKILLed every {kill_every:g} s from the first "
                    f"step, {duration:g} s from launch",
        "systems": list(systems),
        "results": results,
        "ratios": ratios,
    }
    print_table(result)
    if out is not None:
        table.write_results(result, out, "goodput", markdown(result), _log)
        if plot is not None:
            try:
                from raypod.bench.plots import plot_goodput

                _log(f"wrote {plot_goodput(result, Path(plot))}")
            except Exception as e:  # noqa: BLE001 - a missing plot never loses the results
                _log(f"no plot: {type(e).__name__}: {e}")
    return result


def markdown(result: dict[str, Any]) -> str:
    """``goodput.md`` from a result (as ``goodput.json`` holds it)."""
    m = result["machine"]
    return "\n".join([
        "# goodput: a rank SIGKILLed every minute",
        "",
        f"{table.machine_line(result['date'], m)}; load average {m['loadavg_before'][0]} before, "
        f"{m['loadavg_after'][0]} after.",
        f"Command: `{result['command']}`. Systems one after the other, each a cold subprocess.",
        "",
        f"Workload: {result['workload']}.",
        "",
        markdown_table(result),
        "",
        *[f"- **{k}**: {v}." for k, v in DEFINITIONS.items()],
        "What each system's recovery does to the training math:",
        "",
        *[f"- **{LABELS[s]}**: {MATH_GOODPUT[s]}." for s in result["systems"]],
        "",
        "- The ratios are a raypod row's samples goodput over the system's (above 1: raypod keeps "
        "more of its fault-free throughput). Targets: raypod's ETTR >= 0.97 (issue 8); raypod's "
        "samples goodput >= every anchor's (issue 18), each raypod row against the anchors of its "
        "durability (persistent checkpoints every 10 steps: Ray Train V2, torchrun; peers' memory "
        "only: the torchft anchors).",
        "",
        *table.commands_md(LABELS, result["system_commands"]),
    ])


def run(trials: int = 1, out: str | os.PathLike | None = "benchmarks/results", duration: float = DURATION_S,
        kill_every: float = KILL_EVERY_S, systems: str | tuple[str, ...] = SYSTEMS) -> dict[str, Any]:
    """Entry point for ``raypod bench goodput`` (one run per system; ``trials`` is not used; ``systems``
    a comma-separated subset)."""
    if isinstance(systems, str):
        systems = tuple(s.strip() for s in systems.split(",") if s.strip())
    return run_goodput_bench(duration=duration, kill_every=kill_every, out=out, systems=systems)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="raypod vs Ray Train V2 vs torchrun: goodput with a rank "
                                            "SIGKILLed every minute")
    p.add_argument("--duration", type=float, default=DURATION_S, help="seconds per system, from launch")
    p.add_argument("--kill-every", type=float, default=KILL_EVERY_S, help="seconds between kills")
    p.add_argument("--seed", type=int, default=SEED, help="seeds the ranks killed")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset to run")
    p.add_argument("--out", default="benchmarks/results", help="folder for goodput.json/.md ('-': nowhere)")
    p.add_argument("--plot", default="benchmarks/plots", help="folder for goodput.png ('-': none)")
    p.add_argument("--torchrun-fresh-store", action="store_true",
                   help="run torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (see raypod.bench.recovery)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # end the system under test on the way out
    result = run_goodput_bench(duration=args.duration, kill_every=args.kill_every, seed=args.seed,
                               out=None if args.out == "-" else args.out,
                               systems=tuple(s for s in args.systems.split(",") if s),
                               torchrun_fresh_store=args.torchrun_fresh_store,
                               plot=None if args.plot == "-" else args.plot)
    print(json.dumps({s: {k: r.get(k) for k in ("goodput", "sample_goodput", "kills_fired", "recoveries",
                                                  "steps_replayed", "mean_gap_s", "mean_lost_back_s")} for s, r in result["results"].items()}
                     | {"ratios": result["ratios"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
