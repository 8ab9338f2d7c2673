"""The node agent's pinging logic (:class:`LocalPings`) and a zone leader's requests to its
zone's agents (:class:`ZoneGather`), driven with hand-made futures and clock."""

from __future__ import annotations

from concurrent.futures import Future

from raypod.worker.node_agent import RUNNING, LocalPings, ZoneGather


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Ranks:
    """Fake rank actors: every ping sent is a future the test answers (or fails)."""

    def __init__(self) -> None:
        self.sent: dict[str, list[Future]] = {}

    def send(self, handle: str) -> Future:
        f: Future = Future()
        self.sent.setdefault(handle, []).append(f)
        return f

    def answer(self, handle: str) -> None:
        self.sent[handle][-1].set_result(1234)


def make(every_s: float = 0.25, cpu=lambda pid: None) -> tuple[LocalPings, Ranks, Clock]:
    ranks, clock = Ranks(), Clock()
    pings = LocalPings(ranks.send, every_s, clock, cpu)
    pings.assign({4: "a4", 5: "a5"}, generation=3)
    return pings, ranks, clock


def test_silence_grows_for_a_rank_that_stops_answering_and_not_for_one_that_answers():
    pings, ranks, clock = make()
    for _ in range(8):  # 2 s: rank 4 answers every ping, rank 5 answers none
        clock.t += 0.25
        ranks.answer("a4")
        pings.tick()
    report = pings.silence()
    assert report["generation"] == 3 and report["dead"] == []
    assert report["silence"][5] == 2.0  # its first ping, sent at assign, is still unanswered
    assert report["silence"][4] < 0.25
    assert len(ranks.sent["a5"]) == 1 and len(ranks.sent["a4"]) == 9


def test_a_rank_whose_ping_failed_is_reported_dead_and_no_longer_pinged():
    pings, ranks, clock = make()
    ranks.sent["a5"][-1].set_exception(RuntimeError("the actor died"))
    clock.t += 1.0
    report = pings.silence()
    assert report["dead"] == [5] and 5 not in report["silence"]
    clock.t += 1.0
    pings.tick()
    assert len(ranks.sent["a5"]) == 1


def test_at_most_one_ping_in_flight_per_rank_and_the_next_after_every_s():
    pings, ranks, clock = make(every_s=0.5)
    for _ in range(20):
        clock.t += 0.1
        pings.tick()
        assert pings.in_flight() <= 2
    assert len(ranks.sent["a4"]) == 1  # unanswered: never a second one
    ranks.answer("a4")  # the answered ping was sent at 100.0; now is 102.0
    pings.tick()
    assert len(ranks.sent["a4"]) == 2
    ranks.answer("a4")
    clock.t += 0.3
    pings.tick()  # answered, but the next is due only 0.5 s after the last was sent
    assert len(ranks.sent["a4"]) == 2 and pings.silence()["silence"][4] == 0.0
    clock.t += 0.2
    pings.tick()
    assert len(ranks.sent["a4"]) == 3


def test_reassigning_keeps_unchanged_ranks_and_starts_new_actors_afresh():
    pings, ranks, clock = make()
    clock.t += 2.0
    pings.assign({4: "a4", 5: "b5"}, generation=4)  # rank 5 replaced by a new actor
    report = pings.silence()
    assert report["generation"] == 4
    assert report["silence"][4] == 2.0 and report["silence"][5] == 0.0
    pings.assign({4: "old"}, generation=2)  # an older assignment arriving late is ignored
    assert set(pings.silence()["silence"]) == {4, 5}


def test_a_silent_rank_whose_process_keeps_using_cpu_is_busy_not_frozen():
    """A ping waits while the rank's process burns CPU (a thread holding the GIL through a
    checkpoint write): its silence counts from its last CPU; a stopped process (SIGSTOP, read
    as None) or one that uses no CPU stays silent from the ping."""
    ticks = {1234: 0}
    pings, ranks, clock = make(cpu=lambda pid: ticks[pid])
    ranks.answer("a4")
    ranks.answer("a5")
    clock.t += 0.25
    pings.tick()  # both answered (pid 1234 learnt); the next pings go out now
    for _ in range(8):  # 2 s without an answer, the process busy all along
        clock.t += 0.25
        ticks[1234] += 25
        pings.tick()
    assert pings.silence()["silence"][4] == 0.0
    ticks[1234] = RUNNING  # runnable (an overloaded host) or in disk I/O: alive
    for _ in range(4):
        clock.t += 0.25
        pings.tick()
    assert pings.silence()["silence"][4] == 0.0
    ticks[1234] = None  # SIGSTOPped: no CPU from now on
    for _ in range(6):
        clock.t += 0.25
        pings.tick()
    assert pings.silence()["silence"][4] == 1.5
    ticks[1234] = 1000  # asleep, and then using no CPU: silent again from the first look
    pings.tick()
    clock.t += 1.0
    pings.tick()
    assert pings.silence()["silence"][4] >= 1.0


