"""Figures of the elastic benchmark, computed on synthetic step logs and summaries."""

from __future__ import annotations

from pathlib import Path

import pytest

from raypod.bench.anchors.elastic_ray_train import anchor_figures, read_groups, read_step_log
from raypod.bench.elastic import figures
from raypod.bench.elastic_suite import median_step_s, raypod_record, summarise

A, B, C, D = "node-a", "node-b", "node-c", "node-d"


def _anchor_log() -> tuple[list[tuple[int, float, int, int]], dict[int, list[str]]]:
    """1 rank (steps 1..30), resize to 3 from checkpoint 20 (21..35), node C lost,
    restart at 2 from checkpoint 20 (21..40)."""
    rows = [(s, 100.0 + s, 1, 0) for s in range(1, 31)]              # t 101..130
    rows += [(s, 150.0 + (s - 20), 3, 1) for s in range(21, 36)]     # t 151..165
    rows += [(s, 190.0 + (s - 20), 2, 2) for s in range(21, 41)]     # t 191..210
    groups = {0: [A], 1: [A, B, C], 2: [A, B]}
    return rows, groups


def test_anchor_node_to_step_gap_and_replay() -> None:
    rows, groups = _anchor_log()
    seen = {A: 99.0, B: 110.0, C: 120.5, D: 200.0}
    f = anchor_figures(rows, groups, seen, initial_nodes=[A],
                       terminated={"node_id": C, "at": 170.0})
    # B and C first ran a step at t=151 (attempt 1's first line); D never joined a group.
    assert f["node_to_step_s"] == [41.0, 30.5]
    assert f["nodes_never_used"] == [D]
    # last line before 170 is step 35 at 165; first after is step 21 at 191.
    assert f["shrink_gap_s"] == [26.0]
    assert f["shrink"] == {"last_step_before": 35, "first_step_after": 21, "world_size_after": 2,
                           "replayed": 15}
    # steps 21..30 run three times, 31..35 twice: 2*10 + 5 repeats.
    assert f["replayed"] == 25
    assert f["world_sizes"] == [1, 3, 2]
    assert f["resizes"] == [("grow", 1, 3), ("shrink", 3, 2)]
    assert f["attempts"] == 3
    assert f["final_step"] == 40


def test_anchor_node_needs_a_step_after_it_was_seen() -> None:
    # A node in a group whose lines all predate its first-seen time does not count then.
    rows = [(1, 10.0, 2, 0), (2, 11.0, 2, 0), (3, 20.0, 2, 0)]
    f = anchor_figures(rows, {0: [A, B]}, {A: 0.0, B: 15.0}, initial_nodes=[A], terminated=None)
    assert f["node_to_step_s"] == [5.0]
    assert f["shrink_gap_s"] == [] and f["shrink"] == {}
    assert f["replayed"] == 0


def test_anchor_no_rows() -> None:
    f = anchor_figures([], {}, {A: 1.0, B: 2.0}, initial_nodes=[A], terminated={"node_id": B, "at": 3.0})
    assert f["node_to_step_s"] == [] and f["nodes_never_used"] == [B]
    assert f["shrink_gap_s"] == [] and f["final_step"] is None


def test_step_log_and_groups_files(tmp_path: Path) -> None:
    (tmp_path / "steps.log").write_text("1,100.5,1,0\n2,101.25,1,0\n\n3,103.0,3,1\n")
    (tmp_path / "groups.jsonl").write_text('{"attempt": 0, "world_size": 1, "nodes": ["a"], "t": 1}\n'
                                           '{"attempt": 1, "world_size": 3, "nodes": ["a", "b", "c"], "t": 2}\n')
    assert read_step_log(tmp_path / "steps.log") == [(1, 100.5, 1, 0), (2, 101.25, 1, 0), (3, 103.0, 3, 1)]
    assert read_groups(tmp_path / "groups.jsonl") == {0: ["a"], 1: ["a", "b", "c"]}
    assert read_step_log(tmp_path / "missing.log") == []


