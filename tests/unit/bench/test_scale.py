"""The scale suite's pure parts: windows, figures, fits, table rows and acceptance lines."""

from __future__ import annotations

import pytest

from raypod.bench import scale
from raypod.bench.calibration import Calibration, load, save


def _fig(raypod_ms: float, nodriver_ms: float, gap_s: float, n: int) -> dict:
    """One rank count's figures as :func:`scale.figures_at` gives them, made up."""
    return {"raypod_step_s": raypod_ms / 1e3, "nodriver_step_s": nodriver_ms / 1e3,
            "step_ratio": round(raypod_ms / nodriver_ms, 3), "driver_cpu_per_step_s": 0.002 * n / 2,
            "gap_s": gap_s, "regroup_s": 0.05 + 0.01 * n, "phases_s": {"rebuild": 0.05 + 0.01 * n},
            "actor_call_cpu_s": 1e-4 + 2e-4 * n, "wait_cpu_s": 2e-6 * n, "ping_round_s": 5e-4 + 1e-4 * n,
            "rank_rss_bytes": 400 * 2**20, "rank_uss_bytes": 150 * 2**20, "peak_rss_bytes": n * 500 * 2**20,
            "good": {"raypod": "1/1", "nodriver": "1/1", "kill": "1/1"}}


def _rec(kind: str, ok: bool = True, **figures: float) -> dict:
    return {"kind": kind, "ok": ok, "n": 2, "trial": 1, **figures}


def test_the_steady_window_leaves_out_the_first_steps_and_takes_the_median_interval():
    times = {s: 10.0 + 0.1 * s for s in range(1, 41)}
    times[3] += 5.0  # a slow start is outside the window (the first 10 of 40 steps)
    times[20] += 0.02  # one slower interval inside it does not move the median
    assert scale.warmup_steps(40) == 10 and scale.warmup_steps(12) == 5
    assert scale.steady(times, 40) == pytest.approx(0.1)
    del times[25]
    with pytest.raises(RuntimeError, match="did not all complete"):
        scale.steady(times, 40)


def test_driver_cpu_per_step_is_the_window_s_cpu_over_its_steps():
    cpu = {s: 1.0 + 0.003 * s for s in range(1, 41)}
    assert scale.cpu_per_step(cpu, 40) == pytest.approx(0.003)


def test_a_step_without_a_driver_completes_when_its_last_rank_finished_it():
    assert scale.group_times([[1.0, 2.0, 3.0], [1.5, 1.9, 3.2]]) == {1: 1.5, 2: 2.0, 3: 3.2}


def test_rank_counts_must_divide_the_global_batch_and_the_kill_falls_in_the_window():
    assert scale.check_ranks([2, 4, 8, 16, 32]) == [2, 4, 8, 16, 32]
    for bad in ([1, 2], [3], []):
        with pytest.raises(ValueError):
            scale.check_ranks(bad)
    assert scale.warmup_steps(20) < scale.kill_step(20) < 20
    sets = scale.overrides(8, 20, "/tmp/x", "n", "kill")
    assert "train.micro_batch=8" in sets and "scaling.min_workers=8" in sets
    assert "fault.inject=[{step: 10, rank: 7, kind: kill}]" in sets
    assert not any(s.startswith("fault.inject") for s in scale.overrides(8, 20, "/tmp/x", "n"))


def test_the_configuration_s_figures_are_medians_over_its_good_trials():
    recs = [_rec("raypod", step_s=0.020, driver_cpu_per_step_s=0.002), _rec("raypod", step_s=0.024),
            _rec("raypod", ok=False, step_s=9.0), _rec("nodriver", step_s=0.020, actor_call_cpu_s=1e-3,
                                                        wait_cpu_s=1e-5, ping_round_s=1e-3, rank_rss_bytes=4e8),
            _rec("kill", gap_s=0.3, phases_s={"rebuild": 0.06, "drain": 0.01})]
    f = scale.figures_at(recs)
    assert f["raypod_step_s"] == pytest.approx(0.022) and f["nodriver_step_s"] == pytest.approx(0.020)
    assert f["step_ratio"] == pytest.approx(1.1)
    assert f["regroup_s"] == pytest.approx(0.06) and f["phases_s"]["drain"] == pytest.approx(0.01)
    assert f["good"] == {"raypod": "2/3", "nodriver": "1/1", "kill": "1/1"}


def test_the_calibration_fits_each_operation_and_round_trips(tmp_path):
    by_n = {n: _fig(20.0, 19.5, 0.3, n) for n in (2, 4, 8)}
    cal = scale.fit_calibration(by_n, {"nproc": 2}, "2026-01-01", "raypod bench scale")
    assert cal.actor_call.per_rank_s == pytest.approx(2e-4) and cal.actor_call.base_s == pytest.approx(1e-4)
    assert cal.regroup.at(16) == pytest.approx(0.05 + 0.16)
    assert cal.ping.points == [[2.0, 7e-4], [4.0, 9e-4], [8.0, 1.3e-3]]
    save(cal, tmp_path)
    assert load(tmp_path) == cal
    by_n[4]["regroup_s"] = by_n[2]["regroup_s"] = by_n[8]["regroup_s"] = None
    with pytest.raises(ValueError, match="regroup"):
        scale.fit_calibration(by_n, {}, "", "")
    assert isinstance(cal, Calibration)


