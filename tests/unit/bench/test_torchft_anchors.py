"""The torchft anchors' records and the fair measures computed from them: per-group step logs with
samples, the recovery suite's replica figures, throughput goodput and final-state comparison, the
goodput suite's merged completions and sample goodput. Fake logs, no torchft (but the last test)."""

from __future__ import annotations

import pytest

from raypod.bench import goodput as gp
from raypod.bench import recovery as rec


def _write(path, lines: list[str]) -> str:
    path.write_text("".join(f"{ln}\n" for ln in lines))
    return str(path)


def _group(steps: range, t0: float, dt: float, attempt: int = 0, samples: int = 16,
           committed: bool = True) -> list[rec.Line]:
    return [(s, t0 + i * dt, attempt, samples, committed) for i, s in enumerate(steps)]


# ---- step logs ---------------------------------------------------------------------------
def test_a_log_with_samples_reads_them_and_a_three_column_log_stays_readable(tmp_path):
    new = _write(tmp_path / "steps.rg0.log", ["25,100.5,0,16,1", "26,101.0,0,16,0", "26,106.0,0,0,1"])
    old = _write(tmp_path / "steps.log", ["1,10.0,0", "2,11.0,0"])
    assert rec.read_group_log(new) == [(25, 100.5, 0, 16, True), (26, 101.0, 0, 16, False),
                                       (26, 106.0, 0, 0, True)]
    assert rec.read_group_log(old) == [(1, 10.0, 0, rec.GLOBAL_BATCH, True), (2, 11.0, 0, rec.GLOBAL_BATCH, True)]
    assert rec.read_step_log(new) == [(25, 100.5, 0), (26, 101.0, 0), (26, 106.0, 0)]  # extra columns ignored


def test_kept_samples_take_the_last_run_of_each_step():
    # A checkpoint restart: steps 21..25 ran twice; the replay supersedes the first run.
    lines = _group(range(1, 26), 0.0, 1.0, samples=32) + _group(range(21, 61), 90.0, 1.0, 1, samples=32)
    assert rec.kept_samples(lines) == 60 * 32
    # torchft: step 26 thrown away (not committed), then committed by the survivor alone.
    ft = _group(range(1, 26), 0.0, 1.0) + [(26, 26.0, 0, 16, False), (26, 31.0, 0, 16, True)]
    assert rec.kept_samples(ft) == 26 * 16


# ---- the recovery suite ------------------------------------------------------------------
def _torchft_run(back_at: float | None) -> dict[int, list[rec.Line]]:
    """Group 1 dies after step 25 (t = 124.0); group 0 stalls 5 s, goes on alone from step 26; group 1
    heals at step ``heal`` (samples 0) and trains from the next step with group 0."""
    g0 = _group(range(1, 26), 100.0, 1.0) + [(26, 125.0, 0, 16, False)] + _group(range(26, 61), 130.0, 0.5)
    g1 = _group(range(1, 26), 100.0, 1.0)
    if back_at is not None:
        heal = 26 + int((back_at - 130.0) / 0.5)
        g1 += [(heal, back_at, 1, 0, True)] + _group(range(heal + 1, 61), back_at + 0.5, 0.5, 1)
    return {0: g0, 1: g1}


def test_replica_figures_separate_the_gap_from_the_lost_group_coming_back():
    groups = _torchft_run(back_at=140.0)
    fig = rec.replica_figures(groups, fault_time=124.2, exit_code=0, fault="kill")
    assert fig["gap_s"] == pytest.approx(6.0)  # 124.0 -> 130.0: the survivor's stall only
    assert fig["lost_back_s"] == pytest.approx(140.5 - 124.2)  # its first step with samples, after healing
    assert fig["replayed"] == 1  # step 26 thrown away once
    assert fig["narrow_steps"] == 21  # steps 26..45 alone, + the healing step 46
    assert fig["samples"] == 60 * 32 - 21 * 16
    assert fig["final_step"] == rec.MAX_STEPS and fig["recovered"] is True


