"""The samples ledger counts what the ranks reported, against the seeded order."""

from __future__ import annotations

import numpy as np

from raypod.callbacks import FailureEvent
from raypod.data.order import SampleOrder
from raypod.driver.accounting import JobAccounting


def _report(order: SampleOrder, step: int, world: int) -> list[tuple[int, np.ndarray]]:
    return [(order.epoch_of(step), SampleOrder.rank_share(order.ids(step), r, world)) for r in range(world)]


def _acct(order: SampleOrder, start: int = 0) -> JobAccounting:
    acct = JobAccounting(0.0, start_step=start)
    acct.order = order
    return acct


def test_rewind_and_resize_keep_the_ledger_exact():
    order = SampleOrder(40, 8, seed=0)  # 5 steps an epoch
    acct = _acct(order)
    for step in range(1, 5):
        acct.step_done(step, 0.1, _report(order, step, 3))
    ev = FailureEvent(kind="kill", rank=1, step=5, message="", detected_s=0.0)
    acct.failure(ev)
    acct.rolled_back(ev, 2, 2, "memory step 2")  # steps 3-4 are redone at another world size
    for step in range(3, 13):
        acct.step_done(step, 0.1, _report(order, step, 2))
    assert acct.samples() == {"consumed": 96, "duplicated": 0, "skipped": 0}


def test_a_missing_step_is_skipped_and_a_repeat_is_duplicated():
    order = SampleOrder(40, 8, seed=0)
    acct = _acct(order, start=2)
    acct.step_done(3, 0.1, _report(order, 3, 2))
    acct.step_done(5, 0.1, _report(order, 5, 2))  # step 4 never reported
    assert acct.samples() == {"consumed": 16, "duplicated": 0, "skipped": 8}
    acct.step_done(6, 0.1, [(order.epoch_of(6), order.ids(6)), (order.epoch_of(6), order.ids(6)[:1])])
    assert acct.samples() == {"consumed": 25, "duplicated": 1, "skipped": 8}


def test_a_step_as_ordered_keeps_no_ids_and_an_odd_one_keeps_them_all():
    # The driver's memory does not grow with the samples: a step whose ranks consumed exactly
    # its share of the order keeps no ids (they are counted from the order); one that did
    # not keeps what the ranks reported, and the books still find the duplicate.
    order = SampleOrder(40, 8, seed=0)
    acct = _acct(order)
    acct.step_done(1, 0.1, _report(order, 1, 2))
    odd = _report(order, 2, 2)
    odd[1] = (odd[1][0], np.concatenate([odd[1][1], odd[0][1][:1]]))  # rank 1 also took one of rank 0's
    acct.step_done(2, 0.1, odd)
    assert acct.ids[1] is None and acct.ids[2] is odd
    assert acct.samples() == {"consumed": 17, "duplicated": 1, "skipped": 0}