def test_the_rank_s_rejoin_cpu_is_fitted_when_measured_and_optional_before():
    recs = [_rec("kill", gap_s=0.3, phases_s={"rebuild": 0.4, "rebuild_rank_cpu_max": 0.07}),
            _rec("kill", gap_s=0.3, phases_s={"rebuild": 0.5, "rebuild_rank_cpu_max": 0.09})]
    assert scale.figures_at(recs)["regroup_cpu_s"] == pytest.approx(0.08)
    by_n = {n: _fig(20.0, 19.5, 0.3, n) for n in (2, 4, 8)}
    assert scale.fit_calibration(by_n, {}, "", "").regroup_cpu is None  # a calibration from before
    for n, f in by_n.items():
        f["regroup_cpu_s"] = 0.02 + 0.001 * n
    cal = scale.fit_calibration(by_n, {}, "", "")
    assert cal.regroup_cpu.at(100) == pytest.approx(0.12)
    assert "regroup_cpu" in [row[0] for row in scale.fit_rows(cal.to_json())]


def test_the_acceptance_lines_are_computed_from_the_figures():
    good = {2: _fig(20.0, 19.5, 0.30, 2), 32: _fig(40.0, 39.0, 0.40, 32)}
    step, gap = scale.acceptance(good, [2, 32])
    assert step["met"] is True and step["worst"] == pytest.approx(1.026)
    assert gap["met"] is True and gap["growth"] == pytest.approx(1.333) and gap["covers_requested"]
    bad = {2: _fig(20.0, 18.0, 0.30, 2), 16: _fig(40.0, 39.0, 0.60, 16)}
    step, gap = scale.acceptance(bad, [2, 4, 8, 16, 32])
    assert step["met"] is False and gap["met"] is False and not gap["covers_requested"]
    lines = scale.acceptance_lines([step, gap])
    assert "N=2 1.111" in lines[0] and lines[0].endswith("NOT MET")
    assert "from N=2 to N=16: 2.00x: NOT MET (the requested range was not fully measured)" in lines[1]
    missing = {2: {**_fig(20.0, 19.5, 0.3, 2), "step_ratio": None, "gap_s": None}}
    step, gap = scale.acceptance(missing, [2])
    assert step["met"] is None and gap["met"] is None


def test_table_rows_and_fit_rows_show_the_figures_in_their_units():
    by_n = {"4": _fig(21.0, 20.0, 0.35, 4), "2": _fig(20.0, 19.5, 0.30, 2)}
    rows = scale.rows(by_n)
    assert [r[0] for r in rows] == ["2", "4"]
    assert rows[1][1:4] == ["21.0", "20.0", "1.050"]
    assert rows[1][7] == "—"  # no rejoin CPU measured
    assert rows[1][8] == "900" and rows[1][11] == "400/150" and rows[1][-1] == "1/1/1 of 1"
    assert all(len(r) == len(scale.HEADER) for r in rows)
    cal = scale.fit_calibration({int(k): v for k, v in by_n.items()}, {}, "", "").to_json()
    fits = scale.fit_rows(cal)
    assert [r[0] for r in fits] == [k for k in scale.FITTED if k not in scale.OPTIONAL]
    assert fits[0][2] == "200.0"  # 2e-4 s per call, in µs


def test_a_configuration_that_would_not_fit_in_memory_is_named_with_its_need():
    assert scale.fits_room(2, 400 * 2**20, 20 * 2**30) is None
    why = scale.fits_room(32, 400 * 2**20, 8 * 2**30)
    assert why is not None and why.startswith("not run: 32 ranks need about") and "8.0 GiB available" in why


def test_the_results_page_holds_the_table_the_verdicts_the_fits_and_what_was_left_out():
    by_n = {2: _fig(20.0, 19.5, 0.30, 2), 4: _fig(30.0, 25.0, 0.50, 4)}
    cal = scale.fit_calibration(by_n, {}, "", "")
    m = {"platform": "Linux", "nproc": 2, "python": "3.11", "torch": "2", "ray": "2", "loadavg_before": [1.0],
         "loadavg_after": [2.0]}
    failed = {"kind": "kill", "n": 4, "trial": 1, "ok": False, "why": "timed out after 300s"}
    result = {"date": "d", "machine": m, "command": "raypod bench scale", "trials_per_n": 1, "workload": "w",
              "by_n": {str(n): f for n, f in by_n.items()}, "acceptance": scale.acceptance(by_n, [2, 4, 8]),
              "calibration": cal.to_json(), "calibration_error": None,
              "skipped": ["N=8: not run: 8 ranks need about 30.0 GiB"], "trials": {"4": [failed]}}
    page = scale.markdown(result)
    assert "| 4 | 30.0 | 25.0 | 1.200 |" in page
    assert "**raypod step time <= 1.05x no-driver at every N: N=2 1.026, N=4 1.200: NOT MET**" in page
    assert "from N=2 to N=4: 1.67x: NOT MET (the requested range was not fully measured)**" in page
    assert "| regroup |" in page and "- N=8: not run: 8 ranks need about 30.0 GiB" in page
    assert "- N=4 kill trial 1: timed out after 300s" in page
    result.update(calibration=None, calibration_error="no regroup_s measured at any rank count")
    assert "Calibration not written: no regroup_s measured" in scale.markdown(result)


def test_the_kill_trial_measures_the_injected_kill_even_after_a_false_silence():
    silence = {"kind": "unresponsive", "step": 3, "resumed_s": 20.0, "last_step_s": 10.0,
               "recovery_phases_s": {"rebuild": 5.0}}
    kill = {"kind": "kill", "step": 15, "resumed_s": 33.0, "last_step_s": 31.5,
            "recovery_phases_s": {"rebuild": 1.2}, "restored_from": "memory step 13", "lost_steps": 0}
    f = scale.kill_figures({"status": "succeeded", "events": [silence, kill]})
    assert f["ok"] and f["gap_s"] == pytest.approx(1.5) and f["phases_s"] == {"rebuild": 1.2}
    assert f["other_events"] == ["unresponsive at step 3"]
    assert not scale.kill_figures({"status": "failed", "events": []})["ok"]
