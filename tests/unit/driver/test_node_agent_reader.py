"""A rank alone on its node has no sibling to read or kill its process: the node's liveness
agent (a real :class:`~raypod.worker.node_agent.NodeAgent` actor) does it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import types

import pytest
import ray

from raypod.driver import liveness
from raypod.driver.outcomes import GroupStartError
from raypod.worker.node_agent import cpu_ticks, remote_node_agent


class _Rank:
    """A rank's actor as the forming watch uses it: ``interrupt.remote`` only."""

    def __init__(self) -> None:
        self.interrupted = 0
        self.interrupt = types.SimpleNamespace(remote=self._interrupt)

    def _interrupt(self, attempt: int) -> None:
        self.interrupted += 1


def test_a_rank_alone_on_its_node_is_read_and_killed_through_its_node_agent(ray_connected, monkeypatch):
    """Three ranks on three nodes, none on the driver's: ranks 1 and 2 miss both pings while
    the group forms; rank 1's process burns CPU (a loaded host), rank 2's is stopped. Their
    nodes' agent reads both in /proc: only rank 2 is lost, and the agent SIGKILLs it."""
    working = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    frozen = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    agent = remote_node_agent(ray.get_runtime_context().get_node_id()).remote()
    try:
        time.sleep(0.5)  # past the interpreter's start
        frozen.send_signal(signal.SIGSTOP)
        while cpu_ticks(frozen.pid) is not None:  # until the stop has landed
            time.sleep(0.01)
        assert ray.get(agent.cpu_ticks.remote(frozen.pid)) is None
        monkeypatch.setattr(liveness, "unresponsive", lambda actors, timeout: set(range(len(actors))))
        nodes, pids = ["n0", "n1", "n2"], [0, working.pid, frozen.pid]  # not the driver's node
        agents = {"n1": agent, "n2": agent}  # one per node (here both are this host's)
        probes = types.SimpleNamespace(clear=lambda: None, slowest_s=0.0, agent_handles=agents,
                                       silence=lambda ranks, every, use_agents: {0: 0.0, 1: 2.0, 2: 2.0})
        killed: list[set[int]] = []
        actors = [_Rank(), _Rank(), _Rank()]
        check = liveness.forming_watch(probes, lambda: actors, 1.0, killed.append, 3, lambda: (nodes, pids))
        with pytest.raises(GroupStartError, match=r"rank\(s\) \[2\] stopped answering"):
            check()
        assert killed == [{2}] and [a.interrupted for a in actors] == [1, 1, 0]
        # Without the agents nothing reads them (no sibling, not the driver's node): both lost.
        probes.agent_handles = None
        with pytest.raises(GroupStartError, match=r"rank\(s\) \[1, 2\]"):
            check()

        liveness.kill_now(actors, nodes, pids, {2}, agents)
        deadline = time.monotonic() + 10
        while frozen.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert frozen.returncode == -signal.SIGKILL
        assert working.poll() is None  # the agent never kills what it was not asked to
    finally:
        ray.kill(agent)
        for p in (working, frozen):
            p.kill()
            p.wait()


def test_calls_to_many_ranks_go_one_per_node_through_the_agents(ray_connected):
    """Ranks 0-1 on a node with an agent, 2 on one without: one relayed call answers for 0 and
    1, rank 2 is called directly; a dead rank is named as failed, a slow one as late, and
    when an agent is gone its ranks are called directly."""
    from raypod.driver.rank_calls import call_ranks

    @ray.remote(num_cpus=0)
    class Held:
        """A rank's actor as a recovery calls it: ``memory_report`` (slow on request)."""

        def __init__(self, rank: int, delay_s: float = 0.0) -> None:
            self.rank, self.delay_s = rank, delay_s

        def memory_report(self) -> dict:
            time.sleep(self.delay_s)
            return {"rank": self.rank}

    actors = [Held.remote(0), Held.remote(1), Held.remote(2), Held.remote(3, delay_s=5.0)]
    agent = remote_node_agent(ray.get_runtime_context().get_node_id()).remote()
    nodes = ["n0", "n0", "n2", "n0"]
    try:
        got = call_ranks("memory_report", [0, 1, 2], actors, nodes, {"n0": agent}, timeout=5.0)
        assert (got.answers, got.failed, got.late) == ({r: {"rank": r} for r in (0, 1, 2)}, {}, [])
        ray.kill(actors[1], no_restart=True)
        got = call_ranks("memory_report", [0, 1, 3], actors, nodes, {"n0": agent}, timeout=1.0)
        assert got.answers == {0: {"rank": 0}} and list(got.failed) == [1] and got.late == [3]
        ray.kill(agent, no_restart=True)
        got = call_ranks("memory_report", [0, 2], actors, nodes, {"n0": agent}, timeout=5.0)
        assert got.answers == {0: {"rank": 0}, 2: {"rank": 2}}
    finally:
        for a in [agent, *actors]:
            ray.kill(a, no_restart=True)
