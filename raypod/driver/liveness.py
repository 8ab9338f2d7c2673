"""Liveness probes: which ranks have stopped answering, found within about a second.

A rank's ``ping`` runs on a thread of its actor's own and answers within milliseconds,
also while its main thread is inside a step or a collective; only a process that is
stopped (SIGSTOP, a hung kernel holding it), gone, or cut off from the driver stays
silent. :class:`Probes` keeps at most one ping in flight per rank, sends the next one a
moment after the last was answered, and never blocks: the driver's running loop asks
:meth:`Probes.silence` every iteration how long each rank's ping has gone unanswered
(:meth:`raypod.driver.diagnosis.Diagnosis.silent_failure` decides from that).

One ping per rank per round costs the driver one actor call per rank (about 0.2 ms of CPU):
at 10,000 ranks a round outlasts ``fault.silent_s``. With ``fault.node_agents`` the ranks of
each node are pinged by an agent on that node (:mod:`raypod.worker.node_agent`) and the
driver keeps one request in flight per node (:class:`NodeAgents`), merging the replies; a
node whose agent has not answered yet is pinged rank by rank, as before.

While a group forms (the first set-up, the rendezvous and restore of a recovery, a
resize), the driver waits on the ranks' calls instead of running its loop:
:func:`forming_watch` makes that wait end as soon as a rank is silent for ``fault.silent_s``
(and misses one more short ping), after ending the silent rank and aborting the others'
half-formed groups, so a rank frozen during a rendezvous costs about a second, not the
store's timeout.

Ending a silent rank: ``ray.kill`` marks the actor dead at once, but its raylet gives a
stopped process a grace period (5 s) before SIGKILL, and its peers stay blocked in their
collectives until its sockets close. :func:`kill_now` has a live rank on the same node (or
the driver, on its own node) SIGKILL the process at once.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import ray

from raypod.driver.outcomes import GroupStartError
from raypod.driver.rank_calls import unresponsive
from raypod.protocol import Silence
from raypod.worker.node_agent import RUNNING, cpu_ticks

log = logging.getLogger("raypod.driver")


def heartbeats(actors: list[Any], timeout: float) -> dict[int, Any]:
    """Each rank's :class:`~raypod.protocol.Heartbeat` (step and phase); ``None`` for a rank
    that did not answer within ``timeout`` seconds."""
    refs = {a.heartbeat.remote(): r for r, a in enumerate(actors)}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
    out: dict[int, Any] = dict.fromkeys(refs.values())
    for ref in ready:
        try:
            out[refs[ref]] = ray.get(ref)
        except Exception:  # noqa: BLE001 - a dead rank does not answer
            pass
    return out


def _sibling(actors: list[Any], nodes: list[str], ranks: Collection[int], r: int,
             agents: Mapping[str, Any] | None = None) -> Any | None:
    """An actor on ``r``'s node that acts on ``r``'s process from there (kills it, reads it in
    ``/proc``): a rank not among ``ranks``, else the node's liveness agent (``agents``: node ->
    :class:`~raypod.worker.node_agent.NodeAgent`; a node with one rank only has no sibling),
    else None."""
    sibling = next((a for q, a in enumerate(actors) if q not in ranks and q < len(nodes) and nodes[q] == nodes[r]),
                   None)
    return sibling if sibling is not None or not agents or r >= len(nodes) else agents.get(nodes[r])


def kill_now(actors: list[Any], nodes: list[str], pids: list[int], ranks: set[int],
             agents: Mapping[str, Any] | None = None) -> None:
    """SIGKILL the processes of ``ranks`` now (after ``ray.kill``): through a live rank on the
    same node (its ``kill_pid`` runs on the ping thread) or that node's agent (``agents``), else
    from the driver when the rank runs on the driver's node; a rank with none is left to Ray."""
    here = ray.get_runtime_context().get_node_id()
    for r in sorted(ranks):
        if r >= len(pids) or r >= len(nodes) or not pids[r]:
            continue
        helper = _sibling(actors, nodes, ranks, r, agents)
        try:
            if helper is not None:
                helper.kill_pid.remote(pids[r])
            elif nodes[r] == here:
                os.kill(pids[r], signal.SIGKILL)
        except Exception as e:  # noqa: BLE001 - gone already; Ray ends it anyway
            log.debug("killing rank %d's process %d: %s", r, pids[r], e)