def _raypod_summary() -> dict:
    steps = [(s, 10.0 + s, 1) for s in range(1, 21)]            # t 11..30 at 1 rank
    steps += [(s, 10.0 + s, 2) for s in range(21, 31)]          # grow to 2 after step 20 (at 30.2)
    steps += [(s, 10.0 + s, 3) for s in range(31, 51)]          # grow to 3 after step 30 (at 40.1)
    steps += [(s, 20.0 + s, 2) for s in range(51, 101)]         # shrink after step 50: 60 -> 71
    return {
        "status": "succeeded", "final_step": 100, "world_sizes": [1, 2, 3, 2],
        "samples": {"consumed": 1600, "duplicated": 0, "skipped": 0},
        "resizes": [{"kind": "grow", "step": 20, "from": 1, "to": 2, "at_s": 30.2},
                    {"kind": "grow", "step": 30, "from": 2, "to": 3, "at_s": 40.1},
                    {"kind": "shrink", "step": 50, "from": 3, "to": 2, "at_s": 61.0}],
        "events": [{"kind": "node_lost", "last_step_s": 60.0, "resumed_s": 71.5, "lost_steps": 0}],
        "elastic": {"nodes_seen_s": {A: 0.5, B: 25.0, C: 38.0}, "steps": steps,
                    "terminated": {"node_id": C, "at_s": 60.5, "after_step": 50}},
    }


def test_raypod_figures_and_record() -> None:
    s = _raypod_summary()
    f = figures(s)
    # B seen at 25.0, first step at 2 ranks (step 21) at 31.0; C seen at 38.0, step 31 at 41.0.
    assert f["node_to_step_s"] == [6.0, 3.0]
    assert f["shrink_gap_s"] == [11.5]
    rec = raypod_record(s, steps=100)
    assert rec["succeeded"] and rec["replayed"] == 0
    assert rec["node_to_step_s"] == [6.0, 3.0] and rec["shrink_gap_s"] == [11.5]
    assert rec["terminated"]["node_id"] == C
    assert raypod_record(s, steps=200)["succeeded"] is False


def test_raypod_back_to_back_grows() -> None:
    # Both nodes up before the first grow; the job grows 1->2 and 2->3 before a step completes
    # at 2: both new nodes first contribute to the first step at 3 ranks.
    steps = [(s, 10.0 + s, 1) for s in range(1, 40)]           # t 11..49
    steps += [(s, 10.0 + s, 3) for s in range(40, 50)]         # first step at 3: t 50
    steps += [(s, 20.0 + s, 2) for s in range(50, 60)]         # after the shrink, at 2
    s = {"status": "succeeded", "final_step": 59, "world_sizes": [1, 2, 3, 2],
         "resizes": [{"kind": "grow", "step": 39, "from": 1, "to": 2, "at_s": 47.0},
                     {"kind": "grow", "step": 39, "from": 2, "to": 3, "at_s": 49.0},
                     {"kind": "shrink", "step": 49, "from": 3, "to": 2, "at_s": 62.0}],
         "events": [], "elastic": {"nodes_seen_s": {A: 0.2, B: 30.0, C: 40.0}, "steps": steps}}
    assert figures(s)["node_to_step_s"] == [20.0, 10.0]
    # A replacement node seen after the shrink and a grow 2->3 it enables.
    s["elastic"]["nodes_seen_s"][D] = 75.0
    s["resizes"].append({"kind": "grow", "step": 58, "from": 2, "to": 3, "at_s": 78.5})
    s["elastic"]["steps"] = steps + [(60, 80.0, 3)]
    assert figures(s)["node_to_step_s"] == [20.0, 10.0, 5.0]


def test_summarise_medians_and_ratios() -> None:
    by = {"raypod": [{"node_to_step_s": [2.0, 4.0], "shrink_gap_s": [1.0], "replayed": 0, "succeeded": True}],
          "ray_train_v2": [{"node_to_step_s": [60.0], "shrink_gap_s": [10.0], "replayed": 25, "succeeded": True},
                           {"node_to_step_s": [], "shrink_gap_s": [], "replayed": None, "succeeded": False}]}
    out = summarise(by)
    assert out["median"]["raypod"] == {"node_to_step_s": 3.0, "shrink_gap_s": 1.0, "replayed": 0,
                                       "step_s": None, "succeeded": "1/1"}
    assert out["median"]["ray_train_v2"]["succeeded"] == "1/2"
    assert out["ratios"]["node_to_step_s raypod/ray_train_v2"] == pytest.approx(0.05)
    assert out["ratios"]["shrink_gap_s raypod/ray_train_v2"] == pytest.approx(0.1)


def test_median_step_skips_resizes_and_restarts() -> None:
    rows, _ = _anchor_log()
    assert median_step_s(rows) == 1.0  # jumps across attempts (and back in step number) are left out
    assert median_step_s([(1, 0.0, 1), (2, 0.5, 1), (3, 4.0, 2), (4, 4.5, 2), (5, 5.0, 2)]) == 0.5
    assert median_step_s([(1, 0.0, 1)]) is None
