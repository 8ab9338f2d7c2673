"""The ``recovery`` suite: one worker killed or frozen mid-run, raypod beside Ray Train V2, torchrun and torchft.

Every system trains ``jobs/configs/mlp.yaml``'s workload (issue 5): a 4-block MLP
(512→2048→GELU→512), FSDP2 per block + root on gloo, 2 CPU ranks, global batch 32 of
random normal inputs, loss = mean squared output, AdamW lr 1e-3, 60 steps,
persistent checkpoints every 10 steps. Rank 1 faults once, right after step 25
completed, i.e. at the start of step 26, in one of two ways (the ``fault`` dimension):

* ``kill``: the rank's process exits hard (``os._exit``); its sockets close.
* ``freeze``: the rank's process stops itself with SIGSTOP; it stays alive, its
  sockets stay open and nothing answers on them (the CPU stand-in for a dead NCCL
  peer, or a GPU stuck in a kernel). Nothing ever continues it.

How each system gets the fault:

* ``raypod``: ``python -m raypod.cli run jobs/configs/mlp.yaml --quiet --set
  checkpoint.storage=<tmp> --set name=rec-<fault>-<i> --set 'fault.inject=[{step: 26,
  rank: 1, kind: <fault>}]'`` (an injected fault fires when the rank *starts* that step,
  after writing its marker ``<job_dir>/faults/fired_0.json`` with the fault's ``time``).
* ``ray_train_v2``: :mod:`raypod.bench.anchors.mlp_ray_train` ``--fault <fault>``
  (``TorchTrainer``, ``FailureConfig(max_failures=2)``, DCP shards reported with
  ``ray.train.report``). Its process group is Ray Train's ``TorchConfig`` default,
  ``timeout_s=1800``; its controller declares a worker dead when it does not answer
  the health poll for ``RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S`` (600 s by default).
* ``torchrun``: :mod:`raypod.bench.anchors.mlp_torchrun` ``--fault <fault>`` under
  ``python -m torch.distributed.run --standalone --nproc-per-node 2 --max-restarts 2``
  (DCP). Its process group is ``dist.init_process_group("gloo")`` with torch's default
  timeout (``default_pg_timeout``, 1800 s); the agent restarts on a worker's *exit*.

* ``ray_train_torchft``: :mod:`raypod.bench.anchors.mlp_ray_train_torchft` (``TorchTrainer``
  with ``TorchftConfig(lighthouse_kwargs={"min_replicas": 1}, backend="gloo")``: each
  worker its own replica group, only the lost group replaced).
* ``torchft``: :mod:`raypod.bench.anchors.mlp_torchft` (a ``torchft_lighthouse``, then one
  ``torchrun --nproc-per-node 1 --max-restarts 2`` per replica group, as torchft's README).
  Both torchft anchors hold the whole model per group, DDP over the quorum; the surviving
  group keeps training at half the global batch while the lost one comes back and heals
  from its live state. Each group logs ``step,unix_time,attempt,samples,committed``.

Before the trials, each system runs once without a fault (:data:`REFERENCE`): its samples
per second and its final-state digest are the reference of the **throughput goodput** and
**final state = fault-free** columns (:func:`apply_references`); ``--systems`` picks systems.

The anchors write ``<workdir>/kill.marker`` (``<fault> after step 25 at <unix time>``)
before the fault fires. They run as shipped: what they do with a frozen peer (their
own process-group timeouts, their own failure detection) is the measurement.

Definitions, applied identically to the three systems:

* **gap** (recovery gap): wall seconds from the completion of the last step completed
  before the fault (step 25) to the completion of the first step completed after it,
  whichever step number that is. raypod: ``events[0].resumed_s -
  events[0].last_step_s`` of ``summary.json`` (both on the driver's clock, when the
  driver held every rank's result of the step). Anchors: from rank 0's step log
  (``step,unix_time,attempt``, written right after ``optimizer.step()``): the time of
  the first line of the next attempt minus the time of the last line of the faulted one.
* **replayed** (steps replayed): the number of step numbers whose work the failure
  threw away and that had to be run again = (step numbers completed before the fault
  and completed again after it) + 1 for the interrupted step (step 26, started by the
  surviving rank but never completed). raypod: ``events[0].lost_steps + 1``
  (``lost_steps`` = steps completed before the failure that the restore rolled back).
  Anchors: the number of step numbers that appear more than once in the step log,
  + 1. A restore from the checkpoint of step 20 replays 21..26 = 6; a restore of the
  state after step 25 replays only step 26 = 1.
* **recovered**: the run exited 0 and its last completed step is 60 (raypod:
  ``status == "succeeded"`` and ``final_step == 60``), after the fault fired, within
  the trial timeout (:data:`TRIAL_TIMEOUT_S`: 300 s for a kill, 120 s for a freeze).
  A trial that times out is reported as not recovered, with where a worker was stuck
  (``py-spy dump`` of the trial's processes, in ``<system>-<fault>-<i>.stacks.txt``).
* **detection** (raypod only): seconds from the fault's own time (the ``time`` of the
  rank's marker ``fired_0.json``, written just before the fault fires) to the driver's
  detection: ``summary["started_at"] + events[0]["detected_s"] - marker["time"]``.
  The anchors have no comparable record of when they noticed (the next attempt's first
  line is the recovery, not the detection), so their detection is left empty.
* **resume** (raypod only): seconds from the detection to the first completed step
  after it, ``events[0].resumed_s - events[0].detected_s``.

The acceptance targets (:data:`TARGETS`, checked from the medians and printed under
the table): raypod's freeze detection ≤ 1.5 s and resume ≤ 1 s after detection, and
raypod's kill gap ≤ 1.0 s.

torchrun as shipped shares its rendezvous ``TCPStore`` with the workers' process groups
(torch 2.13), and a restarted group can read the dead group's gloo addresses from it:
``connectFullMesh`` then fails or hangs ("Connection refused" to the old port; see
pytorch/pytorch#135712). That is what a torchrun user gets, so it is measured as is;
``torchrun_fresh_store=True`` (``--torchrun-fresh-store``) sets torch's own workaround,
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, to measure torchrun's recovery without it.

Trials run interleaved over (system, fault) (raypod kill, ray_train_v2 kill, torchrun
kill, raypod freeze, ..., then the next round), each as a cold subprocess with a
timeout, its own ``RAY_TMPDIR`` (so a ``ray.init()`` never joins a cluster that some
other program recorded) and an environment tag; after each trial every tagged process
is waited for (and killed by pid if it lingers; a stopped one at once, with SIGKILL)
and the harness waits for ``pgrep -f raylet`` to come back empty before the next one.

    python -m raypod.bench.recovery --trials 3 --faults kill,freeze --out benchmarks/results
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from raypod.bench import table
from raypod.bench import trials as harness
from raypod.bench.table import fmt

LABELS = table.labels(ray_train_v2="Ray Train V2 TorchTrainer", torchrun="torchrun --max-restarts 2",
                      ray_train_torchft="Ray Train V2 TorchTrainer + TorchftConfig",
                      torchft="torchft (Manager + lighthouse, torchrun per replica group)")
SYSTEMS = tuple(LABELS)
FAULTS = ("kill", "freeze")
"""The fault dimension: ``kill`` (the rank exits) and ``freeze`` (the rank SIGSTOPs itself)."""
MAX_STEPS = 60
KILL_AFTER = 25
"""Rank 1 faults right after completing this step (raypod: ``inject`` at step 26)."""
TRIAL_TIMEOUT_S = {"kill": 300.0, "freeze": 120.0}
"""A trial still running after this is not recovered. A freeze that the system does not
notice would otherwise wait out a 30-minute process-group timeout; 120 s keeps a
3-trial run of the whole suite near 25 minutes on a 2-core machine."""
QUIET_TIMEOUT_S = 60.0
TARGETS = (("raypod", "freeze", "detection_s", 1.5), ("raypod", "freeze", "resume_s", 1.0),
           ("raypod", "kill", "gap_s", 1.0))
"""Acceptance targets: ``(system, fault, figure, most seconds)`` for the figure's median."""

