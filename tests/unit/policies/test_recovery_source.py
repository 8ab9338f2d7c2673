"""The recovery-source policy: redo from the newest in-memory snapshot, or load the newest
committed checkpoint, whichever gets training back to where it was soonest."""

from __future__ import annotations

import json

from raypod.policies.recovery_source import CHECKPOINT, MEMORY, choose_source, estimate


def test_memory_newer_than_the_checkpoint_is_restored():
    """A snapshot of the step before the failure beats a checkpoint 9 steps back plus its load."""
    mem = estimate(MEMORY, 24, target=25, step_s=0.3)
    ckpt = estimate(CHECKPOINT, 20, target=25, step_s=0.3, load_s=0.5)
    choice = choose_source([ckpt, mem])
    assert choice.chosen is mem and mem.est_s == 0.3
    assert "memory step 24" in choice.reason


def test_a_much_newer_checkpoint_beats_an_old_snapshot():
    """The mlp.yaml case: snapshot at step 5, checkpoint at step 20, lost step 25."""
    mem = estimate(MEMORY, 5, target=24, step_s=0.3)
    ckpt = estimate(CHECKPOINT, 20, target=24, step_s=0.3, load_s=0.5)
    choice = choose_source([mem, ckpt])
    assert choice.chosen is ckpt and choice.chosen.in_place
    assert round(mem.est_s, 6) == round(19 * 0.3, 6) and round(ckpt.est_s, 6) == round(4 * 0.3 + 0.5, 6)
    rec = choice.record()
    assert rec["chosen"] == "checkpoint" and rec["memory_step"] == 5 and rec["checkpoint_step"] == 20
    assert rec["est_memory_s"] == 5.7 and rec["est_checkpoint_s"] == 1.7
    json.dumps(rec)  # goes into summary.json as it is


def test_a_slow_load_keeps_the_older_snapshot():
    """Storage that takes longer to read than the steps to redo: memory wins although older."""
    mem = estimate(MEMORY, 15, target=24, step_s=0.1)
    ckpt = estimate(CHECKPOINT, 20, target=24, step_s=0.1, load_s=30.0)
    assert choose_source([mem, ckpt]).chosen is mem


def test_a_restart_counts_against_the_checkpoint():
    """When the load cannot happen in place, the group start is part of its cost."""
    mem = estimate(MEMORY, 10, target=20, step_s=0.2)
    in_place = estimate(CHECKPOINT, 18, target=20, step_s=0.2, load_s=0.5)
    restart = estimate(CHECKPOINT, 18, target=20, step_s=0.2, load_s=0.5, restart_s=8.0)
    assert choose_source([mem, in_place]).chosen is in_place
    assert choose_source([mem, restart]).chosen is mem and not restart.in_place


def test_a_tie_goes_to_memory():
    """Same step in memory and on storage: nothing needs reading."""
    mem = estimate(MEMORY, 20, target=22, step_s=0.0)
    ckpt = estimate(CHECKPOINT, 20, target=22, step_s=0.0, load_s=0.0)
    assert choose_source([ckpt, mem]).chosen is mem


def test_no_checkpoint_or_no_memory_leaves_the_other():
    mem = estimate(MEMORY, 3, target=9, step_s=1.0)
    only_mem = choose_source([mem])
    assert only_mem.chosen is mem and "no committed checkpoint" in only_mem.reason
    assert only_mem.record() == {"chosen": "memory", "memory_step": 3, "est_memory_s": 6.0,
                                 "reason": only_mem.reason}
    ckpt = estimate(CHECKPOINT, 5, target=9, step_s=1.0, load_s=2.0)
    only_ckpt = choose_source([ckpt])
    assert only_ckpt.chosen is ckpt and "no usable in-memory snapshot" in only_ckpt.reason
    nothing = choose_source([])
    assert nothing.chosen is None and nothing.record()["chosen"] is None