def test_cpu_ticks_of_this_process_and_of_none(tmp_path):
    import os

    from raypod.worker.node_agent import cpu_ticks

    assert isinstance(cpu_ticks(os.getpid()), int)  # this process runs: RUNNING (-1)
    assert cpu_ticks(2**22 + 7) is None  # no such process


def test_a_relay_answers_for_every_local_rank_at_once_naming_the_failed_and_the_late():
    from raypod.worker.node_agent import relay_calls

    sent: dict[str, Future] = {}

    def send(handle: str) -> Future:
        if handle == "gone":
            raise RuntimeError("actor gone")
        sent[handle] = Future()
        return sent[handle]

    import threading

    def answer() -> None:
        sent["a"].set_result("report a")
        sent["b"].set_exception(ValueError("boom"))

    threading.Timer(0.05, answer).start()  # "c" never answers
    out = relay_calls(send, {1: "a", 2: "b", 3: "c", 4: "gone"}, timeout=0.5)
    assert out["answers"] == {1: "report a"}
    assert out["failed"] == {2: "ValueError: boom", 4: "RuntimeError: actor gone"}
    assert out["late"] == [3]


def test_a_zone_leader_answers_at_once_with_its_members_last_replies_and_how_long_each_waits():
    agents, clock = Ranks(), Clock()
    zone = ZoneGather(lambda handle, every: agents.send(handle), clock)
    first = zone.gather({"n1": "g1", "n2": "g2"}, 0.25)["members"]
    assert first["n1"] == {"reply": None, "age_s": 0.0, "pending_s": 0.0, "failed": False}
    assert len(agents.sent["g1"]) == len(agents.sent["g2"]) == 1  # one request each, sent now
    clock.t += 0.25
    agents.sent["g1"][-1].set_result({"silence": {3: 0.0}, "dead": [], "generation": 2, "slowest_s": 0.1})
    out = zone.gather({"n1": "g1", "n2": "g2"}, 0.25)
    assert out["members"]["n1"]["reply"]["generation"] == 2 and out["members"]["n1"]["age_s"] == 0.25
    assert out["members"]["n1"]["pending_s"] == 0.0 and out["slowest_s"] == 0.1
    assert out["members"]["n2"]["reply"] is None and out["members"]["n2"]["pending_s"] == 0.25  # it froze
    assert len(agents.sent["g1"]) == 2 and len(agents.sent["g2"]) == 1  # at most one request in flight
    clock.t += 0.5
    assert zone.gather({"n1": "g1", "n2": "g2"}, 0.25)["members"]["n2"]["pending_s"] == 0.75


def test_a_zone_member_whose_agent_died_is_named_and_a_changed_one_starts_afresh():
    agents, clock = Ranks(), Clock()
    zone = ZoneGather(lambda handle, every: agents.send(handle), clock)
    zone.gather({"n1": "g1", "n2": "g2"}, 0.25)
    agents.sent["g1"][-1].set_exception(RuntimeError("the actor died"))
    agents.sent["g2"][-1].set_result({"silence": {}, "dead": [], "generation": 1, "slowest_s": 0.0})
    out = zone.gather({"n1": "g1", "n2": "g2"}, 0.25)["members"]
    assert out["n1"]["failed"] and not out["n2"]["failed"]
    assert len(agents.sent["g1"]) == 1  # a failed member is not asked again
    out = zone.gather({"n2": "g2b"}, 0.25)["members"]  # n1 left the zone, n2's agent was replaced
    assert set(out) == {"n2"} and out["n2"]["reply"] is None and len(agents.sent["g2b"]) == 1