COMMANDS = {
    "raypod": "python -m raypod.cli run jobs/configs/mlp.yaml --quiet --set checkpoint.storage=<tmp> "
              f"--set name=rec-<fault>-<i> --set checkpoint.memory_every_steps=1 "
              f"--set 'fault.inject=[{{step: {KILL_AFTER + 1}, rank: 1, kind: <fault>}}]'",
    "ray_train_v2": "RAY_TRAIN_V2_ENABLED=1 python raypod/bench/anchors/mlp_ray_train.py "
                    "--workdir <tmp>/work --storage <tmp>/storage --name rec-ray-train-<fault>-<i> "
                    "--fault <fault>",
    "torchrun": "python -m torch.distributed.run --standalone --nproc-per-node 2 --max-restarts 2 "
                "raypod/bench/anchors/mlp_torchrun.py --workdir <tmp>/work --fault <fault>",
    "ray_train_torchft": "RAY_TRAIN_V2_ENABLED=1 python raypod/bench/anchors/mlp_ray_train_torchft.py "
                         "--workdir <tmp>/work --storage <tmp>/storage --name rec-ray-train-torchft-<fault>-<i> "
                         "--fault <fault>",
    "torchft": "python raypod/bench/anchors/mlp_torchft.py --workdir <tmp>/work --fault <fault>",
}
"""Each system's command; its fault-free reference run drops the fault (raypod: no ``fault.inject``;
the anchors: ``--no-kill``)."""
TORCHFT_SYSTEMS = ("ray_train_torchft", "torchft")
"""The systems whose replica groups keep training without the lost one (per-group step logs)."""
GLOBAL_BATCH = 32
"""Samples per step of ``mlp.yaml`` (what a checkpoint-restart system trains in every step)."""


_log = harness.logger("bench recovery")


def key(system: str, fault: str) -> str:
    """The results' key of a (system, fault) pair: ``"<system>:<fault>"``."""
    return f"{system}:{fault}"


def parse_faults(faults: str | Sequence[str]) -> tuple[str, ...]:
    """``"kill,freeze"`` (or a sequence) as a tuple of known faults, in the order given."""
    names = [f.strip() for f in (faults.split(",") if isinstance(faults, str) else faults) if f.strip()]
    bad = [f for f in names if f not in FAULTS]
    if bad or not names:
        raise ValueError(f"faults must be a comma-separated list of {', '.join(FAULTS)} (got {faults!r})")
    return tuple(dict.fromkeys(names))


# ---- figures -----------------------------------------------------------------------
def read_step_log(path: str | os.PathLike) -> list[tuple[int, float, int]]:
    """``(step, unix_time, attempt)`` per line of an anchor's step log, in file order (the replica
    groups' extra columns, ``samples,committed``, are ignored here: :func:`read_group_log` reads them)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            step, t, attempt = line.split(",")[:3]
            rows.append((int(step), float(t), int(attempt)))
    return rows


Line = tuple[int, float, int, int, bool]
"""``(step, unix_time, attempt, samples, committed)``: one step a replica group ran."""


def read_group_log(path: str | os.PathLike, default_samples: int = GLOBAL_BATCH) -> list[Line]:
    """Lines of a step log with samples: ``step,unix_time,attempt[,samples,committed]``.

    A 3-column line (the checkpoint-restart anchors, whose one group is the whole job) trained
    ``default_samples`` (the global batch) and committed.
    """
    out: list[Line] = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        parts = line.split(",")
        samples, committed = (int(parts[3]), parts[4].strip() == "1") if len(parts) >= 5 else (default_samples, True)
        out.append((int(parts[0]), float(parts[1]), int(parts[2]), samples, committed))
    return out


def kept_samples(lines: Sequence[Line]) -> int:
    """Samples of one group's log that the final state keeps: per step number, those of its last line
    when that committed (a replay after a restore supersedes the earlier run of the step)."""
    last: dict[int, int] = {}
    for step, _, _, samples, committed in lines:
        last[step] = samples if committed else 0
    return sum(last.values())


def throughput_goodput(samples: int | None, seconds: float | None, ref_samples: int | None,
                       ref_seconds: float | None) -> float | None:
    """Samples kept per second over the whole run, over the fault-free run's (None: a figure missing)."""
    if not (samples is not None and seconds and ref_samples and ref_seconds):
        return None
    return round((samples / seconds) / (ref_samples / ref_seconds), 3)


