"""Step windows opened through a node agent (``train.window_agents_from``): the agent calls its
ranks' ``train_window`` and streams their results up as one list per step; the driver's
``InFlight`` tracks each rank of that one stream. Real Ray actors: the production
``NodeAgent.window`` and ``InFlight``; the ranks stand in for ``TrainWorker``."""

from __future__ import annotations

import time
import types

import pytest
import ray

from raypod.driver.inflight import SAVE, STEP, InFlight
from raypod.protocol import ErrorKind
from raypod.worker.node_agent import remote_node_agent


def _rank_class():
    @ray.remote(max_restarts=0, max_task_retries=0, num_cpus=0)
    class Rank:
        """``train_window`` streams steps ``first``.. (``plan``: how many, the step that fails,
        a wait before the first); ``save`` records when it ran."""

        def __init__(self, rank: int, n: int, fail_at: int | None = None, first_delay: float = 0.0):
            self.rank, self.n, self.fail_at, self.first_delay, self.log = rank, n, fail_at, first_delay, []

        @ray.method(num_returns="streaming")
        def train_window(self, address: str, key: str, first: int):
            self.log.append(("window", key))
            time.sleep(self.first_delay)
            for step in range(first, first + self.n):
                time.sleep(0.03)
                if step == self.fail_at:
                    raise RuntimeError("[gloo] Connection closed by peer")
                yield types.SimpleNamespace(step=step, rank=self.rank)

        def save(self, step: int) -> list[int]:
            time.sleep(0.5)
            self.log.append(("save", step))
            return [step]

        def calls(self) -> list:
            return self.log

        def ping(self) -> int:
            return self.rank

    return Rank


@pytest.fixture
def agent(ray_connected):
    a = remote_node_agent(ray.get_runtime_context().get_node_id()).remote(every_s=5.0)
    yield a
    ray.kill(a)


def _drain(calls: InFlight, actors: list, seconds: float = 30.0):
    steps, errors = [], []
    deadline = time.monotonic() + seconds
    while len(calls) and time.monotonic() < deadline:
        out = calls.poll(actors, timeout=0.5)
        steps += [(r.rank, r.step) for r in out.steps]
        errors += out.errors
    return steps, errors


@pytest.mark.parametrize("fail_at", [None, 4])
def test_a_node_window_streams_each_rank_s_steps_and_a_rank_s_error(agent, fail_at):
    Rank = _rank_class()
    ranks = [Rank.remote(0, 5), Rank.remote(1, 5, fail_at)]
    try:
        calls = InFlight()
        calls.add(agent.window.options(num_returns="streaming").remote(dict(enumerate(ranks)), "a", "k", 2),
                  (0, 1), STEP, 2)
        assert calls._busy() == {0, 1}
        steps, errors = _drain(calls, ranks)
        assert len(calls) == 0 and calls._busy() == set()  # every rank's window ended: the stream with them
        assert sorted(s for r, s in steps if r == 0) == [2, 3, 4, 5, 6]
        if fail_at is None:
            assert sorted(s for r, s in steps if r == 1) == [2, 3, 4, 5, 6] and errors == []
        else:  # the failed rank's error names the step it was on, and its peer's window goes on
            assert sorted(s for r, s in steps if r == 1) == [2, 3]
            (e,) = errors
            assert (e.rank, e.step, e.kind) == (1, 4, ErrorKind.PEER_LOST) and "Connection closed" in e.message
    finally:
        for r in ranks:
            ray.kill(r)


def test_a_node_window_whose_agent_dies_loses_its_ranks(agent):
    Rank = _rank_class()
    ranks = [Rank.remote(0, 200), Rank.remote(1, 200)]
    try:
        calls = InFlight()
        calls.add(agent.window.options(num_returns="streaming").remote(dict(enumerate(ranks)), "a", "k", 1),
                  (0, 1), STEP, 1)
        first = calls.poll(ranks, timeout=5.0)
        assert first.steps and not first.errors
        ray.kill(agent)
        steps, errors = _drain(calls, ranks)
        assert sorted(e.rank for e in errors) == [0, 1] and {e.kind for e in errors} == {ErrorKind.WORKER_DIED}
        assert all("node agent" in e.message for e in errors)
        assert len(calls) == 0
    finally:
        for r in ranks:
            ray.kill(r)


def test_a_node_window_opens_after_the_calls_the_driver_sent_its_ranks_before(agent):
    """A save sent straight to the rank, then a window its agent opens: the agent waits for the
    save (``InFlight.ahead_of``), so the rank runs them in the driver's order."""
    Rank = _rank_class()
    rank = Rank.remote(0, 2)
    try:
        calls = InFlight()
        calls.queue(lambda: rank.save.remote(7), 0, SAVE, 7)
        calls.queue(lambda: agent.window.options(num_returns="streaming").remote(
            {0: rank}, "a", "k2", 8, calls.ahead_of({0})), (0,), STEP, 8)
        calls.flush()
        steps, errors = _drain(calls, [rank])
        assert errors == [] and steps == [(0, 8), (0, 9)]
        assert ray.get(rank.calls.remote()) == [("save", 7), ("window", "k2")]
    finally:
        ray.kill(rank)


def test_await_started_holds_what_arrives_for_the_next_poll_and_names_a_rank_that_never_started(agent):
    Rank = _rank_class()
    ranks = [Rank.remote(0, 3), Rank.remote(1, 3, first_delay=20.0)]
    try:
        ray.get([r.ping.remote() for r in ranks] + [agent.silence.remote()])  # their processes are up
        calls = InFlight()
        calls.add(agent.window.options(num_returns="streaming").remote(dict(enumerate(ranks)), "a", "k", 1),
                  (0, 1), STEP, 1)
        assert calls.not_started() == {0, 1}
        calls.await_started(2.0)
        assert calls.not_started() == set()
        out = calls.poll(ranks, timeout=0.0)  # what arrived meanwhile, and the rank that did not start
        assert (0, 1) in [(r.rank, r.step) for r in out.steps]
        (e,) = out.errors
        assert e.rank == 1 and e.step == 1 and "had not started" in e.message
        assert calls._busy() == {0} or calls._busy() == set()
    finally:
        for r in ranks:
            ray.kill(r)