def process_ticks(actors: list[Any], nodes: list[str], pids: list[int], ranks: list[int],
                  timeout: float = 1.0, agents: Mapping[str, Any] | None = None) -> dict[int, int | None]:
    """Each of ``ranks``' processes as :func:`~raypod.worker.node_agent.cpu_ticks` reads it on
    its node (``RUNNING``, CPU ticks, or None: stopped or gone): by the driver for a rank on the
    driver's node, else by another rank on that node (its ping thread) or the node's agent
    (``agents``); a rank none can read (or whose reader did not answer within ``timeout``)
    is left out."""
    here = ray.get_runtime_context().get_node_id()
    out: dict[int, int | None] = {}
    asked: dict[Any, int] = {}
    for r in ranks:
        if r >= len(pids) or r >= len(nodes) or not pids[r]:
            continue
        if nodes[r] == here:
            out[r] = cpu_ticks(pids[r])
            continue
        reader = _sibling(actors, nodes, ranks, r, agents)
        if reader is not None:
            asked[reader.cpu_ticks.remote(pids[r])] = r
    if asked:
        ready, _ = ray.wait(list(asked), num_returns=len(asked), timeout=timeout)
        for ref in ready:
            try:
                out[asked[ref]] = ray.get(ref)
            except Exception:  # noqa: BLE001 - the reader is gone: nothing known
                pass
    return out


def busy(before: dict[int, int | None], after: dict[int, int | None]) -> set[int]:
    """The ranks whose process ran, waited for a CPU or the disk, or used CPU between two
    :func:`process_ticks` reads: alive and working (a host too loaded to answer a ping), not
    frozen. A stopped process, or one asleep that used no CPU, is not among them."""
    return {r for r, t in after.items()
            if t == RUNNING or (t is not None and before.get(r) not in (None, RUNNING) and t > before[r])}


ZONED_FROM_NODES = 64
"""With more node agents than this, the driver asks one leader per zone of about sqrt(nodes)
agents (:meth:`raypod.worker.node_agent.NodeAgent.gather`), not every agent: a round of calls
over every node's agent costs the driver ~0.86 ms a call (``scale_calibration.json``), over
``fault.silent_s`` at 1,250 nodes; over ~35 zone leaders it is ~30 ms."""


def zone_size(nodes: int) -> int:
    """Agents per zone for ``nodes`` nodes: ``ceil(sqrt(nodes))``."""
    return math.isqrt(nodes - 1) + 1


def zones(nodes: Collection[str], zoned_from: int = ZONED_FROM_NODES) -> list[list[str]]:
    """``nodes`` (sorted) cut into zones of :func:`zone_size`, each led by its first node;
    none (every agent asked directly) for ``zoned_from`` nodes or fewer."""
    ordered = sorted(nodes)
    if len(ordered) <= zoned_from:
        return []
    size = zone_size(len(ordered))
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


