"""The scale and sim plots draw from their suites' JSON (and the sim's earlier baseline)."""

import json
from pathlib import Path

from raypod.bench import plots


def _sim(cores: float) -> dict:
    return {"date": "2026-11-30", "goals_at_10k": {"cores": 1.0, "detect_p99_s": 1.0, "gap_s": 5.0},
            "points": [{"ranks": n, "driver_cores": cores, "kill_p99_s": n / 1e4, "gap_s": n / 1e3,
                        "gap_to_training_s": n / 2e3}
                       for n in (1_000, 10_000, 100_000)]}


def test_scale_and_sim_plots_with_baseline(tmp_path: Path) -> None:
    results, out = tmp_path / "results", tmp_path / "plots"
    results.mkdir()
    by_n = {str(n): {"raypod_step_s": 0.01 * n, "nodriver_step_s": 0.009 * n, "step_ratio": 1.1,
                     "gap_s": 0.1 * n, "regroup_s": 0.05 * n} for n in (2, 4)}
    by_n["8"] = {"nodriver_step_s": 0.08}  # a rank count whose raypod trial failed
    (results / "scale.json").write_text(json.dumps({"by_n": by_n, "date": "2026-11-30T10:00"}))
    (results / "sim.json").write_text(json.dumps(_sim(0.4)))
    (results / "sim_baseline_x.json").write_text(json.dumps({**_sim(1.0), "label": "before"}))
    done = plots.plot_all(results, out)
    assert set(done) == {"scale", "sim"}
    assert all(p.stat().st_size > 10_000 for p in done.values())
