"""The step-time suites' arithmetic, the chaos fault plan, and the flat snapshot buffer."""

from __future__ import annotations

import gc

import pytest
import torch

from raypod.bench.chaos import fault_kinds, plan_faults, steps_needed
from raypod.bench.checkpoint import checkpoints_in_window, stalls
from raypod.bench.overhead import intervals
from raypod.config import FaultInjection
from raypod.worker import snapshot


def test_intervals_cover_the_window_and_need_every_step():
    times = {s: 10.0 + 0.5 * s for s in range(1, 11)}
    assert intervals(times, 3, 10) == [0.5] * 7
    del times[6]
    with pytest.raises(RuntimeError, match="never completed"):
        intervals(times, 3, 10)


def test_stall_per_checkpoint_is_the_extra_time_over_the_checkpoints_in_the_window():
    assert checkpoints_in_window("raypod_persist", 10, 20, 100) == 8  # after steps 20, 30, ..., 90
    assert checkpoints_in_window("raypod_snapshot", 10, 20, 100) == 80
    ok = {"ok": True}
    by = {"raypod_none": [{**ok, "mean_ms": 100.0}, {**ok, "mean_ms": 110.0}],
          "raypod_persist": [{**ok, "mean_ms": 105.0}, {"ok": False}]}
    st = stalls(by, every=10, warmup=20, steps=100)
    assert st["raypod_persist"]["per_trial_ms"] == [50.0]  # 5 ms x 80 intervals / 8 checkpoints
    assert st["raypod_persist"]["median_ms"] == 50.0


def test_fault_plan_is_seeded_spaced_and_uses_every_kind():
    assert fault_kinds() == list(FaultInjection.model_fields["kind"].annotation.__args__)
    n, spacing = 12, 4
    plan = plan_faults(n, 80, 2, seed=7, spacing=spacing)
    assert plan == plan_faults(n, 80, 2, seed=7, spacing=spacing)
    steps = [f["step"] for f in plan]
    assert len(plan) == n and steps == sorted(steps) and steps[-1] < 80
    assert all(b - a >= spacing for a, b in zip(steps, steps[1:], strict=False))
    assert {f["kind"] for f in plan} == set(fault_kinds()) and {f["rank"] for f in plan} <= {0, 1}
    for f in plan:
        FaultInjection.model_validate(f)
    tight = plan_faults(n, steps_needed(n, spacing), 2, seed=0, spacing=spacing)
    assert len(tight) == n
    with pytest.raises(ValueError, match="do not fit"):
        plan_faults(n, steps_needed(n, spacing) - 6, 2, seed=0, spacing=spacing)


def test_fired_faults_come_back_in_plan_order(tmp_path):
    # The driver names a failure after the last marker of the failed rank: a listing in name
    # order (fired_10 before fired_9) once made a kill look like the rank's earlier slow fault.
    from raypod import faults

    for i in (9, 10, 2):
        faults.record_fired(str(tmp_path), i, FaultInjection(step=i, rank=0, kind="kill"), attempt=0)
    assert list(faults.fired(str(tmp_path))) == [2, 9, 10]


def test_snapshot_is_one_flat_buffer_in_the_exchange_layout_and_reused():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    snap = snapshot.take(model, opt)
    src = snapshot.state_tensors(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(snap, src, strict=True))
    assert torch.equal(snap.flat, snapshot.to_bytes(src))  # what the peer receives is unchanged
    back = snapshot.from_bytes(snap.flat.clone(), src)
    assert all(torch.equal(a, b) for a, b in zip(back, src, strict=True))
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(snap[0], snapshot.state_tensors(model, opt)[0])  # a copy, not a view
    ptr = snap.flat.data_ptr()
    del snap
    gc.collect()
    again = snapshot.take(model, opt)
    assert again.flat.data_ptr() == ptr  # the dropped snapshot's buffer was reused
    assert torch.equal(again[0], model[0].weight)


def test_the_cli_names_every_suite_without_importing_the_benchmarks():
    import subprocess
    import sys

    from raypod.bench import SUITES
    from raypod.cli import BENCH_SUITES

    assert BENCH_SUITES == tuple(SUITES)
    code = "import sys, raypod.cli; print(sorted(m for m in sys.modules if m.startswith('raypod.bench')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_trial_skeleton_tags_runs_and_drains_a_subprocess(tmp_path):
    import sys

    from raypod.bench import table
    from raypod.bench import trials as harness

    trial = harness.Trial.new("rpt-", tmp_path / "t.log", ("storage",))
    env = trial.env({"EXTRA": "1"})
    assert env[harness.TAG_VAR] == trial.tag and env["RAY_TMPDIR"] == str(trial.tmp) and "RAY_ADDRESS" not in env
    code = "import os; print(os.environ['EXTRA'], os.environ['RAYPOD_BENCH_TRIAL'])"
    with harness.launched([sys.executable, "-c", code], env, trial.log_path) as (proc, t0):
        assert harness.wait_rc(proc, 60) == 0
    rec = trial.finish({"ok": True}, 0.0, lambda msg: None)
    assert trial.log_path.read_text().split() == ["1", trial.tag]
    assert rec["killed_stragglers"] == [] and not trial.tmp.exists()
    by, order = harness.interleave(["a", "b"], 2, lambda s, i: {"x": i}, lambda r: "", lambda m: None)
    assert order == ["a-1", "b-1", "a-2", "b-2"] and by["b"] == [{"x": 1}, {"x": 2}]
    assert table.ratios_vs({"raypod": 1.0, "x": 2.0, "y": None}, "raypod", ["raypod", "x", "y"]) == \
        {"raypod/x": 0.5, "raypod/y": None}
    assert table.markdown_table(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---:|\n| 1 | 2 |"
    assert (table.fmt(None), table.fmt(1.5), table.fmt(2), table.fmt(1.234, ".2f")) == ("—", "1.5", "2", "1.23")
