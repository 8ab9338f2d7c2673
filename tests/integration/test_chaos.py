"""A short chaos run on the MLP workload: seeded faults of every kind, and nothing lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from raypod.bench.chaos import fault_kinds, run_chaos

REPO = Path(__file__).resolve().parents[2]
MLP = REPO / "jobs" / "configs" / "mlp.yaml"

pytestmark = pytest.mark.slow


def test_short_chaos_run_loses_nothing(ray_connected, tmp_path):
    # nodes=1: on the session's Ray (a cluster of raylets cannot share this process with it).
    report = run_chaos(MLP, faults=5, seed=1, spacing=4, steps=24, storage=str(tmp_path), out=None, nodes=1,
                       overrides=["checkpoint.every_steps=10", "fault.hang_timeout_s=60",
                                  "recipe.args={n_blocks: 2, dim: 64, hidden: 128, num_samples: 4096}"])
    assert report["faults_planned"] == 5 and report["faults_fired"] == 5
    kinds = set(report["faults_planned_by_kind"])  # every kind once, as far as 5 faults go
    assert kinds <= set(fault_kinds()) and len(kinds) == min(5, len(fault_kinds()))
    assert report["status"] == "succeeded" and report["final_step"] == 24
    # A ``slow`` step interrupts nothing (at most a straggler alert); every other kind is a failure.
    interrupting = 5 - report["faults_planned_by_kind"].get("slow", 0)
    assert report["failures_seen"] == interrupting and report["recovered"] == interrupting
    assert report["all_recovered"]
    assert report["state_matches_reference"] is True
    assert report["samples"]["duplicated"] == 0 and report["samples"]["skipped"] == 0
    skipped = report["faults_planned_by_kind"].get("nan", 0)  # each skips its step's batch on purpose
    assert report["samples"]["consumed"] == (24 - skipped) * 32
    assert report["mlflow"]["step_metrics"] >= 5
    assert report["mlflow"]["missing"] == 0 and report["mlflow"]["duplicated"] == 0
    assert report["nothing_lost"]