class NodeAgents:
    """The group's node agents (:class:`raypod.worker.node_agent.NodeAgent`, one per node) and
    the one ``silence`` request in flight to each: the driver's cost per probe round is one
    call per node, not one per rank. With more than ``zoned_from`` nodes the request goes to
    one leader per zone (:func:`zones`), whose reply carries the zone's other agents' last
    replies (:class:`raypod.worker.node_agent.ZoneGather`): one call per zone. A member's
    report is as old as its leader says (plus the leader's request's age); a member whose
    request waits at its leader is silent for that long; a leader that does not answer makes
    its own node's ranks silent (its members' reports just age: their ranks are found silent
    once the lost leader's node is replaced and the zones re-formed).

    Each agent is told its node's ranks with a generation number (bumped whenever they change:
    a start, a replacement, a regroup); only a reply of the current generation covers a rank,
    so a node whose agent has not answered since (still starting, or not yet re-told) is
    pinged rank by rank meanwhile.

    Args:
        make: starts an agent on a node (default: a :class:`NodeAgent` pinned to it).
    """

    def __init__(self, make: Callable[[str], Any] | None = None, zoned_from: int | None = None) -> None:
        self.make = make or _start_agent
        self.zoned_from = ZONED_FROM_NODES if zoned_from is None else zoned_from
        self.pending: dict[str, tuple[float, float]] = {}
        """Per zone member: (seconds its leader's request to it had waited, when the driver
        asked the leader)."""
        self.zone_of: dict[str, str] = {}
        """Per zone member: its leader (a member whose leader changes starts afresh)."""
        self._zones: list[list[str]] = []
        """What :meth:`send` asks: a leader and its members per zone, or each agent alone
        (cut again by :meth:`_rezone` only when the agents change, not every probe)."""
        self._zoned = False
        self.agents: dict[str, Any] = {}
        self.told: dict[str, tuple[int, dict[int, Any]]] = {}
        """Per node: (generation, ``{rank: actor}``) its agent was told."""
        self.out: dict[str, tuple[Any, float]] = {}
        """Per node: (``silence`` request in flight, sent at)."""
        self.last_sent: dict[str, float] = {}
        self.reports: dict[str, tuple[dict[int, float], set[int], float]] = {}
        """Per node, the last reply of its current generation: (silence per rank, dead ranks, when
        its request was sent: the reply is at most this old)."""
        self._seen: tuple[list[str] | None, list[Any]] = (None, [])
        self._generation = 0

    def sync(self, nodes: list[str], actors: list[Any]) -> None:
        """Start an agent on each node of ``nodes`` (rank -> node) that has none, tell each
        agent its ranks when they changed, and end the agents of nodes no longer used. Cheap
        when nothing changed (the node list is the same object and every actor the same)."""
        seen_nodes, seen_actors = self._seen
        if (nodes is seen_nodes and len(actors) == len(seen_actors)
                and all(a is b for a, b in zip(actors, seen_actors, strict=True))):
            return
        self._seen = (nodes, list(actors))
        by_node: dict[str, dict[int, Any]] = {}
        for rank, (node, actor) in enumerate(zip(nodes, actors, strict=True)):
            by_node.setdefault(node, {})[rank] = actor
        for node in [n for n in self.agents if n not in by_node]:
            self._end(node)
        for node, ranks in by_node.items():
            told = self.told.get(node)
            if told is not None and told[1].keys() == ranks.keys() and all(
                    told[1][r] is a for r, a in ranks.items()):
                continue
            try:
                if node not in self.agents:
                    self.agents[node] = self.make(node)
                self._generation += 1
                self.agents[node].assign.remote(ranks, self._generation)
                self.told[node] = (self._generation, ranks)
            except Exception as e:  # noqa: BLE001 - its ranks are pinged one by one instead
                log.warning("could not start the liveness agent of node %s: %s", node[:8], e)
                self._end(node)
            self.reports.pop(node, None)
        self._rezone()

    def collect(self, looked: float) -> list[float]:
        """Take in the agents' replies that arrived (never waits). A reply of an older
        generation is dropped; an agent whose call failed (it died, or could not be placed)
        is ended and its node's ranks are pinged one by one from then on. Returns how late
        answers were: each reply's wait (at least until ``looked``, the driver's previous look,
        when it was not there yet) and the slowest local ping each agent saw."""
        refs = {ref: (node, at) for node, (ref, at) in self.out.items()}
        late: list[float] = []
        if not refs:
            return late
        for ref in ray.wait(list(refs), num_returns=len(refs), timeout=0)[0]:
            node, asked = refs[ref]
            del self.out[node]
            try:
                reply = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the per-rank pings take over
                log.warning("the liveness agent of node %s failed (%s); its ranks are pinged by the "
                            "driver", node[:8], type(e).__name__)
                self._end(node)
                continue
            late += [max(0.0, looked - asked), float(reply.get("slowest_s", 0.0))]
            if "members" in reply:  # a zone leader's: its own reply, then its members'
                self._members(reply["members"], asked, late)
                reply = reply["own"]
                late.append(float(reply.get("slowest_s", 0.0)))
            self._report(node, reply, asked)
        return late

    def _report(self, node: str, reply: dict[str, Any], asked: float) -> None:
        if node in self.told and reply["generation"] == self.told[node][0]:
            self.reports[node] = (reply["silence"], set(reply["dead"]), asked)

    def _members(self, members: dict[str, dict[str, Any]], asked: float, late: list[float]) -> None:
        """Take in a zone leader's news of its members (leader's request sent at ``asked``)."""
        for node, info in members.items():
            if node not in self.agents or node in self.out:
                continue  # ended meanwhile, or asked directly now (the zones changed)
            if info["failed"]:
                log.warning("the liveness agent of node %s failed; its ranks are pinged by the driver", node[:8])
                self._end(node)
                continue
            self.pending[node] = (float(info["pending_s"]), asked)
            if info["reply"] is not None:
                self._report(node, info["reply"], asked - float(info["age_s"]))
                late.append(float(info["reply"].get("slowest_s", 0.0)))

    def send(self, now: float, every_s: float) -> None:
        """A ``silence`` request to each agent with none in flight, ``every_s`` after the last;
        with zones (:func:`zones`) a ``gather`` request to each zone's leader instead."""
        for leader, *members in self._zones:
            if leader in self.out or now - self.last_sent.get(leader, -every_s) < every_s:
                continue
            agent = self.agents[leader]
            ref = (agent.gather.remote(every_s, {m: self.agents[m] for m in members}) if self._zoned
                   else agent.silence.remote(every_s))
            self.out[leader] = (ref, now)
            self.last_sent[leader] = now

    def _rezone(self) -> None:
        """Cut the agents into zones again (:func:`zones`) after they changed: a member whose
        leader changed, or that leads now, drops what its old leader said of it."""
        zoned = zones(self.agents, self.zoned_from)
        old, self.zone_of = self.zone_of, {m: zone[0] for zone in zoned for m in zone[1:]}
        for node in [n for n in self.pending if self.zone_of.get(n) is None or self.zone_of[n] != old.get(n)]:
            del self.pending[node]
        if zoned and len(zoned) != len(self._zones if self._zoned else []):
            log.info("node agents: %d nodes in %d zones (each zone's leader gathers its members' "
                     "replies; fault.agent_zones_from=%d)", len(self.agents), len(zoned), self.zoned_from)
        self._zones, self._zoned = zoned or [[node] for node in self.agents], bool(zoned)

    def merge(self, now: float, out: dict[int, float]) -> None:
        """Put in ``out`` the silence of every rank an agent covers (a rank of the assignment in
        force that its last reply names): the reported seconds plus the report's age, for a
        rank whose ping was in flight when the agent replied (the age counts from when the
        driver asked, as a ping's silence counts from its sending: neither the transit nor the
        driver's loop delays a detection); at least the agent's own silence (a frozen or
        cut-off node answers nothing); 0.0 for a rank whose ping failed (its actor died: the
        step calls report the death). One pass per node: cheap at 10,000 ranks."""
        for node, (silence, dead, asked) in self.reports.items():
            held = self.out.get(node)
            quiet = now - held[1] if held is not None else 0.0
            pending = self.pending.get(node)
            if pending is not None and pending[0] > 0:  # a zone member its leader still waits for
                quiet = max(quiet, pending[0] + now - pending[1])
            age = now - asked
            out.update({r: max(quiet, s + age) if s > 0 else quiet for r, s in silence.items()})
            out.update(dict.fromkeys(dead, 0.0))

    def _end(self, node: str) -> None:
        agent = self.agents.pop(node, None)
        for held in (self.told, self.out, self.reports, self.last_sent, self.pending):
            held.pop(node, None)
        self._rezone()
        if agent is not None:
            try:
                ray.kill(agent, no_restart=True)
            except Exception as e:  # noqa: BLE001 - gone already
                log.debug("ending the liveness agent of node %s: %s", node[:8], e)

    def close(self) -> None:
        """End every agent (the group is shut down)."""
        for node in list(self.agents):
            self._end(node)
        self._seen = (None, [])