_MARKER_TIME = re.compile(r" at (\d+(?:\.\d+)?)\s*$")


def read_anchor_marker(path: str | os.PathLike) -> float | None:
    """The unix time in an anchor's fault marker (``<fault> after step N at T``); None when the
    fault never fired (no marker)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    m = _MARKER_TIME.search(text)
    if m is None:
        raise ValueError(f"fault marker {path} has no time: {text!r}")
    return float(m.group(1))


def anchor_figures(rows: list[tuple[int, float, int]], exit_code: int | None,
                   fault: str = "kill") -> dict[str, Any]:
    """Gap, steps replayed and recovered, from an anchor's step log (see the module doc).

    Detection and resume are left empty: the step log holds no time at which the anchor
    noticed the fault.
    """
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
        "detection_s": None,
        "resume_s": None,
        "replayed": (sum(1 for c in Counter(r[0] for r in rows).values() if c > 1) + 1) if after else None,
        "recovered": bool(after) and exit_code == 0 and final_step == MAX_STEPS,
    }
    if not after:
        out["why"] = f"no step completed after the {fault} (last step {before[-1][0]})"
    return out


def replica_figures(groups: dict[int, list[Line]], fault_time: float | None, exit_code: int | None,
                    fault: str = "kill", lost: int = 1) -> dict[str, Any]:
    """Gap, lost group back, steps redone, samples and recovered for the torchft anchors (per-group logs).

    A step completes when the last group that committed it logged it. **gap**: from the
    completion of the lost group's last step before the fault to that of the next step (the
    survivors may go on alone, so this flatters torchft); **lost_back_s**: from the fault to the first step the lost group
    trains (commits with samples) again (None: the survivors finished without it); **replayed**:
    step numbers some group ran and threw away (uncommitted); **narrow_steps**: steps trained by
    fewer groups than all (a smaller batch). Recovered: exit 0 with step ``MAX_STEPS`` done.
    """
    done: dict[int, float] = {}
    width: dict[int, int] = {}
    for lines in groups.values():
        for step, t, _, samples, committed in lines:
            if committed:
                done[step] = max(done.get(step, t), t)
                width[step] = width.get(step, 0) + samples
    if not done:
        raise RuntimeError("the step logs are empty")
    order = sorted(done.items(), key=lambda kv: kv[1])
    final_step = max(done)
    out: dict[str, Any] = {
        "final_step": final_step, "restored_from": "a live replica group (heal)", "detection_s": None,
        "resume_s": None, "gap_s": None, "lost_back_s": None,
        "attempts": {g: len({ln[2] for ln in lines}) for g, lines in groups.items()},
        "samples": sum(kept_samples(lines) for lines in groups.values()),
        "narrow_steps": sum(1 for w in width.values() if w < GLOBAL_BATCH),
        "replayed": len({ln[0] for lines in groups.values() for ln in lines if not ln[4]}),
    }
    if fault_time is not None:
        # The last step before the fault: the lost group's last commit before it (the survivor may log
        # that same step a moment after the fault fired).
        last = max((ln[0] for ln in groups.get(lost, []) if ln[1] <= fault_time and ln[4]),
                   default=max((s for s, t in order if t <= fault_time), default=None))
        after = [t for s, t in order if last is not None and s > last]
        if last in done and after:
            out["gap_s"] = round(min(after) - done[last], 3)
        back = [ln[1] for ln in groups.get(lost, []) if ln[1] > fault_time and ln[3] > 0 and ln[4]]
        if back:
            out["lost_back_s"] = round(back[0] - fault_time, 3)
    out["recovered"] = exit_code == 0 and final_step == MAX_STEPS and fault_time is not None
    if fault_time is None:
        out["why"] = f"the {fault} never fired (no marker)"
    elif final_step != MAX_STEPS:
        out["why"] = f"last step {final_step}"
    return out


def raypod_figures(summary: dict[str, Any], marker: dict[str, Any] | None = None,
                   fault: str = "kill") -> dict[str, Any]:
    """Gap, steps replayed, recovered, detection and resume, from raypod's ``summary.json`` and the
    rank's fault marker ``fired_0.json`` (``marker``; None when it is missing), see the module doc."""
    events = summary.get("events") or []
    ok = summary.get("status") == "succeeded" and summary.get("final_step") == MAX_STEPS
    out: dict[str, Any] = {"final_step": summary.get("final_step"), "status": summary.get("status"),
                           "failures": summary.get("failures"), "gap_s": None, "detection_s": None,
                           "resume_s": None, "replayed": None, "recovered": False}
    if marker is not None and marker.get("time") is not None:
        out["fault_time"] = marker["time"]
    if not events:
        out["why"] = f"summary.json has no failure event (the {fault} did not fire)"
        return out
    ev = events[0]
    out.update(event_kind=ev.get("kind"), event_step=ev.get("step"), restored_from=ev.get("restored_from"),
               lost_steps=ev.get("lost_steps"))
    if ev.get("resumed_s") is not None and ev.get("last_step_s") is not None:
        out["gap_s"] = round(ev["resumed_s"] - ev["last_step_s"], 3)
    if ev.get("resumed_s") is not None and ev.get("detected_s") is not None:
        out["resume_s"] = round(ev["resumed_s"] - ev["detected_s"], 3)
    if "fault_time" in out and ev.get("detected_s") is not None and summary.get("started_at") is not None:
        out["detection_s"] = round(summary["started_at"] + ev["detected_s"] - out["fault_time"], 3)
    if ev.get("lost_steps") is not None:
        out["replayed"] = int(ev["lost_steps"]) + 1
    out["recovered"] = ok and out["gap_s"] is not None
    if not ok:
        out["why"] = f"status {summary.get('status')}, final step {summary.get('final_step')}: " \
                     f"{(summary.get('error') or '')[:300]}"
    return out


