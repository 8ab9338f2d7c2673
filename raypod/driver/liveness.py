"""Liveness probes: which ranks have stopped answering, found within about a second.

A rank's ``ping`` runs on a thread of its actor's own and answers within milliseconds,
also while its main thread is inside a step or a collective; only a process that is
stopped (SIGSTOP, a hung kernel holding it), gone, or cut off from the driver stays
silent. :class:`Probes` keeps at most one ping in flight per rank, sends the next one a
moment after the last was answered, and never blocks: the driver's running loop asks
:meth:`Probes.silence` every iteration how long each rank's ping has gone unanswered
(:meth:`raypod.driver.diagnosis.Diagnosis.silent_failure` decides from that).

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

import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import ray

from raypod.driver.outcomes import GroupStartError
from raypod.driver.rank_calls import unresponsive

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


def kill_now(actors: list[Any], nodes: list[str], pids: list[int], ranks: set[int]) -> None:
    """SIGKILL the processes of ``ranks`` now (after ``ray.kill``): through a live rank on the
    same node (its ``kill_pid`` runs on the ping thread), else from the driver when the rank
    runs on the driver's node; a rank with neither is left to Ray."""
    here = ray.get_runtime_context().get_node_id()
    for r in sorted(ranks):
        if r >= len(pids) or r >= len(nodes) or not pids[r]:
            continue
        helper = next((a for q, a in enumerate(actors)
                       if q not in ranks and q < len(nodes) and nodes[q] == nodes[r]), None)
        try:
            if helper is not None:
                helper.kill_pid.remote(pids[r])
            elif nodes[r] == here:
                os.kill(pids[r], signal.SIGKILL)
        except Exception as e:  # noqa: BLE001 - gone already; Ray ends it anyway
            log.debug("killing rank %d's process %d: %s", r, pids[r], e)


class Probes:
    """The liveness pings in flight: ``rank -> (actor, ref, sent at)``."""

    def __init__(self) -> None:
        self._out: dict[int, tuple[Any, Any, float]] = {}
        self._last: dict[int, tuple[Any, float]] = {}
        """Per rank: (actor, when its last answered ping was sent)."""
        self.slowest_s = 0.0
        """The longest a ping is known to have waited for its answer."""
        self._looked = 0.0

    def clear(self) -> None:
        self._out.clear()
        self._last.clear()

    def silence(self, actors: list[Any], every_s: float) -> dict[int, float]:
        """Collect the answered pings, send a new one to each rank that has none in flight
        and was last pinged ``every_s`` ago or more; return, per rank, the seconds its ping
        in flight has waited (0.0: none in flight). Never waits.

        A rank whose actor changed (a replacement) starts afresh; a ping that failed (the
        actor died) counts as answered: the calls in flight report the death.
        """
        now = time.monotonic()
        refs = [ref for _, ref, _ in self._out.values()]
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
        out: dict[int, float] = {}
        for rank, actor in enumerate(actors):
            held = self._out.get(rank)
            if held is not None and held[0] is not actor:
                held = None
            if held is not None and held[1] in ready:
                # How late answers get (busy hosts): at least until the previous look, when it
                # was not there yet (the time the driver did not look does not count).
                late = max(0.0, self._looked - held[2])
                if late > max(0.25, self.slowest_s):
                    log.info("rank %d answered a liveness ping after more than %.2f s (the slowest yet)",
                             rank, late)
                self.slowest_s = max(self.slowest_s, late)
                self._last[rank] = (actor, held[2])
                held = None
            if held is None:
                self._out.pop(rank, None)
                last = self._last.get(rank)
                if last is None or last[0] is not actor or now - last[1] >= every_s:
                    held = (actor, actor.ping.remote(), now)
                    self._out[rank] = held
            out[rank] = now - held[2] if held is not None else 0.0
        for rank in [r for r in self._out if r >= len(actors)]:
            del self._out[rank]
        self._looked = now
        return out


CONFIRM_PING_S = 3.0
"""How long a rank found silent while a group forms gets to answer one more ping."""


def forming_watch(probes: Probes, actors: Callable[[], list[Any]], silent_s: float,
                  kill: Callable[[set[int]], None], attempt: int) -> Callable[[], None]:
    """A check for :func:`raypod.driver.rank_calls.get_all` while the ranks ``actors()`` form
    group ``attempt``: a rank silent for ``silent_s`` (or twice the slowest answer seen, on a
    host too busy to answer within it) that also misses a second ping of
    :data:`CONFIRM_PING_S` is killed (``kill``), the others are told to abort their groups
    (``interrupt``: a rank waiting in the rendezvous for it returns), and the wait ends.
    Forming a group is the busiest moment of a host (every rank builds its model at once):
    measured, 33 rank processes on 2 cores missed a 0.5 s second ping; a frozen rank answers
    no ping at all, so the longer one costs only its own wait.

    Every actor must be up already (a cold actor's first ping waits for its process).

    Raises:
        GroupStartError: (from the check) naming the silent ranks, ``kind="unresponsive"``.
    """
    probes.clear()

    def check() -> None:
        ranks = actors()
        silence = probes.silence(ranks, silent_s / 4)
        limit = max(silent_s, 2 * probes.slowest_s)
        quiet = [r for r, s in silence.items() if s >= limit]
        if not quiet:
            return
        lost = {quiet[i] for i in unresponsive([ranks[r] for r in quiet], CONFIRM_PING_S)}
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
