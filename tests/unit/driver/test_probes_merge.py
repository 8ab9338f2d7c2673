"""How :class:`Probes` merges its node agents' replies, with fake Ray calls and clock: an
agent that has not answered yet leaves its ranks to the driver's own pings; one that answers
covers them; one gone silent makes them silent; one that died hands them back to the driver."""

from __future__ import annotations

import types
from typing import Any

import pytest

from raypod.driver import liveness


class Ref:
    def __init__(self) -> None:
        self.ready, self.value, self.error = False, None, None

    def answer(self, value: Any = 1) -> None:
        self.ready, self.value = True, value

    def fail(self) -> None:
        self.ready, self.error = True, RuntimeError("the actor died")


class Method:
    def __init__(self) -> None:
        self.calls: list[tuple[Ref, tuple]] = []

    def remote(self, *args: Any) -> Ref:
        self.calls.append((Ref(), args))
        return self.calls[-1][0]

    @property
    def last(self) -> Ref:
        return self.calls[-1][0]


class Actor:
    def __init__(self) -> None:
        self.ping, self.assign, self.silence, self.gather = Method(), Method(), Method(), Method()


@pytest.fixture
def world(monkeypatch):
    clock = types.SimpleNamespace(t=10.0)
    monkeypatch.setattr(liveness, "time", types.SimpleNamespace(monotonic=lambda: clock.t))

    def get(ref: Ref) -> Any:
        if ref.error is not None:
            raise ref.error
        return ref.value

    monkeypatch.setattr(liveness, "ray", types.SimpleNamespace(
        wait=lambda refs, num_returns, timeout: ([r for r in refs if r.ready], []), get=get,
        kill=lambda actor, no_restart: None))
    ranks = [Actor() for _ in range(4)]
    nodes = ["n0", "n0", "n1", "n1"]
    agents: dict[str, Actor] = {}
    probes = liveness.Probes(True, lambda: nodes)
    probes.agents.make = lambda node: agents.setdefault(node, Actor())
    return types.SimpleNamespace(clock=clock, ranks=ranks, agents=agents, probes=probes)


def reply(agent: Actor, silence: dict[int, float], dead: tuple[int, ...] = ()) -> None:
    """``agent`` answers its request in flight, about the ranks it was last told."""
    generation = agent.assign.calls[-1][1][1]
    agent.silence.last.answer({"silence": silence, "dead": list(dead), "generation": generation})


def test_ranks_of_an_agent_that_has_not_answered_are_pinged_by_the_driver(world):
    out = world.probes.silence(world.ranks, 0.25)
    assert set(world.agents) == {"n0", "n1"}  # one agent per node, told its own ranks
    assert set(world.agents["n1"].assign.calls[0][1][0]) == {2, 3}
    assert all(len(r.ping.calls) == 1 for r in world.ranks) and world.probes.via_agent == set()
    world.clock.t += 1.0
    out = world.probes.silence(world.ranks, 0.25)
    assert out == dict.fromkeys(range(4), 1.0)  # the fallback still finds silence


def test_an_answering_agent_covers_its_ranks_and_its_report_ages(world):
    world.probes.silence(world.ranks, 0.25)
    for r in world.ranks:
        r.ping.last.answer()
    reply(world.agents["n0"], {0: 0.0, 1: 0.5})
    world.clock.t += 0.1
    out = world.probes.silence(world.ranks, 0.25)  # the reply, asked for at 10.0, arrives at 10.1
    assert world.probes.via_agent == {0, 1}
    assert out[0] == 0.0 and out[1] == pytest.approx(0.6)
    world.clock.t += 0.2
    out = world.probes.silence(world.ranks, 0.25)
    assert out[1] == pytest.approx(0.8)  # reported 0.5 plus the report's age (since it was asked for)
    assert len(world.ranks[0].ping.calls) == 1  # no more driver pings for node n0's ranks
    assert len(world.ranks[2].ping.calls) == 2  # node n1's agent has not answered: the driver pings


def test_a_silent_agent_makes_all_its_ranks_silent(world):
    world.probes.silence(world.ranks, 0.25)
    reply(world.agents["n0"], {0: 0.0, 1: 0.0})
    world.clock.t += 0.25
    world.probes.silence(world.ranks, 0.25)  # takes the reply in, sends the next request
    world.clock.t += 1.2  # the node freezes: the request is never answered
    out = world.probes.silence(world.ranks, 0.25)
    assert out[0] == pytest.approx(1.2) and out[1] == pytest.approx(1.2)
    assert {0, 1} <= world.probes.via_agent