# ---- processes ---------------------------------------------------------------------
def _cmdline(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None


def stuck_frame(dump: str) -> str | None:
    """Where a ``py-spy dump`` says the training was: the innermost frame of the first thread
    that runs this repository's code (the training thread, not an actor's idle event loop),
    with the innermost of this repository's frames when the two differ; else the first
    thread's innermost frame (None: no frame at all)."""
    threads: list[list[str]] = []
    for line in dump.splitlines():
        if line.startswith("Thread "):
            threads.append([])
        elif line.startswith("    ") and threads:
            threads[-1].append(line.strip())
    for frames in threads:
        ours = [f for f in frames if "(raypod/" in f]
        if ours:
            return frames[0] if frames[0] == ours[0] else f"{frames[0]} in {ours[0]}"
    return next((frames[0] for frames in threads if frames), None)


def _dump_one(spy: Path, pid: int, cmdline: str, frozen: bool, log: Any) -> str | None:
    """``py-spy dump`` one process into ``log``; returns where it was (:func:`stuck_frame`).

    A stopped process is read without attaching (``--nonblocking``): attaching to it
    would wait for a stop that never comes.
    """
    cmd = [str(spy), "dump", "--pid", str(pid)] + (["--nonblocking"] if frozen else [])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    state = "stopped (SIGSTOP)" if frozen else "running"
    log.write(f"\n==== py-spy dump of pid {pid}, {state} ({cmdline.strip()[:300]}) at timeout ====\n")
    log.write(r.stdout + r.stderr)
    return stuck_frame(r.stdout)


def _dump_stacks(tag: str, log_path: Path) -> str | None:
    """``py-spy dump`` the trial's processes into ``log_path``; returns where a worker was stuck.

    That is where a worker that still runs was (a survivor waiting on the faulted rank),
    else where a stopped one was, marked so.
    """
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        return None
    running, frozen = None, None
    with open(log_path, "w") as log:
        for pid in harness.tagged_pids(tag):
            cmdline = _cmdline(pid)
            if cmdline is None or not any(k in cmdline for k in ("anchors/mlp_", "raypod.cli", "ray::")):
                continue
            is_stopped = harness.stopped(pid)
            where = _dump_one(spy, pid, cmdline, is_stopped, log)
            worker = "ray::" in cmdline or ("mlp_torchrun" in cmdline and "distributed.run" not in cmdline) or (
                "mlp_torchft" in cmdline and "--replica" in cmdline and "distributed.run" not in cmdline)
            if not (where and worker and "(raypod/" in where):
                continue
            if is_stopped and frozen is None:
                frozen = f"{where} (the stopped rank)"
            elif not is_stopped and running is None:
                running = where
    return running or frozen


# ---- one trial ---------------------------------------------------------------------
REFERENCE = "none"
"""The pseudo-fault of a system's fault-free reference run (one per system and invocation)."""


def _command(system: str, fault: str, i: int, tmp: Path, torchrun_fresh_store: bool = False
             ) -> tuple[list[str], dict[str, str]]:
    """``system``'s command line and extra environment; ``fault`` :data:`REFERENCE`: no fault."""
    py = sys.executable
    anchors = harness.REPO / "raypod/bench/anchors"
    extra: dict[str, str] = {}
    no_fault = ["--no-kill"] if fault == REFERENCE else ["--fault", fault]
    if system == "raypod":
        inject = "[]" if fault == REFERENCE else f"[{{step: {KILL_AFTER + 1}, rank: 1, kind: {fault}}}]"
        cmd = [py, "-m", "raypod.cli", "run", "jobs/configs/mlp.yaml", "--quiet",
               "--set", f"checkpoint.storage={tmp / 'storage'}", "--set", f"name=rec-{fault}-{i}",
               "--set", "checkpoint.memory_every_steps=1", "--set", f"fault.inject={inject}"]
    elif system in ("ray_train_v2", "ray_train_torchft"):
        script = "mlp_ray_train.py" if system == "ray_train_v2" else "mlp_ray_train_torchft.py"
        cmd = [py, str(anchors / script), "--workdir", str(tmp / "work"), "--storage", str(tmp / "storage"),
               "--name", f"rec-{'ray-train' if system == 'ray_train_v2' else 'ray-train-torchft'}-{fault}-{i}",
               "--steps", str(MAX_STEPS), *no_fault]
        extra["RAY_TRAIN_V2_ENABLED"] = "1"
    elif system == "torchrun":
        cmd = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", "2", str(anchors / "mlp_torchrun.py"),
               "--workdir", str(tmp / "work"), "--steps", str(MAX_STEPS), *no_fault]
        if torchrun_fresh_store:
            extra["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    elif system == "torchft":
        cmd = [py, str(anchors / "mlp_torchft.py"), "--workdir", str(tmp / "work"), "--steps", str(MAX_STEPS),
               *no_fault]
    else:
        raise ValueError(f"unknown system '{system}'")
    return cmd, extra


def _digest(system: str, fault: str, i: int, tmp: Path) -> str | None:
    """The final state's digest: raypod's ``final_state_sha256``, an anchor's ``final_state.sha256``."""
    if system == "raypod":
        summary = json.loads((tmp / "storage" / f"rec-{fault}-{i}" / "summary.json").read_text())
        return summary.get("final_state_sha256")
    path = tmp / "work" / "final_state.sha256"
    return path.read_text().strip() if path.exists() else None


def _group_logs(work: Path) -> dict[int, list[Line]]:
    """A torchft anchor's per-group logs ``steps.rg<g>.log``, by group."""
    return {int(p.name[len("steps.rg"):-len(".log")]): read_group_log(p) for p in work.glob("steps.rg*.log")}


def _samples_and_back(system: str, fault: str, i: int, tmp: Path, out: dict[str, Any]) -> None:
    """Samples the final state keeps and (faulted runs) seconds until the lost rank trains again, for
    raypod and the checkpoint-restart anchors (the torchft anchors have them from :func:`replica_figures`)."""
    if system == "raypod":
        summary = json.loads((tmp / "storage" / f"rec-{fault}-{i}" / "summary.json").read_text())
        final = summary.get("final_step") or 0
        out["samples"] = final * GLOBAL_BATCH  # a restore replays the lost steps: every kept step is whole
        ev = (summary.get("events") or [None])[0]
        if ev and out.get("fault_time") is not None and ev.get("resumed_s") is not None:
            out["lost_back_s"] = round(summary["started_at"] + ev["resumed_s"] - out["fault_time"], 3)
        return
    out["samples"] = kept_samples(read_group_log(tmp / "work" / "steps.log"))
    if out.get("fault_time") is not None:
        rows = read_step_log(tmp / "work" / "steps.log")
        after = [t for _, t, a in rows if a != rows[0][2] and t > out["fault_time"]]
        out["lost_back_s"] = round(after[0] - out["fault_time"], 3) if after else None


def _figures(system: str, fault: str, i: int, tmp: Path, rc: int | None) -> dict[str, Any]:
    """The trial's figures from what it left in ``tmp`` (raypod: summary and marker; anchors:
    step logs, marker and digest); a :data:`REFERENCE` run: completed, samples, digest."""
    work = tmp / "work"
    if system in TORCHFT_SYSTEMS:
        fault_time = None if fault == REFERENCE else read_anchor_marker(work / "kill.marker")
        out = replica_figures(_group_logs(work), fault_time, rc, fault)
        if fault_time is not None:
            out["fault_time"] = fault_time
        if fault == REFERENCE:
            out.update(recovered=rc == 0 and out["final_step"] == MAX_STEPS, why=None)
    elif system == "raypod":
        job_dir = tmp / "storage" / f"rec-{fault}-{i}"
        summary = json.loads((job_dir / "summary.json").read_text())
        marker_path = job_dir / "faults" / "fired_0.json"
        marker = json.loads(marker_path.read_text()) if marker_path.exists() else None
        out = raypod_figures(summary, marker, fault)
        if fault == REFERENCE:
            out.update(recovered=summary.get("status") == "succeeded" and summary.get("final_step") == MAX_STEPS,
                       why=None)
        _samples_and_back(system, fault, i, tmp, out)
    else:
        rows = read_step_log(work / "steps.log")
        out = anchor_figures(rows, rc, fault) if fault != REFERENCE else {
            "final_step": max(r[0] for r in rows), "recovered": rc == 0 and max(r[0] for r in rows) == MAX_STEPS}
        fault_time = read_anchor_marker(work / "kill.marker")
        if fault_time is not None:
            out["fault_time"] = fault_time
        _samples_and_back(system, fault, i, tmp, out)
    out["digest"] = _digest(system, fault, i, tmp)
    return {k: v for k, v in out.items() if not (k == "why" and v is None)}


def run_trial(system: str, fault: str, i: int, logs: Path, torchrun_fresh_store: bool = False
              ) -> dict[str, Any]:
    """Run ``system`` once with ``fault`` (:data:`REFERENCE`: the fault-free run); returns its figures
    (see the module doc)."""
    name = f"{system}-{fault}-{i}"
    trial = harness.Trial.new("rpr-", logs / f"{name}.log", ("storage", "work"))
    cmd, extra = _command(system, fault, i, trial.tmp, torchrun_fresh_store)
    env = trial.env(extra, (*harness.SCRUB, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"))
    timeout_s = TRIAL_TIMEOUT_S.get(fault, TRIAL_TIMEOUT_S["kill"])
    rec: dict[str, Any] = {"system": system, "fault": fault, "trial": i, "gap_s": None, "detection_s": None,
                           "resume_s": None, "replayed": None, "lost_back_s": None, "samples": None,
                           "digest": None, "recovered": False, "timeout_s": timeout_s}
    with harness.launched(cmd, env, trial.log_path) as (proc, t0):
        rc = harness.wait_rc(proc, timeout_s)
        rec["process_s"] = round(time.time() - t0, 2)
        if rc is None:
            rec["stacks"] = str(logs / f"{name}.stacks.txt")
            rec["stuck_in"] = _dump_stacks(trial.tag, Path(rec["stacks"]))
    rec["exit_code"] = rc
    try:
        rec.update(_figures(system, fault, i, trial.tmp, rc))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        rec["recovered"] = False
        rec["why"] = f"{type(e).__name__}: {e}"
    if rc is None:
        rec["recovered"] = False
        rec["why"] = f"timed out after {timeout_s:.0f}s" + (f"; {rec['why']}" if rec.get("why") else "") + (
            f"; a worker stuck in {rec['stuck_in']}" if rec.get("stuck_in") else "")
    elif rc != 0:
        rec["recovered"] = False
        rec["why"] = f"exit code {rc}" + (f": {rec['why']}" if rec.get("why") else "")
    if not rec["recovered"]:
        rec["cause"] = harness.cause(trial.log_path)
        rec["log_tail"] = harness.tail(trial.log_path)
    rec["log"] = str(trial.log_path)
    return trial.finish(rec, QUIET_TIMEOUT_S, _log)


# ---- the suite ---------------------------------------------------------------------
FIGURES = ("gap_s", "detection_s", "resume_s", "replayed", "goodput_tput", "lost_back_s")
"""The per-trial figures whose medians (over recovered trials) the suite reports."""


def _median_of(recs: list[dict[str, Any]], figure: str) -> float | None:
    return table.median(r[figure] for r in recs if r["recovered"] and r.get(figure) is not None)


def parse_systems(systems: str | Sequence[str]) -> tuple[str, ...]:
    """``"raypod,torchft"`` (or a sequence) as a tuple of known systems, in :data:`SYSTEMS` order."""
    names = {s.strip() for s in (systems.split(",") if isinstance(systems, str) else systems) if s.strip()}
    bad = sorted(names - set(SYSTEMS))
    if bad or not names:
        raise ValueError(f"systems must be a comma-separated list of {', '.join(SYSTEMS)} (got {systems!r})")
    return tuple(s for s in SYSTEMS if s in names)


def apply_references(trials: dict[str, list[dict[str, Any]]], refs: dict[str, dict[str, Any]]) -> None:
    """Set each trial's throughput goodput and whether its final state equals its system's fault-free run.

    ``goodput_tput`` = (kept samples / process seconds) / the same of the system's reference run
    (:func:`throughput_goodput`); ``state_equal`` = its digest equals the reference's (None when
    either run has no digest or the reference did not complete).
    """
    for recs in trials.values():
        for r in recs:
            ref = refs.get(r["system"]) or {}
            ok = bool(ref.get("recovered"))
            r["goodput_tput"] = throughput_goodput(r.get("samples"), r.get("process_s"), ref.get("samples"),
                                                   ref.get("process_s")) if ok else None
            both = ok and r.get("digest") is not None and ref.get("digest") is not None
            r["state_equal"] = (r["digest"] == ref["digest"]) if both else None


def summarise(trials: dict[str, list[dict[str, Any]]], faults: Sequence[str] = FAULTS,
              systems: Sequence[str] = SYSTEMS) -> dict[str, Any]:
    """Medians per (system, fault) over recovered trials, the gap ratios per fault, the targets."""
    medians: dict[str, dict[str, Any]] = {}
    for k, recs in trials.items():
        medians[k] = {f: _median_of(recs, f) for f in FIGURES}
        medians[k]["recovered"] = f"{sum(1 for r in recs if r['recovered'])}/{len(recs)}"
        equal = [r["state_equal"] for r in recs if r.get("state_equal") is not None]
        medians[k]["state_equal"] = f"{sum(equal)}/{len(equal)}" if equal else None
    ratios = {f: table.ratios_vs({s: medians.get(key(s, f), {}).get("gap_s") for s in systems}, "raypod",
                                 systems) for f in faults}
    return {"median": medians, "ratios": ratios, "targets": targets(medians)}


def targets(medians: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each of :data:`TARGETS` with its median (when measured) and whether it is met (None: no data)."""
    out = []
    for system, fault, figure, most in TARGETS:
        m = medians.get(key(system, fault))
        if m is None:
            continue  # that fault (or raypod) was not run
        value = m.get(figure)
        out.append({"system": system, "fault": fault, "figure": figure, "at_most_s": most, "median": value,
                    "trials": m["recovered"], "met": None if value is None else value <= most})
    return out


def targets_line(result: dict[str, Any]) -> str:
    """``targets: raypod freeze detection 0.84 s ≤ 1.5 s met; ...`` from ``result["targets"]``."""
    names = {"detection_s": "detection", "resume_s": "resume after detection", "gap_s": "gap"}
    parts = []
    for t in result["targets"]:
        verdict = {True: "met", False: "NOT MET", None: "NOT MET (no recovered trial)"}[t["met"]]
        parts.append(f"{t['system']} {t['fault']} {names[t['figure']]} {fmt(t['median'], '.2f')} s "
                     f"≤ {t['at_most_s']:g} s: {verdict}")
    n = result["trials_per_system"]
    return f"acceptance targets (median of {n} trial{'s' if n != 1 else ''}, recovered trials only): " + \
        ("; ".join(parts) if parts else "none (raypod not run)")


def _order(faults: Sequence[str], systems: Sequence[str] = SYSTEMS) -> list[str]:
    """The (system, fault) keys in the order a round runs them: every system per fault."""
    return [key(s, f) for f in faults for s in systems]


def _equal(value: bool | None) -> str:
    return {True: "yes", False: "no", None: fmt(None)}[value]


def _rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    keys = _order(result["faults"], result.get("systems") or SYSTEMS)
    for k in keys:
        for r in result["trials"][k]:
            rows.append([LABELS[r["system"]], r["fault"], str(r["trial"]), fmt(r["gap_s"], ".2f"),
                         fmt(r.get("detection_s"), ".2f"), fmt(r.get("resume_s"), ".2f"), fmt(r["replayed"]),
                         "yes" if r["recovered"] else f"NO ({r.get('why', '?').split(';')[0][:60]})",
                         fmt(r.get("restored_from")), fmt(r.get("goodput_tput"), ".2f"),
                         fmt(r.get("lost_back_s"), ".2f"), _equal(r.get("state_equal"))])
    for k in keys:
        s, f = k.split(":")
        m = result["median"][k]
        ratio = result["ratios"][f].get(f"raypod/{s}")
        rows.append([f"**{LABELS[s]}**", f, "median", fmt(m["gap_s"], ".2f"), fmt(m["detection_s"], ".2f"),
                     fmt(m["resume_s"], ".2f"), fmt(m["replayed"]), m["recovered"],
                     "gap ratio 1.00" if s == "raypod" else f"gap ratio raypod/this {fmt(ratio, '.2f')}",
                     fmt(m.get("goodput_tput"), ".2f"), fmt(m.get("lost_back_s"), ".2f"),
                     fmt(m.get("state_equal"))])
    return rows


HEADER = ["system", "fault", "trial", "gap (s)", "detection (s)", "resume after detection (s)",
          "steps replayed", "recovered", "restored from / ratio", "samples/s vs fault-free",
          "lost rank trains again (s)", "final state = fault-free"]


def markdown_table(result: dict[str, Any]) -> str:
    return table.markdown_table(HEADER, _rows(result), "|---|---|---|---:|---:|---:|---:|---|---|---:|---:|---|")


def print_table(result: dict[str, Any]) -> None:
    table.print_table(f"recovery: rank 1 {' or '.join(result['faults'])} after step {KILL_AFTER} "
                      "(mlp.yaml, 2 CPU ranks, checkpoint every 10 steps)", HEADER, _rows(result),
                      lambda k: k in (3, 4, 5, 6, 9, 10))
    print(targets_line(result))


DEFINITIONS = {
    "fault": "kill: rank 1's process exits (os._exit) right after step 25; freeze: it stops itself "
             "with SIGSTOP there (alive, sockets open, nothing answers). Anchors' process groups: "
             "Ray Train TorchConfig timeout_s=1800 (plus its 600 s worker health-check timeout); "
             "torchrun's init_process_group('gloo') default timeout, 1800 s; the torchft anchors: "
             "replica group 1 (one rank) faults, torchft's gloo group times out in 5 s (standalone) "
             "or 30 s (Ray Train), its lighthouse drops a silent group after 5 s without heartbeats",
    "gap_s": f"seconds from the completion of the last step before the fault (step {KILL_AFTER}) "
             "to the completion of the first step after it (raypod: summary events[0] "
             "resumed_s - last_step_s on the driver; anchors: rank 0's step log, right after "
             "optimizer.step(); torchft anchors: any group's, so the survivor going on alone ends "
             "the gap: the gap alone flatters torchft)",
    "detection_s": "raypod only: seconds from the fault's own time (its marker fired_0.json, written by "
                   "the rank just before the fault) to the driver's detection (summary started_at + "
                   "events[0].detected_s); the anchors record no detection time",
    "resume_s": "raypod only: seconds from the detection to the first step completed after it "
                "(events[0].resumed_s - detected_s)",
    "replayed": "step numbers completed before the fault and again after it, + 1 for the "
                "interrupted step (raypod: events[0].lost_steps + 1; anchors: step numbers "
                "logged more than once + 1; torchft anchors: step numbers a group ran and did not "
                "commit, which its log records)",
    "recovered": f"exit 0 and last step {MAX_STEPS} (raypod: status succeeded, final_step "
                 f"{MAX_STEPS}) within the trial timeout (kill {TRIAL_TIMEOUT_S['kill']:.0f} s, "
                 f"freeze {TRIAL_TIMEOUT_S['freeze']:.0f} s)",
    "goodput_tput": "throughput goodput: samples the final state keeps per second of the whole run "
                    "(launch to exit), over the same system's fault-free run in this invocation "
                    f"(raypod: final_step x {GLOBAL_BATCH}; checkpoint-restart anchors: {GLOBAL_BATCH} per "
                    "step number in rank 0's log; torchft anchors: each group's committed samples, so "
                    "steps trained by one group count half)",
    "lost_back_s": "seconds from the fault to the first step the lost rank trains again (raypod: "
                   "started_at + events[0].resumed_s; checkpoint-restart anchors: the restarted group's "
                   "first step; torchft anchors: the lost group's first committed step with samples; "
                   "none: the survivors finished without it)",
    "state_equal": "the final state's sha256 (raypod: final_state_sha256; the anchors: "
                   "final_state.sha256, the same full model + optimizer digest) equals the system's "
                   "fault-free run's",
}
"""What each column means (written into recovery.json and recovery.md)."""

MATH = {
    "raypod": "restores the exact state of the last completed step (an in-memory snapshot of every "
              "step, here) and replays only the interrupted step with the same samples: the training "
              "math is the fault-free run's, bit for bit (final_state_sha256 equal)",
    "ray_train_v2": "restart from checkpoint: every worker restarts and loads the last persistent "
                    "checkpoint (every 10 steps), then replays the steps since with the same samples: "
                    "identical math, the replayed steps and the restart are lost time",
    "torchrun": "restart from checkpoint, as Ray Train: the agent restarts every rank, which load the "
                "last checkpoint and replay the steps since: identical math, lost time",
    "ray_train_torchft": "the surviving replica group goes on alone (torchft's quorum drops the lost "
                         "one) while Ray Train replaces only the lost group, which then heals from the "
                         "survivor's live state: the steps trained alone average the gradient of a "
                         "smaller global batch (16 of 32 samples), so the final state differs from "
                         "the fault-free run; few or no steps are redone",
    "torchft": "as with TorchftConfig: the survivor trains at half width while the lost group's "
               "torchrun restarts it and it heals from the survivor: the global batch of those steps "
               "is smaller and the final state differs from the fault-free run",
}
"""What each system's recovery does to the training math (one paragraph per system in the markdown)."""


def run_recovery_bench(trials: int = 3, out: str | os.PathLike | None = "benchmarks/results",
                       torchrun_fresh_store: bool = False, faults: str | Sequence[str] = FAULTS,
                       systems: str | Sequence[str] = SYSTEMS) -> dict[str, Any]:
    """Run the suite: one fault-free reference run per system, then ``trials`` interleaved rounds over
    (system, fault); write JSON and Markdown.

    ``faults`` is ``"kill,freeze"`` or a sequence of :data:`FAULTS`; ``systems`` a subset of
    :data:`SYSTEMS`. ``torchrun_fresh_store`` runs torchrun with
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (see the module doc); off by default, so torchrun is
    measured as shipped.
    """
    if trials < 1:
        raise ValueError("trials must be at least 1")
    faults, systems = parse_faults(faults), parse_systems(systems)
    harness.warm_page_cache()
    session = harness.Session.open("recovery", lambda logs: f"{trials} trial(s) per system and fault, "
                                   f"interleaved, after one fault-free run per system; subprocess logs in {logs}",
                                   _log, QUIET_TIMEOUT_S)
    refs = {}
    for s in systems:
        refs[s] = run_trial(s, REFERENCE, 0, session.logs, torchrun_fresh_store)
        _log(f"{s} fault-free: {refs[s].get('samples')} samples in {refs[s]['process_s']:.1f}s"
             + ("" if refs[s]["recovered"] else f" (NOT COMPLETED: {refs[s].get('why')})"))

    def run_one(k: str, i: int) -> dict[str, Any]:
        system, fault = k.split(":")
        return run_trial(system, fault, i, session.logs, torchrun_fresh_store)

    by_key, order = harness.interleave(_order(faults, systems), trials, run_one, _describe, _log, width=20)
    apply_references(by_key, refs)
    result: dict[str, Any] = {
        "suite": "recovery",
        "definitions": DEFINITIONS,
        "math": {s: MATH[s] for s in systems},
        "date": session.date,
        "machine": session.machine(),
        "command": f"run_recovery_bench(trials={trials}, torchrun_fresh_store={torchrun_fresh_store}, "
                   f"faults={','.join(faults)!r}, systems={','.join(systems)!r})",
        "torchrun_env": {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} if torchrun_fresh_store else {},
        "system_commands": {s: COMMANDS[s] for s in systems},
        "workload": "jobs/configs/mlp.yaml: 4 x [Linear(512->2048), GELU, Linear(2048->512)], FSDP2 "
                    "per block + root, gloo, 2 CPU ranks, global batch 32 (16 per rank) of random "
                    "normal inputs, loss mean(out^2), AdamW lr 1e-3, 60 steps, persistent checkpoint "
                    f"every 10 steps, rank 1 faulted once right after step {KILL_AFTER} (the torchft "
                    "anchors: 2 replica groups of one rank with the whole model, DDP over the quorum, "
                    "no persistent checkpoint)",
        "faults": list(faults),
        "systems": list(systems),
        "trial_timeout_s": {f: TRIAL_TIMEOUT_S[f] for f in faults},
        "trials_per_system": trials,
        "references": refs,
        "order": order,
        "trials": by_key,
        **summarise(by_key, faults, systems),
    }
    print_table(result)
    table.write_results(result, out, "recovery", markdown(result, torchrun_fresh_store), _log)
    return result


def _describe(rec: dict[str, Any]) -> str:
    """A trial's progress line."""
    if rec["fault"] == REFERENCE:
        what = f"fault-free run: {'completed' if rec['recovered'] else 'NOT COMPLETED'}, {rec.get('samples')} samples"
    elif rec["recovered"]:
        what = f"gap {fmt(rec['gap_s'], '.2f')}s, {rec['replayed']} steps replayed, recovered"
        if rec.get("lost_back_s") is not None:
            what += f", lost rank training again {rec['lost_back_s']:.2f}s after the fault"
        if rec.get("detection_s") is not None:
            what += f" (detected {rec['detection_s']:.2f}s after the fault"
            what += f", resumed {rec['resume_s']:.2f}s later)" if rec.get("resume_s") is not None else ")"
    else:
        what = f"NOT RECOVERED ({rec.get('why')}; cause: {rec.get('cause')})"
    stopped = f", {len(rec['killed_stopped'])} stopped process(es) SIGKILLed" if rec.get("killed_stopped") else ""
    return f"{what} (process ran {rec['process_s']:.1f}s, drained in {rec['drain_s']:.1f}s{stopped})"


def markdown(result: dict[str, Any], torchrun_fresh_store: bool = False) -> str:
    """``recovery.md``: the table, the targets, the definitions, the trials that did not recover, the
    commands."""
    m = result["machine"]
    defs = result["definitions"]
    systems = result.get("systems") or SYSTEMS
    failed = [f"{LABELS[r['system']]} {r['fault']} trial {r['trial']}: {r.get('why')}"
              + (f"; cause: `{r['cause']}`" if r.get("cause") else "")
              + (f"; stacks in `{r['stacks']}`" if r.get("stacks") else "")
              for k in _order(result["faults"], systems) for r in result["trials"][k] if not r["recovered"]]
    refs = result.get("references") or {}
    ref_line = "; ".join(f"{LABELS[s]}: {fmt(r.get('samples'))} samples in {fmt(r.get('process_s'), '.1f')} s"
                         + ("" if r.get("recovered") else " (did NOT complete)") for s, r in refs.items())
    return "\n".join([
        "# recovery: a worker killed or frozen mid-run",
        "",
        f"{table.machine_line(result['date'], m)}; load average "
        f"{m['loadavg_before'][0]} before, {m['loadavg_after'][0]} after.",
        f"Command: `{result['command']}` (`python -m raypod.bench.recovery --trials "
        f"{result['trials_per_system']} --faults {','.join(result['faults'])}"
        f"{'' if tuple(systems) == SYSTEMS else ' --systems ' + ','.join(systems)}"
        f"{' --torchrun-fresh-store' if torchrun_fresh_store else ''}`). "
        f"Trials interleaved over (system, fault) in the order {', '.join(_order(result['faults'], systems))}, "
        "...; each a cold subprocess.",
        "",
        f"Fault-free reference runs (one per system, same invocation): {ref_line or 'none'}.",
        "",
        f"Workload: {result['workload']}.",
        "",
        markdown_table(result),
        "",
        f"**{targets_line(result)}**",
        "",
        f"- **fault**: {defs['fault']}.",
        f"- **gap**: {defs['gap_s']}.",
        f"- **detection**: {defs['detection_s']}.",
        f"- **resume after detection**: {defs['resume_s']}.",
        f"- **steps replayed**: {defs['replayed']}.",
        f"- **recovered**: {defs['recovered']}.",
        f"- **samples/s vs fault-free**: {defs['goodput_tput']}.",
        f"- **lost rank trains again**: {defs['lost_back_s']}.",
        f"- **final state = fault-free**: {defs['state_equal']}.",
        "- torchrun ran " + ("with `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1` (a fresh rendezvous "
                             "store per restart)" if torchrun_fresh_store else
                             "as shipped (its rendezvous store shared with the workers; a restart "
                             "can read the dead group's gloo addresses, pytorch/pytorch#135712)") + ".",
        "- Medians are over recovered trials; the ratio is raypod's median gap over the "
        "system's for the same fault (below 1: raypod recovers faster).",
        "",
        "What each system's recovery does to the training math:",
        "",
        *[f"- **{LABELS[s]}**: {text}." for s, text in result.get("math", MATH).items()],
        "",
        *table.problems_md("Trials that did not recover:", failed),
        *table.commands_md({s: LABELS[s] for s in systems}, result.get("system_commands", COMMANDS)),
    ])


run = run_recovery_bench
"""Entry point for ``raypod bench recovery`` (called with ``trials=``, ``out=``, ``faults=``, ``systems=``)."""


def main(argv: list[str] | None = None) -> int:
    p = harness.suite_parser("raypod vs Ray Train V2, torchrun and torchft: recovery from a killed or "
                             "frozen worker")
    p.add_argument("--faults", default=",".join(FAULTS),
                   help="comma-separated faults to run: kill, freeze (default both)")
    p.add_argument("--torchrun-fresh-store", action="store_true",
                   help="run torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (see the module doc)")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"comma-separated systems to run (default all: {', '.join(SYSTEMS)})")
    args = p.parse_args(argv)
    try:
        faults, systems = parse_faults(args.faults), parse_systems(args.systems)
    except ValueError as e:
        p.error(str(e))
    result = run_recovery_bench(trials=args.trials, out=args.out, torchrun_fresh_store=args.torchrun_fresh_store,
                                faults=faults, systems=systems)
    print(json.dumps({"median": result["median"], "ratios": result["ratios"], "targets": result["targets"]},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
