"""The goodput suite's arithmetic: pure functions over a step log and the kill times."""

from __future__ import annotations

import pytest

from raypod.bench.goodput import goodput_figures, recoveries, steady_step_s


def _rows(start_t: float, steps: range, dt: float, attempt: int = 0) -> list[tuple[int, float, int]]:
    return [(s, start_t + i * dt, attempt) for i, s in enumerate(steps)]


def test_no_kill_is_goodput_one():
    rows = _rows(100.0, range(1, 101), 0.5)  # steps 1..100 at 100.0, 100.5, ..., 149.5
    fig = goodput_figures(rows, [], end=149.5)
    assert fig["steady_step_s"] == pytest.approx(0.5)
    assert fig["kept_steps"] == 99
    assert fig["goodput"] == pytest.approx(1.0)
    assert fig["kills"] == 0 and fig["recoveries"] == 0 and fig["steps_replayed"] == 0
    assert fig["mean_gap_s"] is None


def test_restore_from_checkpoint_replays_and_loses_time():
    # Steps 1..25 every 1 s (t = 0..24), a kill at 24.5, a 5 s restart, restore of step 20:
    # 21..25 done again, then on to 40.
    rows = _rows(0.0, range(1, 26), 1.0) + _rows(29.0, range(21, 41), 1.0, attempt=1)
    end = 48.0
    fig = goodput_figures(rows, [24.5], end)
    assert fig["steady_step_s"] == pytest.approx(1.0)  # the interval over the kill is left out
    assert fig["final_step"] == 40 and fig["kept_steps"] == 39
    assert fig["window_s"] == pytest.approx(48.0)
    assert fig["goodput"] == pytest.approx(39 / 48, abs=1e-4)
    assert fig["ettr"] == pytest.approx(39 / 48, abs=1e-4)  # every fault-free interval is 1 s
    assert fig["steps_replayed"] == 5  # 21..25 completed twice
    assert fig["recoveries"] == 1
    assert fig["gaps_s"] == [pytest.approx(5.0)]  # last completion 24.0, first after 29.0
    assert fig["per_kill"][0]["last_step_before"] == 25 and fig["per_kill"][0]["first_step_after"] == 21


def test_completions_after_the_deadline_do_not_count():
    rows = _rows(0.0, range(1, 21), 1.0)
    fig = goodput_figures(rows, [], end=9.5)
    assert fig["final_step"] == 10 and fig["kept_steps"] == 9
    assert fig["goodput"] == pytest.approx(9 / 9.5, abs=1e-4)


def test_thrown_away_work_at_the_end_is_not_kept():
    # Reached step 30, killed, restored to 20, only back at 25 when the deadline comes.
    rows = _rows(0.0, range(1, 31), 1.0) + _rows(35.0, range(21, 26), 1.0, attempt=1)
    fig = goodput_figures(rows, [29.5], end=40.0)
    assert fig["final_step"] == 25 and fig["kept_steps"] == 24
    assert fig["goodput"] == pytest.approx(24 / 40, abs=1e-4)


def test_a_kill_not_followed_by_a_step_is_not_a_recovery():
    rows = _rows(0.0, range(1, 11), 1.0) + _rows(20.0, range(11, 16), 1.0, attempt=1)
    recs = recoveries(rows, [9.5, 15.0, 30.0], end=40.0)
    assert [r["recovered"] for r in recs] == [False, True, False]
    # The first kill's next completion (20.0) comes after the second kill (15.0).
    assert recs[1]["gap_s"] == pytest.approx(20.0 - 9.0)
    assert recs[2]["first_step_after"] is None


def test_kills_before_the_first_step_are_not_counted_as_recoveries():
    rows = _rows(10.0, range(1, 11), 1.0)
    fig = goodput_figures(rows, [5.0], end=19.0)
    assert fig["kills"] == 1 and fig["recoveries"] == 0 and fig["per_kill"] == []


def test_steady_step_is_a_median_without_fault_intervals():
    rows = [(1, 0.0, 0), (2, 1.0, 0), (3, 2.0, 0), (4, 12.0, 1), (5, 13.0, 0), (6, 16.0, 0)]
    assert steady_step_s(rows, [5.0]) == pytest.approx(1.0)  # 1, 1, [10 excluded], 1, 3
    assert steady_step_s(rows[:1], []) is None


def test_empty_log_is_an_error():
    with pytest.raises(RuntimeError):
        goodput_figures([(1, 50.0, 0)], [], end=10.0)


def test_ettr_counts_slow_steps_as_training_and_goodput_does_not():
    # 1 s steps with every 5th taking 2 s (a save stall), no kill: the median is 1 s.
    t, rows = 0.0, []
    for s in range(1, 51):
        rows.append((s, t, 0))
        t += 2.0 if s % 5 == 0 else 1.0
    fig = goodput_figures(rows, [], end=rows[-1][1])
    assert fig["steady_step_s"] == pytest.approx(1.0)
    assert fig["ettr"] == pytest.approx(1.0)
    assert fig["goodput"] == pytest.approx(49 / 58, abs=1e-4)  # the 9 stalls inside the window count as lost