def test_a_dead_rank_counts_as_answered_and_a_dead_agent_hands_its_ranks_back(world):
    world.probes.silence(world.ranks, 0.25)
    reply(world.agents["n0"], {0: 0.0}, dead=(1,))
    reply(world.agents["n1"], {2: 0.0, 3: 0.0})
    world.clock.t += 0.3
    assert world.probes.silence(world.ranks, 0.25)[1] == 0.0
    world.agents["n1"].silence.last.fail()
    world.clock.t += 0.3
    pings = len(world.ranks[2].ping.calls)
    world.probes.silence(world.ranks, 0.25)
    assert world.probes.via_agent == {0, 1} and len(world.ranks[2].ping.calls) == pings + 1


def test_a_replaced_rank_waits_for_its_agents_new_generation(world):
    world.probes.silence(world.ranks, 0.25)
    reply(world.agents["n0"], {0: 0.0, 1: 0.0})
    world.clock.t += 0.3
    world.probes.silence(world.ranks, 0.25)
    assert world.probes.via_agent == {0, 1}
    world.ranks[1] = Actor()  # replaced: the agent is told again, its old reports no longer count
    out = world.probes.silence(world.ranks, 0.25)
    assert world.probes.via_agent == set() and len(world.agents["n0"].assign.calls) == 2
    assert out[1] == 0.0 and len(world.ranks[1].ping.calls) == 1


def test_the_forming_watch_keeps_the_driver_pings_but_starts_the_agents(world):
    world.probes.silence(world.ranks, 0.25)
    reply(world.agents["n0"], {0: 0.0, 1: 0.0})
    world.clock.t += 0.3
    world.probes.silence(world.ranks, 0.25, use_agents=False)
    assert world.probes.via_agent == set() and set(world.agents) == {"n0", "n1"}


def test_late_answers_raise_the_silence_allowed_for_a_while(world):
    world.probes.silence(world.ranks, 0.25)
    world.clock.t += 0.2
    world.probes.silence(world.ranks, 0.25)  # the driver looks at 10.2: no reply yet
    agent = world.agents["n0"]
    generation = agent.assign.calls[-1][1][1]
    agent.silence.last.answer({"silence": {0: 0.0, 1: 0.0}, "dead": [], "generation": generation,
                               "slowest_s": 0.9})  # rank 1 answered its agent 0.9 s late
    world.clock.t += 0.9
    out = world.probes.silence(world.ranks, 0.25)
    assert isinstance(out, liveness.Silence) and out.slowest_s == pytest.approx(0.9)
    world.clock.t += liveness.SLOW_WINDOW_S + 1  # no late answer since: back to fault.silent_s
    assert world.probes.silence(world.ranks, 0.25).slowest_s == 0.0


def test_the_diagnosis_allows_twice_the_late_answers(tmp_path):
    from raypod.config import JobConfig
    from raypod.driver.diagnosis import Diagnosis
    from raypod.driver.ledger import StepLedger

    cfg = JobConfig.model_validate({"name": "late", "checkpoint": {"storage": str(tmp_path)},
                                    "fault": {"silent_s": 1.0}})
    diagnosis = Diagnosis(cfg, StepLedger(), lambda: 0.0)
    group = types.SimpleNamespace(node_of=lambda r: "node n0")
    group.probe = lambda every_s: liveness.Silence({0: 0.0, 1: 1.3}, slowest_s=0.9)
    assert diagnosis.silent_failure(group) is None  # 1.3 s < 1.5 x 0.9 s: a busy host, not a freeze
    group.probe = lambda every_s: liveness.Silence({0: 0.0, 1: 1.4}, slowest_s=0.9)
    f = diagnosis.silent_failure(group)
    assert f is not None and f.rank == 1 and "(fault.silent_s)" in f.message and "allowed 1.4 s" in f.message
    group.probe = lambda every_s: {0: 0.0, 1: 1.1}  # no late answers: fault.silent_s
    assert diagnosis.silent_failure(group) is not None