def _start_agent(node: str) -> Any:
    from raypod.worker.node_agent import remote_node_agent

    return remote_node_agent(node).remote()


class Probes:
    """The liveness pings in flight: one ``silence`` request per node agent (:class:`NodeAgents`)
    where the group has them, else one ping per rank: ``rank -> (actor, ref, sent at)``.

    Args:
        agents: use node agents (``fault.node_agents``).
        zoned_from: zone the agents past this many nodes (``fault.agent_zones_from``).
        nodes: the group's rank -> node list as it stands (the agents follow it).
    """

    def __init__(self, agents: bool = False, nodes: Callable[[], list[str]] | None = None,
                 zoned_from: int | None = None) -> None:
        self._out: dict[int, tuple[Any, Any, float]] = {}
        self._last: dict[int, tuple[Any, float]] = {}
        """Per rank: (actor, when its last answered ping was sent)."""
        self._late: collections.deque[tuple[float, float, bool]] = collections.deque()
        """(when, how late, while training) of the answers that came late (over 0.25 s), the
        last :data:`SLOW_WINDOW_S` seconds of them."""
        self._training = False
        self._looked = 0.0
        self.agents = NodeAgents(zoned_from=zoned_from) if agents and nodes is not None else None
        self._nodes = nodes or list
        self.via_agent: set[int] = set()
        """The ranks the last :meth:`silence` took from their node's agent (the rest: pinged by the driver)."""
        self._noted: set[int] = set()

    @property
    def relays(self) -> dict[str, Any] | None:
        """node -> its agent, for each agent that has answered for its node's current ranks (so
        it is up and was told them): a recovery's calls to many ranks go through these
        (:func:`raypod.driver.rank_calls.call_ranks`); None without node agents."""
        if self.agents is None:
            return None
        return {n: self.agents.agents[n] for n in self.agents.reports if n in self.agents.agents}

    @property
    def agent_handles(self) -> dict[str, Any] | None:
        """node -> its running :class:`~raypod.worker.node_agent.NodeAgent` (they read and kill
        a rank alone on its node); None without node agents."""
        return self.agents.agents if self.agents is not None else None

    @property
    def slowest_s(self) -> float:
        """The longest an answer is known to have waited in the last :data:`SLOW_WINDOW_S` s
        (a busy host; 0.0: none over 0.25 s)."""
        return self._slowest(training_only=False)

    def _slowest(self, training_only: bool) -> float:
        cut = time.monotonic() - SLOW_WINDOW_S
        while self._late and self._late[0][0] < cut:
            self._late.popleft()
        return max((late for _, late, training in self._late if training or not training_only), default=0.0)

    def _answered_late(self, late: float, who: str) -> None:
        if late <= 0.25:
            return
        if late > max(0.25, self.slowest_s):
            log.info("%s answered a liveness ping after more than %.2f s (the slowest lately)", who, late)
        self._late.append((time.monotonic(), late, self._training))

    def clear(self) -> None:
        """Forget the per-rank pings (the agents and their reports stay)."""
        self._out.clear()
        self._last.clear()

    def close(self) -> None:
        """End the node agents (the group is shut down)."""
        self.clear()
        if self.agents is not None:
            self.agents.close()

    def silence(self, actors: list[Any], every_s: float, use_agents: bool = True) -> Silence:
        """Per rank, the seconds its liveness ping in flight has waited (0.0: none in flight).
        Never waits. A rank whose node agent has answered is covered by the agent's report
        (see :meth:`NodeAgents.merge`); any other rank (no agent, or one still starting,
        or ``use_agents`` off) is pinged by the driver: at most one ping in flight, sent
        ``every_s`` after its last answered one.

        A rank whose actor changed (a replacement) starts afresh; a ping that failed (the
        actor died) counts as answered: the calls in flight report the death. The result
        carries :attr:`slowest_s` (how late answers came lately).
        """
        now = time.monotonic()
        out: dict[int, float] = {}
        self.via_agent = set()
        # While training (the running loop asks with the agents): the late answers of a group
        # forming (every rank building its model at once) do not raise the running allowance.
        self._training = use_agents
        nodes = self._nodes()
        if self.agents is not None and len(nodes) == len(actors) and actors:
            self.agents.sync(nodes, actors)
            for late in self.agents.collect(self._looked):
                self._answered_late(late, "a node agent")
            self.agents.send(now, every_s)
            if use_agents:
                self.agents.merge(now, out)
                self.via_agent = set(out)
        self._ping(actors, [r for r in range(len(actors)) if r not in out], every_s, now, out)
        self._note(out, every_s)
        self._looked = now
        return Silence(out, slowest_s=self._slowest(training_only=use_agents))

    def _ping(self, actors: list[Any], ranks: list[int], every_s: float, now: float,
              out: dict[int, float]) -> None:
        """The per-rank pings of ``ranks``: collect the answered ones, send the due ones, and
        put each rank's silence in ``out``; pings to any other rank are dropped."""
        refs = [ref for _, ref, _ in self._out.values()]
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
        for rank in ranks:
            actor = actors[rank]
            held = self._out.get(rank)
            if held is not None and held[0] is not actor:
                held = None
            if held is not None and held[1] in ready:
                # How late answers get (busy hosts): at least until the previous look, when it
                # was not there yet (the time the driver did not look does not count).
                self._answered_late(max(0.0, self._looked - held[2]), f"rank {rank}")
                self._last[rank] = (actor, held[2])
                held = None
            if held is None:
                self._out.pop(rank, None)
                last = self._last.get(rank)
                if last is None or last[0] is not actor or now - last[1] >= every_s:
                    held = (actor, actor.ping.remote(), now)
                    self._out[rank] = held
            out[rank] = now - held[2] if held is not None else 0.0
        pinged = set(ranks)
        for rank in [r for r in self._out if r not in pinged]:
            del self._out[rank]

    def _note(self, out: dict[int, float], every_s: float) -> None:
        """Log once per silence which path found a rank silent for two probe intervals (the
        node agent's report or the driver's own ping): what a silent rank's log line is read by."""
        quiet = {r for r, s in out.items() if s >= 2 * every_s}
        new = sorted(quiet - self._noted)
        for how, ranks in (("their node agent's ping", [r for r in new if r in self.via_agent]),
                           ("the driver's ping", [r for r in new if r not in self.via_agent])):
            if ranks:
                more = f" and {len(ranks) - 8} more" if len(ranks) > 8 else ""
                log.info("rank(s) %s%s have not answered %s for %.2f s or more", ranks[:8], more, how,
                         min(out[r] for r in ranks))
        self._noted = quiet


