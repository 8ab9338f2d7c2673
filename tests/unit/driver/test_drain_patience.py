"""The drain after a failure gives up a rank whose call does not end, except that a rank
holding the only in-memory copy of a state is waited for as long as the way back without
it would take (``InFlight.drain``'s ``keep`` and ``patience``), on real Ray actors."""

from __future__ import annotations

import time
import types

import pytest

from raypod.driver.inflight import STEP, InFlight
from raypod.protocol import Interrupted


def _rank_class():
    import ray

    @ray.remote(num_cpus=0, concurrency_groups={"health": 1})
    class Rank:
        """A rank whose step call runs on past its groups' abort (a call that nothing aborts)."""

        def step(self, seconds: float) -> None:
            time.sleep(seconds)
            raise RuntimeError("its groups were aborted")

        @ray.method(concurrency_group="health")
        def interrupt(self, attempt: int | None = None, answer_after_s: float = 0.0) -> Interrupted:
            time.sleep(answer_after_s)
            return Interrupted(rank=0, step=5, phase=None, in_phase_s=0.0)

    return Rank


@pytest.mark.parametrize("keep", [False, True])
def test_a_rank_with_the_only_copy_is_waited_for_and_kept(ray_connected, keep):
    import ray

    rank = _rank_class().remote()
    try:
        calls = InFlight()
        calls.add(rank.step.remote(2.0), 0, STEP, 5)
        t0 = time.monotonic()
        lost = calls.drain([rank], timeout=0.5, keep={0} if keep else set(), patience=lambda: 10.0)
        took = time.monotonic() - t0
        if keep:  # its call ended (with an error) within the extra wait: a survivor
            assert lost == set() and 1.5 < took < 8.0
        else:  # the drain's own timeout: given up as hung
            assert lost == {0} and took < 1.9
    finally:
        ray.kill(rank)


def test_the_extra_wait_ends_at_the_patience(ray_connected):
    import ray

    rank = _rank_class().remote()
    try:
        calls = InFlight()
        calls.add(rank.step.remote(30.0), 0, STEP, 5)
        t0 = time.monotonic()
        lost = calls.drain([rank], timeout=0.5, keep={0}, patience=lambda: 1.5)
        took = time.monotonic() - t0
        assert lost == {0} and 1.3 < took < 4.0
    finally:
        ray.kill(rank)


def test_an_interrupt_answered_late_still_counts(ray_connected, monkeypatch):
    """On a busy host the rank answers the interrupt after the ping's 0.5 s but before the
    drain's timeout: it is alive, so it is waited for (and kept) all the same."""
    import ray

    from raypod.driver import inflight

    rank = _rank_class().remote()
    try:
        ray.get(rank.interrupt.remote(None))  # the actor is up
        slow = types.SimpleNamespace(interrupt=types.SimpleNamespace(
            remote=lambda attempt: rank.interrupt.remote(attempt, inflight.PING_TIMEOUT_S + 0.3)))
        calls = InFlight()
        calls.add(rank.step.remote(2.5), 0, STEP, 5)
        t0 = time.monotonic()
        lost = calls.drain([slow], timeout=1.5, keep={0}, patience=lambda: 8.0)
        took = time.monotonic() - t0
        assert lost == set() and 2.0 < took < 8.0
    finally:
        ray.kill(rank)


def test_a_rank_being_killed_is_not_interrupted_or_waited_for(ray_connected):
    """Rank 1 is the frozen rank the driver is killing: its call never ends and it would never
    answer an interrupt. The drain interrupts only rank 0 and ends once rank 0's call has."""
    import ray

    live, frozen = _rank_class().remote(), _rank_class().remote()
    try:
        ray.get([live.interrupt.remote(None), frozen.interrupt.remote(None)])  # both up
        silent = types.SimpleNamespace(interrupt=types.SimpleNamespace(
            remote=lambda attempt: frozen.interrupt.remote(attempt, 30.0)))
        calls = InFlight()
        calls.add(live.step.remote(0.3), 0, STEP, 5)
        calls.add(frozen.step.remote(30.0), 1, STEP, 5)
        t0 = time.monotonic()
        lost = calls.drain([live, silent], timeout=3.0, gone={1})
        took = time.monotonic() - t0
        assert lost == {1} and took < 1.5, took  # not the ping's 0.5 s plus the 3 s timeout
    finally:
        ray.kill(live)
        ray.kill(frozen)


def test_stuck_ranks_are_interrupted_through_their_node_agent(ray_connected):
    """With node agents the drain's interrupts go out as one call per node (the agent calls its
    ranks); both ranks answer through it and end their calls as survivors."""
    import ray

    from raypod.driver.rank_calls import call_ranks
    from raypod.worker.node_agent import remote_node_agent

    ranks = [_rank_class().remote(), _rank_class().remote()]
    agent = remote_node_agent(ray.get_runtime_context().get_node_id()).remote()
    relayed: list[tuple[str, list[int]]] = []

    def relay(method, which, args, timeout):
        relayed.append((method, which))
        return call_ranks(method, which, ranks, ["n0", "n0"], {"n0": agent}, args, timeout)

    try:
        ray.get([r.interrupt.remote(None) for r in ranks])  # both up
        calls = InFlight()
        for i, r in enumerate(ranks):
            calls.add(r.step.remote(0.8), i, STEP, 5)
        lost = calls.drain(ranks, timeout=3.0, attempt=0, relay=relay)
        assert lost == set() and relayed == [("interrupt", [0, 1])]
    finally:
        for a in [agent, *ranks]:
            ray.kill(a)