def test_the_forming_watch_waits_on_a_silent_rank_whose_process_works_and_kills_a_stopped_one(monkeypatch):
    """Two ranks miss both pings while the group forms: one's process burns CPU (a loaded host),
    the other is stopped (SIGSTOP, a frozen rank). Read in /proc on the driver's node, only the
    stopped one is lost, and at once (no second ping for a process read as stopped)."""
    import signal
    import subprocess
    import sys
    import time

    from raypod.driver.outcomes import GroupStartError
    from raypod.worker.node_agent import cpu_ticks

    working = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    frozen = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        time.sleep(0.5)  # past the interpreter's start
        frozen.send_signal(signal.SIGSTOP)
        while cpu_ticks(frozen.pid) is not None:  # until the stop has landed
            time.sleep(0.01)
        monkeypatch.setattr(liveness.ray, "get_runtime_context",
                            lambda: types.SimpleNamespace(get_node_id=lambda: "n0"))
        pinged: list[int] = []  # how many ranks each second ping went to

        def second_ping(actors, timeout):  # noqa: ANN001, ANN202 - nobody answers it
            pinged.append(len(actors))
            return set(range(len(actors)))

        monkeypatch.setattr(liveness, "unresponsive", second_ping)
        probes = types.SimpleNamespace(clear=lambda: None, slowest_s=0.0, agent_handles=None,
                                       silence=lambda ranks, every, use_agents: {0: 0.0, 1: 2.0, 2: 2.0})
        killed: list[set[int]] = []
        actors = [Actor(), Actor(), Actor()]
        for a in actors:
            a.interrupt = Method()
        pids = [0, working.pid, frozen.pid]
        check = liveness.forming_watch(probes, lambda: actors, 1.0, killed.append, 3,
                                       lambda: (["n0"] * 3, pids))
        with pytest.raises(GroupStartError, match=r"rank\(s\) \[2\] stopped answering"):
            check()
        assert killed == [{2}]
        assert [len(a.interrupt.calls) for a in actors] == [1, 1, 0]  # the others leave the rendezvous
        assert pinged == [1]  # the stopped one was lost as read, without the second ping's wait
        pids[2] = 0  # no process to read: the pings decide, as before
        with pytest.raises(GroupStartError, match=r"rank\(s\) \[2\]"):
            check()
        assert pinged == [1, 2]
    finally:
        for p in (working, frozen):
            p.kill()
            p.wait()


def test_busy_is_running_or_cpu_used_between_two_reads():
    from raypod.worker.node_agent import RUNNING

    before = {1: 100, 2: 100, 3: 100, 4: None, 6: RUNNING}
    after = {1: RUNNING, 2: 105, 3: 100, 4: None, 5: RUNNING, 6: 100}
    assert liveness.busy(before, after) == {1, 2, 5}


def test_a_rank_silent_while_training_is_waited_on_while_its_process_works(tmp_path, monkeypatch):
    """Past the silence allowed, the driver reads the silent rank's process on its node: one
    running or using CPU (a host too loaded to answer a ping) is waited on, up to BUSY_CAP x
    ``fault.silent_s``; one stopped (SIGSTOP), asleep without using CPU, or not readable is lost."""
    from raypod.config import JobConfig
    from raypod.driver import diagnosis as dg
    from raypod.driver.ledger import StepLedger
    from raypod.worker.node_agent import RUNNING

    monkeypatch.setattr(dg, "BUSY_READ_S", 0.0)  # read on every look (the driver's loop: every 0.25 s)
    cfg = JobConfig.model_validate({"name": "busy", "checkpoint": {"storage": str(tmp_path)},
                                    "fault": {"silent_s": 1.0}})
    reads: list[dict[int, int | None]] = []

    def start(silent_s: float) -> tuple[dg.Diagnosis, Any]:
        group = types.SimpleNamespace(node_of=lambda r: "node n0", probe=lambda every_s: {0: 0.0, 1: silent_s})
        group.process_ticks = lambda ranks: reads.pop(0)
        return dg.Diagnosis(cfg, StepLedger(), lambda: 0.0), group

    d, group = start(1.5)
    reads[:] = [{1: RUNNING}, {1: 100}, {1: 100}]
    assert d.silent_failure(group) is None  # running (or waiting for a CPU)
    assert d.silent_failure(group) is None  # asleep now, but it ran since
    f = d.silent_failure(group)  # asleep and no CPU used since: frozen
    assert f is not None and f.rank == 1 and d.silent == {1}
    d, group = start(1.5)
    reads[:] = [{1: 50}, {1: 60}, {1: 60}]
    assert d.silent_failure(group) is None and d.silent_failure(group) is None  # used CPU
    assert d.silent_failure(group) is not None
    d, group = start(1.2)
    reads[:] = [{1: None}]  # stopped (SIGSTOP) or gone: lost at the first look
    assert d.silent_failure(group).rank == 1 and not reads
    d, group = start(1.2)
    reads[:] = [{}]  # nobody on its node could read it (the node is cut off)
    assert d.silent_failure(group).rank == 1
    d, group = start(dg.BUSY_CAP * 1.0)
    reads[:] = [{1: RUNNING}]
    assert d.silent_failure(group) is not None and reads  # past the cap: lost, not even read
    d, group = start(1.5)
    reads[:] = [{1: RUNNING}]
    assert d.silent_failure(group) is None
    group.probe = lambda every_s: {0: 0.0, 1: 0.0}  # it answered again: forgotten
    assert d.silent_failure(group) is None and not d._reads