SLOW_WINDOW_S = 10.0
"""How long a late answer keeps raising the silence allowed (see :class:`raypod.protocol.Silence`)."""

CONFIRM_PING_S = 3.0
"""How long a rank found silent while a group forms gets to answer one more ping."""


def forming_watch(probes: Probes, actors: Callable[[], list[Any]], silent_s: float,
                  kill: Callable[[set[int]], None], attempt: int,
                  where: Callable[[], tuple[list[str], list[int]]] | None = None) -> Callable[[], None]:
    """A check for :func:`raypod.driver.rank_calls.get_all` while the ranks ``actors()`` form
    group ``attempt``: a rank silent for ``silent_s`` (or twice the slowest answer seen, on a
    host too busy to answer within it) that also misses a second ping of
    :data:`CONFIRM_PING_S` (or whose process its node reads as stopped or gone: no second
    ping) is killed (``kill``), the others are told to abort their groups
    (``interrupt``: a rank waiting in the rendezvous for it returns), and the wait ends.
    Forming a group is the busiest moment of a host (every rank builds its model at once):
    measured, 33 rank processes on 2 cores missed a 0.5 s second ping; a frozen rank answers
    no ping at all, so the longer one costs only its own wait.

    Every actor must be up already (a cold actor's first ping waits for its process).

    With ``where`` (each rank's node and process id), a silent rank whose process is read on
    its node (:func:`process_ticks`) around the second ping and found running, waiting for a
    CPU or using CPU is busy, not frozen, and is left to go on (measured: 32 ranks building
    their models on 2 cores, one missed both pings for over 4 s and the whole group was
    started again); a stopped one, or one asleep that used no CPU, is lost. The reader is
    the driver (its own node), a sibling rank, or the node's agent (a rank alone on its node).

    The ranks are pinged by the driver here, not by their node agents: forming is a short
    window, the busiest of a host, when a just-started agent may not answer yet; the probes
    still start the agents (:meth:`NodeAgents.sync`), so that they cover the ranks once the
    group trains. (Starting them only once the group has trained a step, to keep their
    process start off the ranks' start, was tried and withdrawn: on 2 cores an agent and the
    warm spare then start together during steps 2-4, and a freeze there was found late.)

    Raises:
        GroupStartError: (from the check) naming the silent ranks, ``kind="unresponsive"``.
    """
    probes.clear()

    def check() -> None:
        ranks = actors()
        silence = probes.silence(ranks, silent_s / 4, use_agents=False)
        limit = max(silent_s, 2 * probes.slowest_s)
        quiet = [r for r, s in silence.items() if s >= limit]
        if not quiet:
            return
        nodes, pids = where() if where is not None else ([], [])
        agents = probes.agent_handles
        before = process_ticks(ranks, nodes, pids, quiet, agents=agents) if where is not None else {}
        # A process its node reads as stopped or gone (SIGSTOP, a zombie) can answer no ping:
        # lost now, without the second one's wait.
        stopped = {r for r in quiet if r in before and before[r] is None}
        rest = [r for r in quiet if r not in stopped]
        missed = {rest[i] for i in unresponsive([ranks[r] for r in rest], CONFIRM_PING_S)} if rest else set()
        lost = stopped | missed
        if missed and where is not None:  # read again: did a rank that missed the ping work meanwhile?
            working = busy(before, process_ticks(ranks, nodes, pids, sorted(missed), agents=agents))
            if working:
                log.info("rank(s) %s did not answer a ping while the group formed, but their processes "
                         "are working (a loaded host): waiting on", sorted(working))
            lost -= working
        if not lost:
            return
        kill(lost)
        for r, actor in enumerate(ranks):
            if r not in lost:
                actor.interrupt.remote(attempt)
        raise GroupStartError(f"rank(s) {sorted(lost)} stopped answering while the group formed: no "
                              f"answer to a ping for {silent_s:g} s (fault.silent_s)",
                              kind="unresponsive", rank=min(lost))

    return check
