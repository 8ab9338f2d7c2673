"""The snapshot cadence: every step while it is cheap, else the shortest interval that fits."""

from raypod.driver.cadence import CALIBRATION_SNAPSHOTS, SnapshotCadence


def _run(cadence: SnapshotCadence, steps: int, compute_s: float, snap_cost_s: float) -> list[int]:
    taken = []
    for step in range(1, steps + 1):
        snap = cadence.decide(step)
        if snap:
            taken.append(step)
        results = [{"compute_s": compute_s, "snapshot_s": snap_cost_s if snap else 0.0}] * 2
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
        c.observe(step, [{"compute_s": 0.1, "snapshot_s": 0.001 if snap else 0.0,
                          "exchange_s": 0.05 if prev else 0.0}])
        prev = snap
    assert c.every == 5


def test_restart_counts_the_interval_from_the_restore_point() -> None:
    c = SnapshotCadence(1)
    for s in range(1, 6):
        c.decide(s)
    c.restart(3)
    assert c.snapshots(3) and not c.snapshots(4)
