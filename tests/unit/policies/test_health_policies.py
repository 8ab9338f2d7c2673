"""The health policies on their own: hung-rank blame, bad losses, stragglers, throughput,
the pre-flight report helpers and the health config keys."""

from __future__ import annotations

import math

import pytest

from raypod.config import ConfigError, load_config
from raypod.doctor import Check, NodeReport, failing_nodes, storage_check
from raypod.policies.health import LossRule, StragglerTracker, ThroughputWatch, hung_rank
from raypod.protocol import Heartbeat, Phase


def hb(step: int, phase: int, name: str = "", in_phase_s: float = 5.0) -> Heartbeat:
    """A heartbeat at ``phase`` (``name``, when given, is the phase's label: checked here)."""
    assert not name or Phase(phase).label == name
    return Heartbeat(rank=0, step=step, phase=Phase(phase), in_phase_s=in_phase_s)


def test_the_rank_behind_the_others_is_hung():
    rank, why = hung_rank({0: hb(8, 1, "sync"), 1: hb(8, 0, "start"), 2: hb(8, 1, "sync")})
    assert rank == 1 and "stuck at step 8 in phase start" in why and "step 8 sync" in why


def test_a_silent_rank_is_hung_before_anyone_behind():
    assert hung_rank({0: hb(8, 0), 1: None, 2: hb(8, 2)})[0] == 1


def test_no_blame_when_every_rank_is_at_the_same_place():
    rank, why = hung_rank({0: hb(8, 2, "forward_backward"), 1: hb(8, 2, "forward_backward")})
    assert rank is None and "every rank is at step 8" in why


def test_inside_one_phase_the_rank_that_entered_fewer_blocks_is_hung():
    # Rank 2 is stuck computing block 3 of its backward; ranks 0 and 1 went on to block 4 and
    # wait in its collective.
    at = {r: Heartbeat(rank=r, step=8, phase=Phase.FORWARD_BACKWARD, in_phase_s=6.0, progress=p)
          for r, p in ((0, 4), (1, 4), (2, 3))}
    rank, why = hung_rank(at)
    assert rank == 2 and "(block 3)" in why and "step 8 forward_backward (block 4)" in why
    at[2].progress = 4  # all in the same collective: nobody to blame
    assert hung_rank(at)[0] is None


def test_loss_rule_nan_inf_and_spikes():
    rule = LossRule(spike_factor=3.0, window=10, min_history=3)
    assert rule.check(float("nan")) == "nan" and rule.check(math.inf) == "nan"
    assert rule.check(100.0) is None  # too little history for the spike rule
    for loss in (5.0, 4.0, 4.5):
        assert rule.check(loss) is None
    assert rule.check(20.0) == "loss_spike"  # 20 > 3 x median(100, 5, 4, 4.5) = 14.25
    assert rule.check(12.0) is None  # the spike was not recorded
    assert LossRule(spike_factor=0.0).check(1e9) is None


def test_straggler_needs_persistence_and_is_reported_once():
    t = StragglerTracker(factor=2.0, steps=3)
    for _ in range(2):
        assert t.update({0: 1.0, 1: 3.0})[1] == []
    assert t.update({0: 1.0, 1: 0.5})[1] == []  # the streak breaks
    for _ in range(2):
        assert t.update({0: 1.0, 1: 3.0})[1] == []
    worst, slow = t.update({0: 1.0, 1: 3.0})
    assert worst == pytest.approx(3.0) and slow == [(1, pytest.approx(3.0))]
    assert t.update({0: 1.0, 1: 3.0})[1] == []  # once per group
    t.reset()
    assert t.streak == {} and t.reported == set()


def test_straggler_ignores_noise_on_tiny_steps_and_can_be_off():
    assert StragglerTracker(2.0, 1).update({0: 0.001, 1: 0.01})[1] == []
    assert StragglerTracker(0.0, 1).update({0: 1.0, 1: 9.0}) == (1.0, [])


def test_throughput_collapse_alerts_once_until_it_recovers():
    w = ThroughputWatch(ratio=0.25, recent=3, history=20)
    assert all(w.update(100.0) is None for _ in range(6))
    assert w.update(10.0) is None  # one slow step: the median of the last 3 is still 100
    assert w.update(10.0) == pytest.approx(0.1)
    assert w.update(10.0) is None  # already alerting
    for _ in range(3):
        w.update(100.0)
    assert not w.alerting


def test_failing_nodes_name_the_first_failing_check():
    ok = NodeReport("a" * 20, "h1", [Check("storage", True, "writable")]).to_dict()
    bad = NodeReport("b" * 20, "h2", [Check("devices", True, "CPU"), Check("storage", False, "nope"),
                                      Check("allreduce", False, "slow")]).to_dict()
    assert failing_nodes([ok, bad]) == {"b" * 20: "storage: nope"}


def test_storage_check(tmp_path):
    assert storage_check(str(tmp_path)).ok
    (tmp_path / "file").write_text("x")
    c = storage_check(str(tmp_path / "file" / "runs"))
    assert not c.ok and "is not writable" in c.detail


@pytest.mark.parametrize("override,key", [
    ("fault.straggler_factor=1.0", "fault.straggler_factor"),
    ("fault.loss_spike_factor=0.5", "fault.loss_spike_factor"),
    ("fault.throughput_alert_ratio=1.5", "fault.throughput_alert_ratio"),
    ("fault.max_bad_steps=-1", "fault.max_bad_steps"),
    ("fault.inject=[{step: 3, rank: 0, kind: slow, delay_s: 0}]", "fault.inject[0].delay_s"),
    ("fault.inject=[{step: 3, rank: 0, kind: melt}]", "fault.inject[0].kind"),
    ("fault.silent_s=-1", "fault.silent_s"),
    ("doctor.allreduce_mb=0", "doctor.allreduce_mb"),
])
def test_bad_health_keys_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


def test_new_fault_kinds_are_accepted():
    cfg = load_config(None, ["fault.inject=[{step: 2, rank: 0, kind: hang}, {step: 3, rank: 1, kind: slow},"
                             " {step: 4, rank: 0, kind: nan}, {step: 5, rank: 1, kind: preempt},"
                             " {step: 6, rank: 1, kind: freeze}, {step: 7, rank: 0, kind: freeze_node}]"])
    assert [f.kind for f in cfg.fault.inject] == ["hang", "slow", "nan", "preempt", "freeze", "freeze_node"]
    assert cfg.fault.inject[1].delay_s == 1.0


def test_each_ranks_median_of_the_others_is_read_off_one_sort():
    import random
    import statistics

    from raypod.policies.health import _median_without

    rng = random.Random(0)
    for _ in range(500):
        values = sorted(rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(rng.randint(2, 9)))
        for skip in range(len(values)):
            assert _median_without(values, skip) == statistics.median(values[:skip] + values[skip + 1:])
