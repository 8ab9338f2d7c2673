"""A node's liveness agent: pings the ranks of its own node, and answers the driver once for all.

Pinging every rank from the driver costs one actor call per rank per round (about 0.2 ms of
driver CPU each, ``benchmarks/results/scale_calibration.json``): at 10,000 ranks a round
outlasts ``fault.silent_s`` and the driver's core is saturated. A :class:`NodeAgent` on each
node (the per-node agent of torchelastic or HyperPod) keeps one ping in flight per local rank
and hands the driver every local rank's silence in one reply, so the driver's cost per round
is one call per node. A recovery's calls to every survivor (interrupts, memory reports) go
through the agents the same way (:meth:`NodeAgent.relay`), and so do a regroup's calls to every
rank (:meth:`NodeAgent.submit`).

The agent imports only the standard library and Ray (never torch): it must be up within
moments of the group's placement, before the first step, on a node whose ranks are busy
importing torch. The pinging logic is :class:`LocalPings`, a plain class that tests drive
with their own ping futures and clock.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import ray

TICK_S = 0.02
"""How often the agent's thread collects answers and sends due pings (a few local ranks: cheap)."""

ZONE_MARGIN_S = 0.5
"""How much longer than its members' own timeout a zone leader waits for their answers."""

LINGER_S = 0.02
"""In a node's window (:func:`window_batches`): once one local rank's result is in, how long
the agent waits for the others' before it sends what it has (the ranks finish a step at about
the same time: one list per step and node, not one message per rank)."""


@dataclass
class _Rank:
    """One local rank: its actor, the ping in flight (and when it was sent), when the last
    answered ping was sent."""

    handle: Any
    ping: Future | None = None
    sent_at: float = 0.0
    answered_sent_at: float | None = None
    dead: bool = False
    pid: int | None = None
    """The rank's process (a ping answers with it): read in ``/proc`` while a ping waits."""
    cpu: int | None = None
    """Its CPU ticks (user + system) when last read."""
    busy_at: float = 0.0
    """When its process was last seen using CPU (not stopped) while a ping waited."""


RUNNING = -1
"""What :func:`cpu_ticks` reports for a process that is running, waiting for a CPU or in
uninterruptible I/O now (``R``, ``D``): alive and busy, whatever its CPU count says."""


