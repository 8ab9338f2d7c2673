"""The goodput model's arithmetic: Daly's formula, replica groups, the inputs it reads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from raypod.bench import goodput_model as gm


def _trial(system: str, gap: float | None, replayed: int | None, recovered: bool = True, **kw) -> dict:
    return {"system": system, "gap_s": gap, "replayed": replayed, "recovered": recovered, **kw}


def _recovery(torchrun_recovers: bool = True) -> dict:
    return {"date": "2026-01-01T00:00:00+00:00", "trials": {
        "raypod": [_trial("raypod", 0.5, 1), _trial("raypod", 0.7, 1), _trial("raypod", 0.9, 1)],
        "ray_train_v2": [_trial("ray_train_v2", 8.0, 16), _trial("ray_train_v2", 10.0, 16),
                         _trial("ray_train_v2", None, None, recovered=False)],
        "torchrun": [_trial("torchrun", 6.0 if torchrun_recovers else None, 16, recovered=torchrun_recovers)],
    }}


def _write(tmp_path: Path, recovery: dict, sim: dict | None = None) -> Path:
    (tmp_path / "recovery.json").write_text(json.dumps(recovery))
    if sim is not None:
        (tmp_path / "sim.json").write_text(json.dumps(sim))
    return tmp_path


def test_daly_matches_a_hand_computation():
    # M = 1000 s, 100 s of work, 10 s stall, 50 s restart:
    # 100 / (1000 e^0.05 (e^0.11 - 1)) = 100 / (1000 x 1.051271 x 0.116278) = 100 / 122.240 = 0.81806
    assert gm.daly_goodput(1000.0, 100.0, 10.0, 50.0) == pytest.approx(0.81806, abs=1e-5)


def test_replica_groups_match_a_hand_computation():
    p = gm.Params(step_s=6.0, quorum_s=1.0, heal_s=10.0, replica_groups=8, replica_overhead=0.02)
    # per failure: 3 s (half a step) + 1 s quorum + 10 s heal + 40 s rejoin / 8 groups = 19 s
    assert sum(gm.replica_group_costs(p, rejoin_s=40.0).values()) == pytest.approx(19.0)
    assert gm.replica_group_goodput(3600.0, p, rejoin_s=40.0) == pytest.approx(0.98 * (1 - 19 / 3600))


def test_goodput_falls_as_failures_rise():
    p = gm.Params()
    mttfs = [1e6, 1e5, 1e4, 3600.0, 840.0, 100.0]
    for fn in (lambda m: gm.daly_goodput(m, 1800.0, 10.0, 9.0), lambda m: gm.daly_goodput(m, 6.0, 0.06, 0.7),
               lambda m: gm.replica_group_goodput(m, p, rejoin_s=9.0)):
        g = [fn(m) for m in mttfs]
        assert all(a > b for a, b in zip(g, g[1:], strict=False)), g


def test_no_failures_leaves_only_the_overheads():
    assert gm.daly_goodput(math.inf, 100.0, 10.0, 1e6) == pytest.approx(100 / 110)
    assert gm.daly_goodput(math.inf, 100.0, 0.0, 0.0) == pytest.approx(1.0)
    p = gm.Params(replica_overhead=0.03)
    assert gm.replica_group_goodput(math.inf, p, rejoin_s=1e6) == pytest.approx(0.97)


def test_zero_recovery_cost_is_one_minus_overheads(tmp_path):
    # A snapshot system whose gap is 0 still loses half a step per failure; with the step far
    # shorter than the time between failures that vanishes, leaving the snapshot budget.
    rec = _recovery()
    rec["trials"]["raypod"] = [_trial("raypod", 0.0, 1)]
    inputs = gm.load_inputs(_write(tmp_path, rec))
    p = gm.Params(step_s=1e-6, snapshot_overhead=0.02)
    e = gm.evaluate(gm.SYSTEMS[0], 1024, inputs, p)
    assert e["goodput"] == pytest.approx(0.98, abs=1e-6)


def test_measured_gaps_are_medians_of_recovered_kill_trials():
    rec = _recovery()
    rec["trials"]["raypod"].append(_trial("raypod", 50.0, 1, fault="freeze"))  # another fault: left out
    gaps = gm.measured_gaps(rec)
    assert gaps["raypod"] == {"gap_s": 0.7, "replayed": 1, "recovered": "3/3"}
    assert gaps["ray_train_v2"] == {"gap_s": 9.0, "replayed": 16, "recovered": "2/3"}


def test_an_anchor_that_never_recovered_borrows_the_others_gap(tmp_path):
    inputs = gm.load_inputs(_write(tmp_path, _recovery(torchrun_recovers=False)))
    assert inputs.stand_ins == {"torchrun": "ray_train_v2"}
    assert inputs.restart_s("torchrun") == 9.0
    assert "measured at 2 ranks only" in inputs.raypod_gap_source
    assert inputs.raypod_gap_at == dict.fromkeys(gm.SCALES, 0.7)


def test_sim_gaps_are_fitted_in_log_ranks(tmp_path):
    sim = {"runs": [{"ranks": 64, "gap_s": 1.0}, {"ranks": 1024, "gap_s": 2.0}, {"ranks": 16384, "gap_s": 3.0}]}
    inputs = gm.load_inputs(_write(tmp_path, _recovery(), sim))
    # gap = 1 + (log2(n) - 6) / 4: 1.0 at 64, 2.0 at 1024, 3.0 at 16384, 3.75 at 131072
    assert inputs.raypod_gap_at[131072] == pytest.approx(3.75)
    assert inputs.raypod_gap_at[1024] == pytest.approx(2.0)
    assert "sim.json" in inputs.raypod_gap_source


def test_failure_rates_follow_meta_and_scale_with_gpus():
    assert gm.mttf_s(16384)[0] == pytest.approx(1.8 * 3600)
    assert gm.mttf_s(131072)[0] == pytest.approx(14 * 60)
    m, source = gm.mttf_s(1024)
    assert m == pytest.approx(1.8 * 3600 * 16)
    assert "proportional" in source
    assert gm.llama3_mttf_s() == pytest.approx(54 * 24 * 3600 / 419)


def test_break_even_gap_brings_raypod_to_the_best_other(tmp_path):
    results_dir = _write(tmp_path, _recovery())
    p = gm.Params()
    r = gm.build(results_dir, p)
    be = r["break_even"]
    m = gm.mttf_s(be["gpus"])[0]
    work, stall, _ = gm._interval(gm.SYSTEMS[0], m, gm.load_inputs(results_dir), p)
    assert gm.daly_goodput(m, work, stall, be["gap_s"]) == pytest.approx(be["best_other_goodput"], abs=1e-3)
    for s in r["results"].values():  # more GPUs, more failures, less goodput
        g = [s["by_scale"][str(n)]["goodput"] for n in gm.SCALES]
        assert g[0] > g[1] > g[2], (s["label"], g)


def test_optimal_interval_beats_a_fixed_half_hour_at_scale():
    m, stall = gm.mttf_s(131072)[0], 10.0
    opt = gm.daly_interval_s(m, stall)
    assert gm.daly_goodput(m, opt, stall, 9.0) > gm.daly_goodput(m, 1800.0, stall, 9.0)
    assert opt < gm.young_interval_s(m, stall)


def test_params_refuse_nonsense():
    with pytest.raises(ValueError, match="replica_groups"):
        gm.Params(replica_groups=1)
    with pytest.raises(ValueError, match="snapshot_overhead"):
        gm.Params(snapshot_overhead=1.0)


def test_main_writes_results_page_and_plot(tmp_path):
    (tmp_path / "in").mkdir()
    results_dir = _write(tmp_path / "in", _recovery(torchrun_recovers=False))
    out = tmp_path / "out"
    assert gm.main(["--results", str(results_dir), "--out", str(out), "--plot", str(out), "--heal-s", "5"]) == 0
    r = json.loads((out / "goodput_model.json").read_text())
    assert r["params"]["heal_s"] == 5.0
    assert set(r["results"]) == {s.key for s in gm.SYSTEMS}
    md = (out / "goodput_model.md").read_text()
    assert "131k GPUs" in md and "MODELLED" in md and "stand-in" in md
    assert (out / "goodput_model.png").stat().st_size > 0
