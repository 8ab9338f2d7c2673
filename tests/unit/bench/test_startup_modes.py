"""The startup suite's running-cluster mode: its commands, raypod's phases, the acceptance
line, and that the cluster it starts is stopped by pid, also when a trial fails."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raypod.bench import startup
from raypod.bench import trials as harness


def test_phases_add_up_to_the_figure_and_need_every_mark():
    t0 = 100.0
    marks = {"process_start": 101.5, "imported": 103.0, "connect_begin": 103.2, "connect_end": 104.0,
             "group_begin": 104.6, "located_end": 107.0, "group_end": 108.5}
    ph = startup.phases(t0, marks, started_at=104.5, first=109.0)
    assert list(ph) == list(startup.PHASES)
    assert ph["submit_s"] == 1.5 and ph["imports_s"] == 1.7 and ph["connect_s"] == 0.8
    assert ph["to_driver_s"] == 0.5 and ph["actors_s"] == 2.4 and ph["rank_setup_s"] == 1.5
    assert ph["first_step_s"] == 0.5
    assert sum(ph.values()) == pytest.approx(109.0 - t0)
    del marks["located_end"]
    assert startup.phases(t0, marks, 104.5, 109.0) is None


def test_acceptance_needs_both_bars_and_says_when_it_cannot_tell():
    a = startup.acceptance({"raypod": 6.0, "torchrun": 5.0, "ray_train_v2": 20.0})
    assert a["raypod_over_torchrun"] == 1.2 and a["met"] is True
    assert startup.acceptance({"raypod": 6.5, "torchrun": 5.0, "ray_train_v2": 20.0})["met"] is False
    slow = startup.acceptance({"raypod": 5.5, "torchrun": 5.0, "ray_train_v2": 5.0})
    assert slow["within_torchrun_limit"] is True and slow["below_ray_train_v2"] is False and slow["met"] is False
    missing = startup.acceptance({"raypod": 5.5, "torchrun": None, "ray_train_v2": 9.0})
    assert missing["met"] is None and missing["below_ray_train_v2"] is True


def test_submitted_entrypoints_run_the_cold_commands_on_the_cluster(tmp_path):
    storage, mark, ph = tmp_path / "s", tmp_path / "m", tmp_path / "phases.json"
    cmd, extra = startup._command("raypod", 1, storage, mark)
    wrapped = startup._submitted("raypod", cmd, extra, ph)
    assert wrapped[1:5] == ["-m", "raypod.bench.startup", "--phases-out", str(ph)]
    assert wrapped[5] == "run" and wrapped[6] == str(harness.REPO / "jobs/configs/tiny.yaml")
    assert wrapped[7:] == cmd[5:]
    plain = startup._submitted("raypod", cmd, extra, None)
    assert plain[1:4] == ["-m", "raypod.cli", "run"]
    cmd, extra = startup._command("ray_train_v2", 2, storage, mark)
    assert startup._submitted("ray_train_v2", cmd, extra, None) == ["env", "RAY_TRAIN_V2_ENABLED=1", *cmd]


def test_the_cluster_keeps_token_auth_and_ports_of_its_own(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    cluster = startup.RunningCluster(temp_dir="/tmp/rpsc-x", dashboard_port=18265)
    env = cluster.env()
    assert env["RAY_AUTH_MODE"] == "token" and "RAY_ADDRESS" not in env
    assert env[harness.TAG_VAR] == cluster.tag and str(harness.REPO) in env["PYTHONPATH"]
    cmd = cluster.start_command()
    assert cmd[1:3] == ["start", "--head"] and "--temp-dir=/tmp/rpsc-x" in cmd
    assert "--dashboard-port=18265" in cmd and f"--num-cpus={startup.cluster_cpus()}" in cmd
    assert not any(c.startswith("--port=6379") for c in cmd)
    sub = cluster.submit_command("id-1", ["python", "-c", "pass"])
    assert sub[1:] == ["job", "submit", "--address", "http://127.0.0.1:18265", "--submission-id", "id-1",
                       "--", "python", "-c", "pass"]
    assert startup.cluster_cpus(2) == 4 and startup.cluster_cpus(1) == 3 and startup.cluster_cpus(8) == 8


def test_mark_calls_notes_the_first_call_only():
    class Group:
        def start(self, n: int) -> dict:
            return {"setup_s": 1.25, "load_s": 0.5, "n": n}

    marks: dict = {}
    startup.mark_calls(Group, "start", marks, "group")
    assert Group().start(2)["n"] == 2
    first = dict(marks)
    assert first["group_begin"] <= first["group_end"] and first["group_setup_s"] == 1.25
    Group().start(3)
    assert marks == first
    startup.mark_calls(Group, "_locate", marks, "located")  # renamed elsewhere: noted, job untouched
    assert marks["unmarked"] == ["Group._locate"] and not hasattr(Group, "_locate")


def test_process_start_is_when_the_process_was_launched():
    """To the clock tick: psutil's create_time is not (its boot time is whole seconds)."""
    code = "from raypod.bench.startup import _process_start; print(repr(_process_start()))"
    before = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=harness.REPO)
    after = time.time()
    started = float(out.stdout)
    assert before - 0.03 <= started <= min(after, before + 0.5)


