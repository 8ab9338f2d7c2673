"""The recovery suite's fault dimension: figures per (system, fault), medians, targets, the table,
the anchors' fault and the harness's cleanup of a stopped rank. No Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from raypod.bench import recovery as rec
from raypod.bench import trials as harness
from raypod.cli import _bench, build_parser


def _rows(start_t: float, steps: range, dt: float, attempt: int = 0) -> list[tuple[int, float, int]]:
    return [(s, start_t + i * dt, attempt) for i, s in enumerate(steps)]


def _summary(started_at: float, detected_s: float, resumed_s: float, last_step_s: float,
             lost_steps: int = 0, status: str = "succeeded", final_step: int = rec.MAX_STEPS) -> dict:
    return {"status": status, "final_step": final_step, "failures": 1, "started_at": started_at,
            "events": [{"kind": "hang", "step": 26, "detected_s": detected_s, "resumed_s": resumed_s,
                        "last_step_s": last_step_s, "lost_steps": lost_steps, "restored_from": "memory"}]}


# ---- per-trial figures ---------------------------------------------------------------
def test_anchor_freeze_restored_from_a_checkpoint():
    # Steps 1..25 one per second (t = 100..124), the frozen group noticed late, restart from step 20.
    rows = _rows(100.0, range(1, 26), 1.0) + _rows(190.0, range(21, 61), 1.0, attempt=1)
    fig = rec.anchor_figures(rows, 0, "freeze")
    assert fig["gap_s"] == pytest.approx(66.0)  # 190.0 - 124.0
    assert fig["replayed"] == 6  # 21..25 again, + the interrupted 26
    assert fig["restored_from"] == "checkpoint step 20"
    assert fig["recovered"] is True
    assert fig["detection_s"] is None and fig["resume_s"] is None  # nothing honest to measure


def test_anchor_freeze_never_noticed_is_not_recovered():
    rows = _rows(100.0, range(1, 26), 1.0)
    fig = rec.anchor_figures(rows, None, "freeze")
    assert fig["recovered"] is False and fig["gap_s"] is None and fig["replayed"] is None
    assert "after the freeze" in fig["why"] and "last step 25" in fig["why"]


def test_raypod_detection_is_from_the_markers_time_and_resume_from_the_detection():
    # Driver started at 1000.0; step 25 completed at driver time 30.0; the rank froze at unix
    # 1030.2; the driver noticed at 31.1 (unix 1031.1) and step 26 completed at 31.6.
    summary = _summary(1000.0, detected_s=31.1, resumed_s=31.6, last_step_s=30.0)
    fig = rec.raypod_figures(summary, {"time": 1030.2, "kind": "freeze"}, "freeze")
    assert fig["detection_s"] == pytest.approx(0.9)
    assert fig["resume_s"] == pytest.approx(0.5)
    assert fig["gap_s"] == pytest.approx(1.6)
    assert fig["replayed"] == 1
    assert fig["recovered"] is True


def test_raypod_without_a_marker_has_no_detection_but_keeps_its_gap():
    fig = rec.raypod_figures(_summary(1000.0, 31.1, 31.6, 30.0), None, "freeze")
    assert fig["detection_s"] is None
    assert fig["gap_s"] == pytest.approx(1.6) and fig["resume_s"] == pytest.approx(0.5)


def test_raypod_fault_that_never_fired():
    fig = rec.raypod_figures({"status": "succeeded", "final_step": 60, "events": []}, None, "freeze")
    assert fig["recovered"] is False and "freeze did not fire" in fig["why"]


def test_anchor_marker_time(tmp_path: Path):
    marker = tmp_path / "kill.marker"
    assert rec.read_anchor_marker(marker) is None  # never fired
    marker.write_text("freeze after step 25 at 1712345678.123456\n")
    assert rec.read_anchor_marker(marker) == pytest.approx(1712345678.123456)
    marker.write_text("garbage\n")
    with pytest.raises(ValueError):
        rec.read_anchor_marker(marker)


_DUMP = """Process 31775: ray::RayTrainWorker
Python v3.11.7 (/root/.pyenv/versions/3.11.7/bin/python3.11)

Thread 31775 (idle): "MainThread"
    Worker.main_loop (ray/_private/worker.py:1069)
    <module> (ray/_private/workers/default_worker.py:323)
Thread 32000 (idle): "TrainingThread(train_fn_with_final_checkpoint_flush)"
    all_gather_single (torch/distributed/distributed_c10d.py:4394)
    foreach_all_gather (torch/distributed/fsdp/_fully_shard/_fsdp_collectives.py:364)
    MLP.forward (raypod/recipes/mlp.py:44)
    MLPRun.step (raypod/bench/anchors/mlp_common.py:107)
    train_loop_per_worker (raypod/bench/anchors/mlp_ray_train.py:70)
    Thread.run (threading.py:982)
