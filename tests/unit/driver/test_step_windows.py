"""Step windows (``train.step_window``): the driver grants each step once for all ranks in the
job's store; each rank's window call reads its grants and streams a result per step back."""

from __future__ import annotations

import os
import threading
import time
import types

import pytest

from raypod.driver.inflight import STEP, InFlight
from raypod.driver.windows import KEEP_KEYS, StepWindows
from raypod.protocol import ErrorKind
from raypod.worker.grants import StepGrants, step_key
from raypod.worker.rendezvous import RendezvousStore


@pytest.fixture
def store():
    s = RendezvousStore()
    _, port = s.open(1, 10.0)
    yield s, f"127.0.0.1:{port}"
    s.close()


def test_grants_reach_a_rank_in_order_and_the_end_marker_ends_its_window(store):
    master, address = store
    windows, reader = StepWindows(master), StepGrants(slice_s=0.5)
    key = windows.start(5)
    got: list[tuple[int, bool | None, float]] = []

    def rank() -> None:
        step = 5
        while True:
            snap = reader.wait(address, key, step, lambda: False, 30.0)
            got.append((step, snap, time.monotonic()))
            if snap is None:
                return
            step += 1

    t = threading.Thread(target=rank)
    t.start()
    windows.grant(5, True)
    windows.grant(6, False)
    time.sleep(0.2)  # the rank waits for step 7's grant: it has none yet
    assert [(s, f) for s, f, _ in got] == [(5, True), (6, False)]
    t_grant = time.monotonic()
    windows.grant(7, True)
    windows.end()
    t.join(5.0)
    assert not t.is_alive()
    assert [(s, f) for s, f, _ in got] == [(5, True), (6, False), (7, True), (8, None)]
    assert got[2][2] - t_grant < 0.3  # a grant wakes the waiting rank at once, not at its slice's end
    assert windows.key is None
    with pytest.raises(AssertionError):  # no window open: nothing can be granted
        windows.grant(8, True)


def test_a_window_keeps_a_few_grants_in_the_store(store):
    master, _ = store
    windows = StepWindows(master)
    key = windows.start(1)
    for step in range(1, KEEP_KEYS + 4):
        windows.grant(step, False)
    raw = master._store
    assert not raw.check([step_key(key, 1)]) and not raw.check([step_key(key, 3)])
    assert all(raw.check([step_key(key, s)]) for s in range(4, KEEP_KEYS + 4))


def test_an_interrupted_rank_stops_waiting_for_its_grant(store):
    _, address = store
    reader, stop = StepGrants(slice_s=0.2), threading.Event()
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    assert reader.wait(address, "raypod/grant/none", 1, stop.is_set, 30.0) is None
    assert 0.25 < time.monotonic() - t0 < 2.0


def test_a_long_wait_for_a_grant_is_logged_and_goes_on(store, caplog):
    """A busy driver (a slow commit) grants late: the rank keeps its window and says so once."""
    master, address = store
    windows, reader = StepWindows(master), StepGrants(slice_s=0.1)
    key = windows.start(1)
    threading.Timer(0.6, windows.grant, (1, True)).start()
    with caplog.at_level("WARNING", logger="raypod.worker"):
        assert reader.wait(address, key, 1, lambda: False, 0.2) is True
    assert [r.getMessage() for r in caplog.records] == ["no grant for step 1 for 0 s: still waiting for the driver"]


def _window_class():
    import ray

    @ray.remote(max_restarts=0, max_task_retries=0)
    class Rank:
        def window(self, first: int, fail_at: int | None, n: int, rank: int = 0):
            for step in range(first, first + n):
                time.sleep(0.05)
                if step == fail_at:
                    raise RuntimeError("[gloo] Connection closed by peer")
                yield types.SimpleNamespace(step=step, rank=rank)

        def ping(self) -> int:
            return os.getpid()

    return Rank


@pytest.mark.parametrize("fail_at", [None, 13])
def test_a_window_call_streams_its_steps_and_its_error_ends_it(ray_connected, fail_at):
    import ray

    rank = _window_class().remote()
    try:
        calls = InFlight()
        calls.add(rank.window.options(num_returns="streaming").remote(10, fail_at, 6), 0, STEP, 10)
        steps, errors, polls = [], [], 0
        deadline = time.monotonic() + 30
        while len(calls) and time.monotonic() < deadline:
            out = calls.poll([rank], timeout=0.5)
            polls += 1
            steps += [r.step for r in out.steps]
            errors += out.errors
        assert len(calls) == 0  # the call leaves the calls in flight when its stream ends
        if fail_at is None:
            assert steps == list(range(10, 16)) and errors == []
        else:
            assert steps == [10, 11, 12] and len(errors) == 1
            assert errors[0].rank == 0 and errors[0].step == 13 and errors[0].kind == ErrorKind.PEER_LOST
        assert polls > 1  # results arrive while the call runs, not at its end
    finally:
        ray.kill(rank)


@pytest.mark.parametrize("failing", [None, 3])
def test_a_poll_collects_a_few_streams_and_an_ended_one_first(ray_connected, failing):
    """Past ``per_collect`` streams with results ready (``COLLECT_PER_POLL``: 10,000 ranks' step
    results), a poll collects that many, and the others in the next poll; a stream whose call
    ended with an error is taken first, so a lost rank's error never waits behind the other
    ranks' results."""
    import ray

    ranks = [_window_class().remote() for _ in range(4)]
    try:
        calls = InFlight(per_collect=2)
        # The failing rank's window ends at its step 2; the others' run on (50 steps).
        gens = [r.window.options(num_returns="streaming").remote(1, 2 if i == failing else None,
                                                                 2 if failing is None else 50, i)
                for i, r in enumerate(ranks)]
        for i, g in enumerate(gens):
            calls.add(g, i, STEP, 1)
        ended = [g.completed() for g in gens] if failing is None else [gens[failing].completed()]
        ray.wait(ended, num_returns=len(ended), timeout=30, fetch_local=False)
        first = calls.poll(ranks, timeout=5)
        if failing is None:
            assert sorted(r.rank for r in first.steps) == [0, 0, 1, 1]  # two streams a poll
            second = calls.poll(ranks, timeout=5)
            assert sorted(r.rank for r in second.steps) == [2, 2, 3, 3]  # then the others
            assert len(calls) == 0
        else:  # the last stream in order, taken first (after an error every stream is collected)
            # (then the ranks whose pings queue behind their windows here are taken for dead)
            assert (first.errors[0].rank, first.errors[0].step) == (3, 2)
            assert 3 in {r.rank for r in first.steps}
    finally:
        for r in ranks:
            ray.kill(r)