@pytest.fixture
def zoned(world):
    """Five nodes of one rank each, zoned from two nodes: zones [n0 n1 n2] and [n3 n4]."""
    world.ranks = [Actor() for _ in range(5)]
    nodes = [f"n{i}" for i in range(5)]
    world.probes = liveness.Probes(True, lambda: nodes)
    world.probes.agents = liveness.NodeAgents(lambda node: world.agents.setdefault(node, Actor()), zoned_from=2)
    world.agents.clear()
    return world


def member(agent: Actor, silence: dict[int, float]) -> dict[str, Any]:
    return {"silence": silence, "dead": [], "generation": agent.assign.calls[-1][1][1], "slowest_s": 0.0}


def test_with_zones_the_driver_asks_one_leader_per_zone_and_its_reply_covers_the_members(zoned):
    assert liveness.zones([f"n{i}" for i in range(5)], 2) == [["n0", "n1", "n2"], ["n3", "n4"]]
    zoned.probes.silence(zoned.ranks, 0.25)
    a = zoned.agents
    assert len(a["n0"].gather.calls) == 1 and len(a["n3"].gather.calls) == 1  # the leaders
    assert all(not x.silence.calls and not x.gather.calls for n, x in a.items() if n not in ("n0", "n3"))
    assert set(a["n0"].gather.calls[0][1][1]) == {"n1", "n2"}  # the members' handles go with it
    zoned.clock.t += 0.1
    a["n0"].gather.last.answer({"own": member(a["n0"], {0: 0.0}), "slowest_s": 0.0, "members": {
        "n1": {"reply": member(a["n1"], {1: 0.0}), "age_s": 0.05, "pending_s": 0.0, "failed": False},
        "n2": {"reply": member(a["n2"], {2: 0.0}), "age_s": 0.05, "pending_s": 0.3, "failed": False}}})
    out = zoned.probes.silence(zoned.ranks, 0.25)
    assert {0, 1, 2} <= zoned.probes.via_agent and 3 not in zoned.probes.via_agent
    assert out[0] == 0.0 and out[1] == 0.0
    assert out[2] == pytest.approx(0.4)  # its leader's request to it waited 0.3 s, asked 0.1 s ago
    zoned.clock.t += 1.0  # n2's node stays silent: its ranks' silence keeps growing
    assert zoned.probes.silence(zoned.ranks, 0.25)[2] == pytest.approx(1.4)


def test_a_zone_member_reported_failed_is_ended_and_its_ranks_pinged_by_the_driver(zoned):
    zoned.probes.silence(zoned.ranks, 0.25)
    for r in zoned.ranks:
        r.ping.last.answer()
    a = zoned.agents
    a["n0"].gather.last.answer({"own": member(a["n0"], {0: 0.0}), "slowest_s": 0.0, "members": {
        "n1": {"reply": None, "age_s": 0.0, "pending_s": 0.0, "failed": True},
        "n2": {"reply": member(a["n2"], {2: 0.0}), "age_s": 0.0, "pending_s": 0.0, "failed": False}}})
    zoned.clock.t += 0.3
    pings = len(zoned.ranks[1].ping.calls)
    zoned.probes.silence(zoned.ranks, 0.25)
    assert "n1" not in zoned.probes.agents.agents and 1 not in zoned.probes.via_agent
    assert len(zoned.ranks[1].ping.calls) == pings + 1
    # The zones are cut again without it: [n0 n2] and [n3 n4]; n2's old pending news is void.
    assert liveness.zones(zoned.probes.agents.agents, 2) == [["n0", "n2"], ["n3", "n4"]]


def test_a_silent_zone_leader_makes_its_own_node_silent_and_its_members_reports_only_age(zoned):
    zoned.probes.silence(zoned.ranks, 0.25)
    a = zoned.agents
    a["n0"].gather.last.answer({"own": member(a["n0"], {0: 0.0}), "slowest_s": 0.0, "members": {
        "n1": {"reply": member(a["n1"], {1: 0.0}), "age_s": 0.0, "pending_s": 0.0, "failed": False},
        "n2": {"reply": member(a["n2"], {2: 0.2}), "age_s": 0.1, "pending_s": 0.0, "failed": False}}})
    zoned.clock.t += 0.3
    zoned.probes.silence(zoned.ranks, 0.25)  # takes the reply in, asks the leader again
    zoned.clock.t += 1.5  # the leader's node freezes: no more replies
    out = zoned.probes.silence(zoned.ranks, 0.25)
    assert out[0] == pytest.approx(1.5)  # the leader's own rank: its request has waited 1.5 s
    assert out[1] == 0.0  # a member that was answering is not blamed for its leader
    assert out[2] == pytest.approx(0.2 + 1.8 + 0.1)  # a ping that was waiting keeps ageing