"""


def test_stuck_frame_is_the_training_threads_not_the_event_loops():
    assert rec.stuck_frame(_DUMP) == ("all_gather_single (torch/distributed/distributed_c10d.py:4394) "
                                      "in MLP.forward (raypod/recipes/mlp.py:44)")
    idle = _DUMP.split("Thread 32000")[0]
    assert rec.stuck_frame(idle) == "Worker.main_loop (ray/_private/worker.py:1069)"
    assert rec.stuck_frame("") is None


# ---- medians, ratios and targets -------------------------------------------------------
def _trial(system: str, fault: str, i: int, gap: float | None, detection: float | None = None,
           resume: float | None = None, recovered: bool = True) -> dict:
    return {"system": system, "fault": fault, "trial": i, "gap_s": gap, "detection_s": detection,
            "resume_s": resume, "replayed": 1 if recovered else None, "recovered": recovered,
            **({} if recovered else {"why": "timed out after 120s, a worker stuck in allreduce"})}


def _suite(raypod_freeze: list[tuple[float, float, float]], raypod_kill_gaps: list[float]) -> dict:
    trials = {rec.key(s, f): [] for f in rec.FAULTS for s in rec.SYSTEMS}
    for i, (gap, det, res) in enumerate(raypod_freeze, 1):
        trials["raypod:freeze"].append(_trial("raypod", "freeze", i, gap, det, res))
    for i, gap in enumerate(raypod_kill_gaps, 1):
        trials["raypod:kill"].append(_trial("raypod", "kill", i, gap))
    for i in range(1, len(raypod_kill_gaps) + 1):
        trials["torchrun:kill"].append(_trial("torchrun", "kill", i, 2.0 * i))
        trials["torchrun:freeze"].append(_trial("torchrun", "freeze", i, None, recovered=False))
        trials["ray_train_v2:kill"].append(_trial("ray_train_v2", "kill", i, 4.0))
        trials["ray_train_v2:freeze"].append(_trial("ray_train_v2", "freeze", i, None, recovered=False))
    return {"faults": list(rec.FAULTS), "trials": trials, "trials_per_system": len(raypod_kill_gaps),
            **rec.summarise(trials)}


def test_medians_per_system_and_fault_and_targets_met():
    result = _suite([(1.4, 0.9, 0.4), (1.6, 1.1, 0.5), (1.5, 1.0, 0.6)], [0.8, 0.7, 2.0])
    med = result["median"]
    assert med["raypod:freeze"]["detection_s"] == pytest.approx(1.0)
    assert med["raypod:freeze"]["resume_s"] == pytest.approx(0.5)
    assert med["raypod:kill"]["gap_s"] == pytest.approx(0.8)
    assert med["torchrun:freeze"]["gap_s"] is None and med["torchrun:freeze"]["recovered"] == "0/3"
    assert med["torchrun:kill"]["gap_s"] == pytest.approx(4.0)
    assert result["ratios"]["kill"]["raypod/torchrun"] == pytest.approx(0.2)
    assert result["ratios"]["freeze"]["raypod/torchrun"] is None
    assert [t["met"] for t in result["targets"]] == [True, True, True]
    line = rec.targets_line(result)
    assert "median of 3 trials" in line and "NOT MET" not in line and line.count(": met") == 3


def test_targets_not_met_when_the_median_is_above_or_missing():
    result = _suite([(2.0, 1.6, 0.4)], [1.2])
    by_figure = {(t["fault"], t["figure"]): t["met"] for t in result["targets"]}
    assert by_figure == {("freeze", "detection_s"): False, ("freeze", "resume_s"): True,
                         ("kill", "gap_s"): False}
    result["trials"]["raypod:freeze"][0]["recovered"] = False  # a freeze raypod did not recover from
    result.update(rec.summarise(result["trials"]))
    line = rec.targets_line(result)
    assert "freeze detection — s ≤ 1.5 s: NOT MET (no recovered trial)" in line


def test_only_the_faults_run_are_summarised_and_targeted():
    trials = {rec.key(s, "kill"): [_trial(s, "kill", 1, 0.5)] for s in rec.SYSTEMS}
    result = rec.summarise(trials, ("kill",))
    assert set(result["ratios"]) == {"kill"}
    assert [(t["fault"], t["figure"]) for t in result["targets"]] == [("kill", "gap_s")]


def test_table_has_a_fault_column_and_a_median_row_per_system_and_fault():
    result = _suite([(1.4, 0.9, 0.4)], [0.8])
    rows = rec._rows(result)
    assert rec.HEADER[1] == "fault" and all(len(r) == len(rec.HEADER) for r in rows)
    medians = [(r[0].strip("*"), r[1]) for r in rows if r[2] == "median"]
    assert len(medians) == len(rec.SYSTEMS) * len(rec.FAULTS)
    freeze_raypod = next(r for r in rows if r[:3] == ["raypod", "freeze", "1"])
    assert freeze_raypod[4:6] == ["0.90", "0.40"]
    stuck = next(r for r in rows if r[1] == "freeze" and r[0].startswith("torchrun") and r[2] == "1")
    assert stuck[7] == "NO (timed out after 120s, a worker stuck in allreduce)"


def test_faults_option():
    assert rec.parse_faults("kill,freeze") == ("kill", "freeze")
    assert rec.parse_faults(" freeze ") == ("freeze",)
    assert rec.parse_faults(["freeze", "kill", "freeze"]) == ("freeze", "kill")
    for bad in ("", "kill,hang", ","):
        with pytest.raises(ValueError):
            rec.parse_faults(bad)
    args = build_parser().parse_args(["bench", "recovery", "--faults", "freeze", "--trials", "1"])
    assert args.faults == "freeze" and args.trials == 1
    other = build_parser().parse_args(["bench", "startup", "--faults", "freeze"])
    assert _bench(other) == 2  # refused before anything runs


# ---- the anchors' fault and the harness's cleanup ----------------------------------------
_FIRE = ("import sys; from raypod.bench.anchors.mlp_common import MLPJob, maybe_fault; "
         "job = MLPJob(fault=sys.argv[1]); maybe_fault(24, 1, job, sys.argv[2]); "
         "maybe_fault(25, 0, job, sys.argv[2]); maybe_fault(25, 1, job, sys.argv[2]); print('continued')")


def _fire(fault: str, marker: Path, tag: str) -> subprocess.Popen:
    env = {**os.environ, harness.TAG_VAR: tag,
           "PYTHONPATH": os.pathsep.join(p for p in (str(harness.REPO), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.Popen([sys.executable, "-c", _FIRE, fault, str(marker)], env=env,
                            stdout=subprocess.PIPE, text=True)


def test_an_unknown_fault_is_refused():
    from raypod.bench.anchors.mlp_common import MLPJob

    with pytest.raises(ValueError):
        MLPJob(fault="hang")


def test_anchor_kill_writes_its_time_then_exits(tmp_path: Path):
    marker = tmp_path / "kill.marker"
    before = time.time()
    proc = _fire("kill", marker, uuid.uuid4().hex)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "continued" not in out
    assert marker.read_text().startswith("kill after step 25 at ")
    assert before <= rec.read_anchor_marker(marker) <= time.time()


def test_anchor_freeze_stops_the_rank_and_the_drain_sigkills_it(tmp_path: Path):
    marker = tmp_path / "kill.marker"
    tag = uuid.uuid4().hex
    proc = _fire("freeze", marker, tag)
    try:
        deadline = time.monotonic() + 120
        while not harness.stopped(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert harness.stopped(proc.pid), "the rank did not stop itself"
        assert marker.read_text().startswith("freeze after step 25 at ")
        assert proc.pid in harness.tagged_pids(tag)
        t0 = time.monotonic()
        out = harness.drain(tag, 0.1, lambda msg: None)
        assert time.monotonic() - t0 < harness.DRAIN_TIMEOUT_S / 2  # SIGKILLed at once, not waited for
        assert out["killed_stopped"] == [proc.pid] and out["killed_stragglers"] == []
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert harness.tagged_pids(tag) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_each_system_has_a_faulted_and_a_fault_free_command(tmp_path):
    for system in rec.SYSTEMS:
        faulted = " ".join(rec._command(system, "kill", 1, tmp_path)[0])
        clean = " ".join(rec._command(system, rec.REFERENCE, 0, tmp_path)[0])
        assert "kill" in faulted and "kill}" not in clean and "--fault" not in clean, system
        assert ("--no-kill" in clean) == (system != "raypod"), system
    assert "mlp_torchft.py" in " ".join(rec._command("torchft", "freeze", 1, tmp_path)[0])
    cmd, env = rec._command("ray_train_torchft", "kill", 1, tmp_path)
    assert "mlp_ray_train_torchft.py" in cmd[1] and env == {"RAY_TRAIN_V2_ENABLED": "1"}


def test_the_cli_passes_systems_to_recovery_and_goodput_only(monkeypatch):
    import raypod.bench as bench

    seen = {}
    monkeypatch.setattr(bench, "run_suite", lambda suite, **kw: seen.update(suite=suite, **kw) or {})
    assert _bench(build_parser().parse_args(["bench", "recovery", "--systems", "torchft"])) == 0
    assert seen["systems"] == "torchft"
    assert _bench(build_parser().parse_args(["bench", "startup", "--systems", "torchft"])) == 2
