"""The step-time suites' arithmetic, the chaos fault plan, and the flat snapshot buffer."""

from __future__ import annotations

import gc

import pytest
import torch

from raypod.bench.checkpoint import checkpoints_in_window, stalls
from raypod.bench.overhead import intervals
from raypod.chaos import fault_kinds, plan_faults, steps_needed
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