def cpu_ticks(pid: int) -> int | None:
    """User + system CPU ticks of a sleeping process; :data:`RUNNING` for one that runs, waits
    for a CPU or for the disk; None when it is stopped (SIGSTOP, traced), a zombie, gone, or
    there is no ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
    if fields[0] in ("T", "t", "Z", "X", "x"):
        return None
    if fields[0] in ("R", "D"):
        return RUNNING
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)


def kill_pid(pid: int) -> None:
    """SIGKILL a lost rank's process on this node (never the caller's own; gone already is
    fine): Ray gives a stopped process a grace period first, while its peers stay blocked in
    collectives with it."""
    if pid != os.getpid():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class LocalPings:
    """At most one ping in flight per local rank, re-sent ``every_s`` after the last answered
    one was sent (as :class:`raypod.driver.liveness.Probes` does from the driver).

    Args:
        send: sends one ping to a rank's actor handle; the future resolves when it answers and
            fails when the actor died.
        every_s: the interval between two pings of one rank.
        clock: monotonic seconds.
    """

    def __init__(self, send: Callable[[Any], Future], every_s: float = 0.25,
                 clock: Callable[[], float] = time.monotonic,
                 cpu: Callable[[int], int | None] = cpu_ticks) -> None:
        self.send, self.every_s, self.clock, self.cpu = send, every_s, clock, cpu
        self.ranks: dict[int, _Rank] = {}
        self.generation = 0
        """The driver's number for the assignment in force (a reply names it, so the driver can
        tell a reply about the ranks it last assigned from one about the ranks before)."""
        self.lock = threading.Lock()
        """Guards :attr:`ranks`: the agent's thread ticks while the driver's calls read and assign."""
        self.slowest_s = 0.0
        """The longest an answered ping waited, since the last :meth:`silence` reply (a busy host:
        the driver allows twice that before it calls a rank silent)."""
        self._ticked = clock()

    def assign(self, ranks: dict[int, Any], generation: int = 0) -> None:
        """The node's ranks now (after a start, a replacement or a regroup), as of the driver's
        assignment ``generation``: a rank whose actor changed, or that is new, starts afresh;
        ranks no longer listed are dropped. An assignment older than the one in force is
        ignored (a threaded actor may run two calls out of order). Handles are compared with
        ``==`` (a Ray handle arrives as a new object each call, equal by actor id)."""
        with self.lock:
            if generation < self.generation:
                return
            kept = {r: s for r, s in self.ranks.items() if r in ranks and s.handle == ranks[r]}
            self.ranks = {r: kept.get(r) or _Rank(handle) for r, handle in ranks.items()}
            self.generation = generation
        self.tick()

    def tick(self) -> None:
        """Collect the answered pings and send the due ones."""
        with self.lock:
            now = self.clock()
            for rank in self.ranks.values():
                if rank.dead:
                    continue
                if rank.ping is not None and rank.ping.done():
                    if rank.ping.cancelled() or rank.ping.exception() is not None:
                        rank.dead, rank.ping = True, None
                        continue
                    answer = rank.ping.result()
                    rank.pid = answer if isinstance(answer, int) and not isinstance(answer, bool) else rank.pid
                    rank.answered_sent_at, rank.ping = rank.sent_at, None
                    # It was not there at the previous tick: it waited at least until then.
                    self.slowest_s = max(self.slowest_s, self._ticked - rank.sent_at)
                elif rank.ping is not None and rank.pid is not None:
                    self._watch(rank, now)
                due = rank.answered_sent_at is None or now - rank.answered_sent_at >= self.every_s
                if rank.ping is None and due:
                    try:
                        rank.ping, rank.sent_at = self.send(rank.handle), now
                        rank.cpu, rank.busy_at = self.cpu(rank.pid) if rank.pid else None, now
                    except Exception:  # noqa: BLE001 - an actor that cannot be called is gone
                        rank.dead = True
            self._ticked = now

    def _watch(self, rank: _Rank, now: float) -> None:
        """A ping waits: a process of this node that is not stopped and runs, waits for a CPU
        or the disk, or used CPU since the last look is busy (a thread holding the GIL through a
        checkpoint write, an overloaded host), not frozen; its silence counts from then. A
        stopped process (SIGSTOP: the stand-in for a frozen peer) or one asleep that used no CPU
        stays silent."""
        ticks = self.cpu(rank.pid) if rank.pid else None
        if ticks == RUNNING or (ticks is not None and rank.cpu is not None and ticks > rank.cpu):
            rank.busy_at = now
        if ticks != RUNNING:
            rank.cpu = ticks

    def silence(self) -> dict[str, Any]:
        """``{"silence": {rank: seconds its ping in flight has waited, or since its process last used
        CPU if that is later (0.0: no ping waits)}, "dead":
        [ranks whose ping failed: the actor died], "generation": the assignment it is about,
        "slowest_s": the longest an answered ping waited since the last reply}``, as of now
        (after a :meth:`tick`)."""
        self.tick()
        with self.lock:
            now = self.clock()
            silence = {r: (now - max(s.sent_at, s.busy_at) if s.ping is not None else 0.0)
                       for r, s in self.ranks.items() if not s.dead}
            slowest, self.slowest_s = self.slowest_s, 0.0
            return {"silence": silence, "dead": sorted(r for r, s in self.ranks.items() if s.dead),
                    "generation": self.generation, "slowest_s": slowest}

    def in_flight(self) -> int:
        """Pings in flight now (at most one per rank)."""
        with self.lock:
            return sum(s.ping is not None for s in self.ranks.values())


@dataclass
class _Member:
    """Another node's agent in a zone this agent leads: its request in flight (and when it was
    sent), its last reply (and when the request it answers was sent)."""

    handle: Any
    request: Future | None = None
    sent_at: float = 0.0
    reply: dict[str, Any] | None = None
    reply_sent_at: float = 0.0
    failed: bool = False


class ZoneGather:
    """A zone leader's requests to the other agents of its zone (a second tier of agents:
    with thousands of nodes the driver asks one leader per zone of about sqrt(nodes) agents,
    not every agent; :class:`raypod.driver.liveness.NodeAgents`).

    Each :meth:`gather` (the driver's request, every probe interval) takes in the members'
    answers that arrived since the last one, sends a new request to each member with none in
    flight, and answers at once with every member's last reply and its age. It never waits:
    a member that does not answer (a frozen or cut-off node) shows as a request pending for
    longer and longer, which the driver counts as its ranks' silence, as it counts its own
    unanswered requests.

    Args:
        send: sends one ``silence`` request to a member agent's handle (``every_s`` given); the
            future resolves with its reply and fails when the agent died.
        clock: monotonic seconds.
    """

    def __init__(self, send: Callable[[Any, float], Future], clock: Callable[[], float] = time.monotonic) -> None:
        self.send, self.clock = send, clock
        self.members: dict[str, _Member] = {}
        self.lock = threading.Lock()

    def gather(self, members: dict[str, Any], every_s: float) -> dict[str, Any]:
        """``{node: {"reply": its agent's last reply or None, "age_s": seconds since the request
        it answers was sent, "pending_s": seconds a request sent before this call has waited
        (0.0: none), "failed": its agent is gone}}`` for the zone's ``members`` (``{node: agent
        handle}``; a member whose handle changed starts afresh, one no longer listed is
        dropped), plus ``"slowest_s"``: the longest an answered request waited."""
        with self.lock:
            now = self.clock()
            kept = {n: m for n, m in self.members.items() if n in members and m.handle == members[n]}
            self.members = {n: kept.get(n) or _Member(h) for n, h in members.items()}
            slowest, out = 0.0, {}
            for node, m in self.members.items():
                if m.request is not None and m.request.done():
                    if m.request.cancelled() or m.request.exception() is not None:
                        m.failed = True
                    else:
                        m.reply, m.reply_sent_at = m.request.result(), m.sent_at
                        slowest = max(slowest, float(m.reply.get("slowest_s", 0.0)))
                    m.request = None
                pending = now - m.sent_at if m.request is not None else 0.0
                if m.request is None and not m.failed:
                    try:
                        m.request, m.sent_at = self.send(m.handle, every_s), now
                    except Exception:  # noqa: BLE001 - an actor that cannot be called is gone
                        m.failed = True
                out[node] = {"reply": m.reply, "age_s": now - m.reply_sent_at if m.reply is not None else 0.0,
                             "pending_s": pending, "failed": m.failed}
            return {"members": out, "slowest_s": slowest}


def relay_calls(send: Callable[[Any], Future], ranks: dict[Any, Any], timeout: float) -> dict[str, Any]:
    """Send one call to each of ``ranks`` (``{rank: actor handle}``) at once with ``send`` and
    wait up to ``timeout`` for the answers.

    Returns ``{"answers": {rank: value}, "failed": {rank: one line} (the actor is gone or the
    call raised), "late": [ranks that had not answered by then]}``.
    """
    futures: dict[int, Future] = {}
    failed: dict[int, str] = {}
    for r, handle in ranks.items():
        try:
            futures[r] = send(handle)
        except Exception as e:  # noqa: BLE001 - an actor that cannot be called is gone
            failed[r] = f"{type(e).__name__}: {e}"
    concurrent.futures.wait(list(futures.values()), timeout=max(0.0, timeout))
    answers: dict[int, Any] = {}
    late = []
    for r, fut in futures.items():
        if not fut.done():
            late.append(r)
        elif fut.cancelled():
            failed[r] = "the call was cancelled"
        elif (error := fut.exception()) is not None:
            failed[r] = f"{type(error).__name__}: {error}"
        else:
            answers[r] = fut.result()
    return {"answers": answers, "failed": failed, "late": sorted(late)}


def window_batches(streams: dict[Any, int]) -> Iterator[list[tuple[int, str, Any]]]:
    """The local ranks' window streams (``{stream: rank}``: their ``train_window`` calls) as
    one stream of lists, each ``[(rank, tag, payload)]``: ``"step"`` with the rank's
    :class:`~raypod.protocol.StepResult`; ``"error"`` with ``(ErrorKind value, one line)``,
    the rank's window having ended with that error; ``"end"`` when its window ended. Ends when
    every rank's window has. A rank's error is sent as soon as it is in (after at most
    :data:`LINGER_S`)."""
    from raypod.driver.rank_calls import describe, stream_refs  # the driver's own words and reading

    live = dict(streams)
    while live:
        ray.wait(list(live), num_returns=1, timeout=None)
        ready, _ = ray.wait(list(live), num_returns=len(live), timeout=LINGER_S)
        batch: list[tuple[int, str, Any]] = []
        for gen in ready:
            rank = live[gen]
            refs = stream_refs(gen)
            ended = gen.is_finished() and not gen.next_ready()
            for ref in refs:
                try:
                    batch.append((rank, "step", ray.get(ref)))
                except Exception as e:  # noqa: BLE001 - the rank's step or process failed: its window is over
                    kind, msg = describe(e)
                    batch.append((rank, "error", (kind.value, msg)))
                    ended = True
                    break
            if ended:
                del live[gen]
                if not batch or batch[-1][:2] != (rank, "error"):
                    batch.append((rank, "end", None))
        if batch:
            yield batch


class NodeAgent:
    """The Ray actor around :class:`LocalPings`: a daemon thread ticks it every :data:`TICK_S`;
    the driver calls :meth:`assign` and :meth:`silence` (made with :func:`remote_node_agent`)."""

    def __init__(self, every_s: float = 0.25) -> None:
        self.pings = LocalPings(lambda handle: handle.ping.remote().future(), every_s)
        self.zone = ZoneGather(lambda handle, every: handle.silence.remote(every).future())
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="raypod-node-agent", daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            self.pings.tick()

    def assign(self, ranks: dict[int, Any], generation: int = 0) -> int:
        """Ping these ranks (``{rank: actor handle}``, the driver's assignment ``generation``)
        from now on; returns how many."""
        self.pings.assign(ranks, generation)
        return len(ranks)

    def silence(self, every_s: float | None = None) -> dict[str, Any]:
        """Every local rank's silence in one reply (see :meth:`LocalPings.silence`); ``every_s``
        sets the interval between two pings of a rank (the driver's probe interval)."""
        if every_s:
            self.pings.every_s = every_s
        return self.pings.silence()

    def gather(self, every_s: float, members: dict[str, Any]) -> dict[str, Any]:
        """As the leader of a zone: this node's own reply (:meth:`silence`, as ``"own"``) and the
        zone's other agents' last replies (:meth:`ZoneGather.gather`), in one answer."""
        zone = self.zone.gather(members, every_s)
        return {"own": self.silence(every_s), **zone}

    def relay(self, method: str, ranks: dict[int, Any], args: tuple[Any, ...] = (),
              timeout: float = 5.0) -> dict[str, Any]:
        """Call ``method(*args)`` on every one of the local ``ranks`` (``{rank: actor handle}``)
        at once and answer once for all of them (:func:`relay_calls`): a recovery's interrupts
        and memory reports cost the driver one call per node, not one per rank."""
        return relay_calls(lambda h: getattr(h, method).remote(*args).future(), ranks, timeout)

    def relay_zone(self, method: str, members: dict[str, tuple[Any, dict[int, Any]]], args: tuple[Any, ...] = (),
                   timeout: float = 5.0) -> dict[str, Any]:
        """As a zone's leader: :meth:`relay` through each member agent (``members``: ``{node:
        (agent handle, {rank: actor handle})}``, this agent's own node among them) at once, and
        answer once for the zone: at thousands of nodes a recovery's call to every rank costs
        the driver one call per zone of about sqrt(nodes) agents, not one per node. The answer
        is :meth:`relay`'s, merged, plus ``"broken"``: the nodes whose agent failed (the driver
        calls their ranks directly)."""
        got = relay_calls(lambda m: m[0].relay.remote(method, m[1], args, timeout).future(), members,
                          timeout + ZONE_MARGIN_S)
        out: dict[str, Any] = {"answers": {}, "failed": {}, "late": [r for n in got["late"] for r in members[n][1]],
                               "broken": sorted(got["failed"])}
        for reply in got["answers"].values():
            out["answers"].update(reply["answers"])
            out["failed"].update(reply["failed"])
            out["late"].extend(reply["late"])
        out["late"].sort()
        return out

    def submit_zone(self, method: str, members: dict[str, tuple[Any, dict[int, tuple[Any, tuple[Any, ...]]]]],
                    timeout: float = 5.0) -> dict[str, Any]:
        """As a zone's leader: :meth:`submit` through each member agent at once; ``{"refs":
        {rank: ref}, "broken": [nodes whose agent failed or did not answer in time]}`` (the
        driver calls those nodes' ranks directly)."""
        got = relay_calls(lambda m: m[0].submit.remote(method, m[1]).future(), members, timeout)
        return {"refs": {r: ref for sent in got["answers"].values() for r, ref in sent.items()},
                "broken": sorted([*got["failed"], *got["late"]])}

    def submit(self, method: str, calls: dict[int, tuple[Any, tuple[Any, ...]]]) -> dict[int, Any]:
        """Call ``method(*args)`` on each local rank (``calls``: ``{rank: (actor handle, args)}``)
        and answer at once with the calls' refs, which the driver waits on itself: a regroup's
        calls cost the driver one call per node, and it still sees each rank's result or error
        the moment it comes (its fail-fast wait and forming watch work as with direct calls)."""
        return {r: getattr(handle, method).remote(*args) for r, (handle, args) in calls.items()}

    def window(self, ranks: dict[int, Any], address: str, key: str, first: int,
               after: dict[int, list[Any]] | None = None) -> Iterator[list[tuple[int, str, Any]]]:
        """Open the step window ``key`` (first step ``first``) on every one of the local
        ``ranks`` (``{rank: actor handle}``: one ``train_window`` call each) and stream their
        results up as one list per step (:func:`window_batches`): the driver makes one call per
        node to open a window and collects one item per node and step, not one per rank.

        ``after``: per rank, refs of the calls the driver sent it before (a save): a rank runs
        the calls of one caller in order, not those of two, so the window is opened once they
        are done (or failed: the driver hears of that from them)."""
        waits = [ref for refs in (after or {}).values() for ref in refs]
        if waits:
            ray.wait(waits, num_returns=len(waits), timeout=None, fetch_local=False)
        streams = {handle.train_window.options(num_returns="streaming").remote(address, key, first): r
                   for r, handle in ranks.items()}
        yield from window_batches(streams)

    def cpu_ticks(self, pid: int) -> int | None:
        """A local rank's process as ``/proc`` shows it (:func:`cpu_ticks`): is a silent rank
        working or frozen? (The driver asks a sibling rank first; a rank alone on its node has
        none.)"""
        return cpu_ticks(pid)

    def kill_pid(self, pid: int) -> None:
        """SIGKILL a lost local rank's process (:func:`kill_pid`)."""
        kill_pid(pid)

    def stop(self) -> None:
        """End the pinging thread (the actor is killed right after)."""
        self._stop.set()


def remote_node_agent(node_id: str) -> Any:
    """A :class:`NodeAgent` actor class bound to node ``node_id`` (no CPU: it must start while
    the ranks hold every CPU of the node; threaded, so ``silence`` answers while ``assign`` runs)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ray.remote(max_restarts=0, max_task_retries=0, max_concurrency=8)(NodeAgent).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