def test_survivors_that_finish_alone_recover_without_the_lost_group():
    fig = rec.replica_figures(_torchft_run(back_at=None), fault_time=124.2, exit_code=0)
    assert fig["recovered"] is True and fig["lost_back_s"] is None
    assert fig["samples"] == 25 * 32 + 35 * 16 and fig["narrow_steps"] == 35


def test_replica_figures_without_the_marker_or_logs():
    fig = rec.replica_figures(_torchft_run(back_at=None), fault_time=None, exit_code=0)
    assert fig["recovered"] is False and "never fired" in fig["why"]
    with pytest.raises(RuntimeError, match="empty"):
        rec.replica_figures({0: [], 1: []}, 124.2, 0)


def test_throughput_goodput_and_final_state_against_each_systems_reference():
    assert rec.throughput_goodput(1360, 50.0, 1920, 40.0) == pytest.approx((1360 / 50) / (1920 / 40), abs=1e-3)
    assert rec.throughput_goodput(None, 50.0, 1920, 40.0) is None
    trials = {"torchft:kill": [{"system": "torchft", "samples": 1360, "process_s": 50.0, "digest": "b",
                                "recovered": True, "replayed": 1, "gap_s": 6.0, "lost_back_s": 16.3}],
              "raypod:kill": [{"system": "raypod", "samples": 1920, "process_s": 44.0, "digest": "a",
                               "recovered": True, "replayed": 1, "gap_s": 0.5, "lost_back_s": 0.9}],
              "torchrun:kill": [{"system": "torchrun", "samples": 1920, "process_s": 60.0, "digest": None,
                                 "recovered": True, "replayed": 6, "gap_s": 9.0, "lost_back_s": 9.0}]}
    refs = {"torchft": {"samples": 1888, "process_s": 40.0, "digest": "c", "recovered": True},
            "raypod": {"samples": 1920, "process_s": 40.0, "digest": "a", "recovered": True},
            "torchrun": {"samples": 1920, "process_s": 50.0, "digest": None, "recovered": True}}
    rec.apply_references(trials, refs)
    ft, rp, tr = trials["torchft:kill"][0], trials["raypod:kill"][0], trials["torchrun:kill"][0]
    assert ft["goodput_tput"] == pytest.approx((1360 / 50) / (1888 / 40), abs=1e-3) and ft["state_equal"] is False
    assert rp["goodput_tput"] == pytest.approx(40 / 44, abs=1e-3) and rp["state_equal"] is True
    assert tr["state_equal"] is None  # that anchor writes no digest
    summary = rec.summarise(trials, ("kill",), ("raypod", "torchrun", "torchft"))
    assert summary["median"]["raypod:kill"]["state_equal"] == "1/1"
    assert summary["median"]["torchft:kill"]["lost_back_s"] == pytest.approx(16.3)


def test_systems_option_parses_and_rejects():
    assert rec.parse_systems("torchft,raypod") == ("raypod", "torchft")  # suite order
    with pytest.raises(ValueError, match="systems must be"):
        rec.parse_systems("torchft,deepspeed")


# ---- the goodput suite -------------------------------------------------------------------
def test_goodput_merges_group_logs_and_counts_half_width_steps_as_half():
    # Group 0 (rank 0) is killed at t = 10.2 and back at step 16 (t = 15.5): group 1 went on alone.
    g0 = _group(range(1, 11), 1.0, 1.0) + [(16, 15.5, 1, 0, True)] + _group(range(17, 21), 16.0, 1.0, 1)
    g1 = _group(range(1, 21), 1.0, 1.0)[:10] + _group(range(11, 21), 10.5, 0.5)[:5] + _group(range(16, 21), 15.5, 1.0)
    groups = {0: g0, 1: g1}
    rows = gp.group_rows(groups)
    assert [r[0] for r in rows] == list(range(1, 21))
    kills = [{"t": 10.2, "rank": 0, "fired": True}]
    fig = gp.sample_figures(rows, groups, kills, end=30.0, step_s=1.0)
    alone = 6  # steps 11..16: group 1 only (group 0 healing at 16, no samples)
    assert fig["kept_samples"] == 19 * 32 - alone * 16
    assert fig["sample_goodput"] == pytest.approx(fig["kept_samples"] / (32 * 29.0), abs=1e-4)
    assert fig["lost_back_s"] == [pytest.approx(16.0 - 10.2)]