def test_main_refuses_phases_out_without_raypod_arguments():
    assert startup.main(["--phases-out", "x.json"]) == 2


def test_stop_ends_exactly_the_cluster_processes_by_tag():
    cluster = startup.RunningCluster()
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    ours = subprocess.Popen(sleep, env={**os.environ, harness.TAG_VAR: cluster.tag})
    other = subprocess.Popen(sleep, env={**os.environ, harness.TAG_VAR: "someone-else"})
    # A detached actor of Ray's own libraries (Ray Train V2 leaves two): the cluster's, not a job's.
    ray_own = subprocess.Popen(["bash", "-c", 'exec -a "ray::_StatsActor" "$0" -c "import time; time.sleep(60)"',
                                sys.executable], env={**os.environ, harness.TAG_VAR: cluster.tag})
    try:
        def renamed() -> bool:  # bash has exec'd under Ray's name (until then it is a bash process)
            try:
                return Path(f"/proc/{ray_own.pid}/cmdline").read_bytes().startswith(b"ray::")
            except OSError:
                return False

        deadline = time.monotonic() + 5
        while (not ({ours.pid, ray_own.pid} <= set(harness.tagged_pids(cluster.tag)) and renamed())
               and time.monotonic() < deadline):
            time.sleep(0.05)
        assert cluster.busy_pids() == [ours.pid]
        cluster.stop()
        assert ours.wait(timeout=5) is not None and ray_own.wait(timeout=5) is not None and other.poll() is None
    finally:
        for p in (ours, other, ray_own):
            p.kill()
            p.wait()


def test_the_cluster_is_stopped_when_a_trial_fails(monkeypatch, tmp_path):
    calls: list[str] = []
    session = harness.Session(tmp_path, stray=None)
    monkeypatch.setattr(startup, "_ensure_corpus", lambda: None)
    monkeypatch.setattr(harness, "warm_page_cache", lambda modules: None)
    monkeypatch.setattr(harness.Session, "open", classmethod(lambda cls, *a, **k: session))
    def start(self: startup.RunningCluster) -> None:
        calls.append("start")
        self.started_s = 7.0

    monkeypatch.setattr(startup.RunningCluster, "start", start)
    monkeypatch.setattr(startup.RunningCluster, "stop", lambda self: calls.append("stop"))

    def boom(*args: object) -> dict:
        raise RuntimeError("trial broke")

    monkeypatch.setattr(startup, "run_trial", boom)
    with pytest.raises(RuntimeError, match="trial broke"):
        startup.run(trials=1, out=None, cluster="running")
    assert calls == ["start", "stop"]
    with pytest.raises(ValueError, match="cluster must be one of"):
        startup.run(trials=1, out=None, cluster="warm")


def _trial(system: str, seconds: float | None, **extra: object) -> dict:
    return {"system": system, "seconds": seconds, "cpu_busy_before": 0.1, "loadavg_1m_after": 1.0, **extra}


def test_running_markdown_has_the_launch_spread_phases_and_acceptance():
    ph = {k: 0.5 for k in startup.PHASES}
    by = {"raypod": [_trial("raypod", 4.0, phases=ph), _trial("raypod", 5.0, phases=ph)],
          "ray_train_v2": [_trial("ray_train_v2", 20.0), _trial("ray_train_v2", None)],
          "torchrun": [_trial("torchrun", 4.0), _trial("torchrun", 4.4)]}
    medians = {"raypod": 4.5, "ray_train_v2": 20.0, "torchrun": 4.2}
    result = {"cluster": "running", "trials_per_system": 2, "trials": by, "median_s": medians,
              "spread_s": {s: startup.spread(by[s]) for s in by},
              "ratios": {"raypod/ray_train_v2": 0.225, "raypod/torchrun": 1.071},
              "acceptance": startup.acceptance(medians), "date": "2026-11-30T12:00:00+00:00",
              "command": "python -m raypod.bench.startup --cluster running --trials 2",
              "machine": {"platform": "Linux", "nproc": 2, "python": "3.11", "torch": "2", "ray": "2.60"}}
    md = startup.markdown(result)
    assert "| raypod | ray job submit | 4.00 | 5.00 | 4.50 | 1.00 | 1.00 |" in md
    assert "| Ray Train V2 | ray job submit | 20.00 | failed | 20.00 | n/a | 0.23 |" in md
    assert "| torchrun | local |" in md
    assert f"| {startup.PHASES['actors_s']} | 0.50 | 0.50, 0.50 |" in md
    assert "raypod / torchrun 1.07x (yes); below Ray Train V2: yes; **met**" in md
    cold_trials = {**by, "raypod": [_trial("raypod", 4.0), _trial("raypod", 5.0)]}
    cold = startup.markdown({**result, "cluster": "cold", "trials": cold_trials})
    assert cold.startswith("# startup: launch to first optimizer step") and "ray job submit" not in cold
    assert "| Ray Train V2 | local | 20.00 | failed |" in cold
