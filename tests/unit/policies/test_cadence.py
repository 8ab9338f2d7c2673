"""The snapshot cadence: every step while it is cheap, else the shortest interval that fits."""

from typing import Any

import pytest

from raypod.policies.cadence import CALIBRATION_SNAPSHOTS, SnapshotCadence
from raypod.protocol import StepResult


def _result(compute_s: float, **costs: Any) -> StepResult:
    """A rank's result of a step, with only the figures the cadence reads."""
    return StepResult(step=1, rank=0, loss_sum=1.0, samples=1, ids=[], epoch=0, lr=0.1, grad_norm=1.0,
                      compute_s=compute_s, **costs)


def _run(cadence: SnapshotCadence, steps: int, compute_s: float, snap_cost_s: float) -> list[int]:
    taken = []
    for step in range(1, steps + 1):
        snap = cadence.decide(step)
        if snap:
            taken.append(step)
        results = [_result(compute_s, snapshot_s=snap_cost_s if snap else 0.0)] * 2
        cadence.observe(step, results)
    return taken


def test_fixed_interval_is_kept_and_zero_never_snapshots() -> None:
    assert _run(SnapshotCadence(3), 10, 0.1, 0.5) == [3, 6, 9]
    off = SnapshotCadence(0)
    assert not off.enabled and _run(off, 5, 0.1, 0.0) == []


def test_auto_snapshots_every_step_when_the_cost_fits_the_budget() -> None:
    c = SnapshotCadence("auto", budget=0.03)
    assert _run(c, 30, compute_s=0.2, snap_cost_s=0.002) == list(range(1, 31))
    assert c.every == 1


def test_auto_stretches_the_interval_to_fit_the_budget() -> None:
    c = SnapshotCadence("auto", budget=0.03, max_every=20)
    taken = _run(c, 200, compute_s=0.14, snap_cost_s=0.055)  # the 2-core CPU box's figures
    assert taken[:CALIBRATION_SNAPSHOTS] == list(range(1, CALIBRATION_SNAPSHOTS + 1))
    assert c.every == 14  # ceil(0.055 / (0.03 * 0.14))
    gaps = {b - a for a, b in zip(taken[CALIBRATION_SNAPSHOTS:], taken[CALIBRATION_SNAPSHOTS + 1:], strict=False)}
    assert gaps == {14}
    assert c.figures()["every"] == 14


def test_auto_interval_is_capped_and_exchange_time_counts() -> None:
    c = SnapshotCadence("auto", budget=0.03, max_every=5)
    prev = False
    for step in range(1, 40):
        snap = c.decide(step)
        # the exchange of a snapshot is reported by the step after it
        c.observe(step, [_result(0.1, snapshot_s=0.001 if snap else 0.0, exchange_s=0.05 if prev else 0.0)])
        prev = snap
    assert c.every == 5


def test_restart_counts_the_interval_from_the_restore_point() -> None:
    c = SnapshotCadence(1)
    for s in range(1, 6):
        c.decide(s)
    c.restart(3)
    assert c.snapshots(3) and not c.snapshots(4)


@pytest.mark.parametrize("every", [5, "auto"])
def test_a_regrouped_job_snapshots_its_first_step_whatever_the_interval(every) -> None:
    # A new group's replicas start empty: without this, a second failure within the
    # interval would find no step in memory on every rank and fall back to storage.
    c = SnapshotCadence(every, budget=0.01, max_every=5)
    if every == "auto":
        for step in range(1, 12):
            snap = c.decide(step)
            c.observe(step, [_result(0.1, snapshot_s=0.05 if snap else 0.0)])
        assert c.every == 5
        start = 11
    else:
        start = 5
    c.restart(start)
    assert c.decide(start + 1)  # the first step of the new group
    assert not any(c.decide(s) for s in range(start + 2, start + 4))
    c.restart(start + 3, regrouped=False)  # a rollback in the same group keeps its replicas
    assert not c.decide(start + 4)


def test_failures_shorten_the_interval_to_youngs_optimum(monkeypatch) -> None:
    import raypod.policies.cadence as cadence

    clock = [1000.0]
    monkeypatch.setattr(cadence.time, "monotonic", lambda: clock[0])
    # A snapshot costs half a step: the 1% budget alone wants every 50th, capped at 20.
    c = SnapshotCadence("auto", budget=0.01, max_every=20)
    for step in range(1, 10):
        snap = c.decide(step)
        c.observe(step, [_result(0.2, snapshot_s=0.1 if snap else 0.0)])
        clock[0] += 0.2
    assert c.every == 20
    # One failure in 60 s: Young's interval is sqrt(2 x 0.1 s x 60 s) = 3.5 s, 17 steps.
    clock[0] = 1060.0
    c.failure()
    assert c.every == 17
    # A failure every second (a chaos run): every 2nd step.
    clock[0] = 1100.0
    for _ in range(99):
        c.failure()
    assert c.every == 2