def test_goodput_samples_of_a_system_that_trains_the_whole_batch_equal_its_goodput():
    rows = [(s, float(s), 0) for s in range(1, 11)] + [(s, 20.0 + s, 1) for s in range(6, 21)]
    kills = [{"t": 10.5, "rank": 1, "fired": True}, {"t": 35.0, "rank": 0, "fired": False}]
    fig = gp.sample_figures(rows, None, kills, end=40.0, step_s=1.0)
    base = gp.goodput_figures(rows, [10.5], 40.0)
    assert fig["kept_samples"] == base["kept_steps"] * 32
    assert fig["sample_goodput"] == pytest.approx(base["goodput"], abs=1e-4)
    assert fig["lost_back_s"] == [pytest.approx(26.0 - 10.5)]  # the unfired kill is not counted


# ---- the anchors' torchft pieces ----------------------------------------------------------
def test_the_torchft_anchors_pieces_import_and_digest_a_replica():
    pytest.importorskip("torchft")
    from torchft import Manager, ProcessGroupGloo  # noqa: F401
    from torchft.checkpointing.pg_transport import PGTransport  # noqa: F401

    from raypod.bench.anchors import mlp_ray_train_torchft, mlp_torchft
    from raypod.bench.anchors.mlp_common import MLPJob, ReplicaRun, state_digest

    assert callable(mlp_torchft.replica) and callable(mlp_ray_train_torchft.train_loop_per_worker)
    job = MLPJob(n_blocks=1, dim=8, hidden=16, num_samples=64)
    a, b = ReplicaRun(job, 0, 2), ReplicaRun(job, 1, 2)
    assert state_digest(a.model, a.optimizer) == state_digest(b.model, b.optimizer)  # same seed, same start
    assert sorted(a.ids(1) + b.ids(1)) == sorted(a.order.ids(1).tolist())  # the two halves of the batch
    b.load_state_dict(a.state_dict())
    with __import__("torch").no_grad():
        next(a.model.parameters()).add_(1.0)
    assert state_digest(a.model, a.optimizer) != state_digest(b.model, b.optimizer)


def test_the_gap_starts_at_the_lost_groups_last_step_even_when_the_survivor_logs_it_after_the_fault():
    groups = _torchft_run(back_at=140.0)
    groups[0] = [(s, 124.3 if s == 25 else t, a, n, c) for s, t, a, n, c in groups[0]]  # step 25 done late
    fig = rec.replica_figures(groups, fault_time=124.2, exit_code=0)
    assert fig["gap_s"] == pytest.approx(130.0 - 124.3)


def test_goodput_keeps_only_the_steps_since_a_restart_from_scratch():
    # Every group lost at t = 20.5: training starts again from step 1 (no live peer, no checkpoint).
    rows = [(s, float(s), 0) for s in range(5, 21)] + [(s, 25.0 + s, 0) for s in range(1, 11)]
    fig = gp.goodput_figures(rows, [20.5], 40.0)
    assert fig["kept_steps"] == 10  # steps 1..10 of the new state; 5..20 are gone


def test_sample_goodput_counts_only_the_restarted_states_samples():
    # Both groups lost at t = 20.5 and back from scratch: the samples of steps 1..20 before are gone.
    g = {g: _group(range(1, 21), 1.0, 1.0) + _group(range(1, 11), 26.0, 1.0, 1) for g in (0, 1)}
    rows = gp.group_rows(g)
    assert gp.goodput_figures(rows, [20.5], 40.0)["kept_steps"] == 10
    fig = gp.sample_figures(rows, g, [{"t": 20.5, "rank": 1, "fired": True}], 40.0, 1.0)
    assert fig["kept_samples"] == 10 * 32
