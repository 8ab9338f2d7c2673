"""The calls the driver has running on the ranks, and what comes back from them.

A :class:`WorkerGroup <raypod.driver.worker_group.WorkerGroup>` submits steps, replica
waits and saves here; :meth:`InFlight.poll` hands the finished ones to the driver, turning
a failed call into a :class:`~raypod.protocol.WorkerError` (and, after an error, pinging
the ranks that said nothing to find the dead one); :meth:`InFlight.drain` settles every
call after a failure and names the lost ranks.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import Any

import ray

from raypod.driver.outcomes import PollResult
from raypod.driver.rank_calls import PING_TIMEOUT_S, Fanout, describe, finished, stream_refs, unresponsive
from raypod.protocol import ErrorKind, Interrupted, WorkerError

Relay = Callable[[str, list[int], tuple[Any, ...], float], Fanout]
"""``(method, ranks, args, timeout) -> answers``: calls on many ranks through the node agents."""

log = logging.getLogger("raypod.driver")

INTERRUPT_AFTER_S = 0.1
"""After a failure, calls still running this long are interrupted: the rank aborts its process
groups (:meth:`raypod.worker.group.GroupSession.abort`), so a live rank blocked in any
collective with a lost peer returns within milliseconds, on gloo and on NCCL alike. A call
still running ``drain``'s timeout after that is hung, and its rank lost."""

CAUSE_GRACE_S = 0.5
"""How long the driver waits for a failed rank's own error once its peers' errors (their
collectives broken by its abort) arrived first and no rank is found dead: a loaded host can
deliver them in either order (:meth:`InFlight._await_cause`)."""

STEP, REPLICA, SAVE = "step", "replica", "save"
"""What a call in flight is: a training step (or a window of them: a stream of step results,
:meth:`InFlight._collect_streams`), a replica wait, a checkpoint save."""

SUBMIT_PER_POLL = 512
"""At most this many rank calls are sent per :meth:`InFlight.flush`: a step for 10,000 ranks is
sent over about 20 driver loop iterations (~0.1 s of driver CPU each at ~0.2 ms a call,
``benchmarks/results/scale_calibration.json``) instead of in one ~2 s block, so the driver keeps
polling, and notices a failure, while it is sent. Steps are queued ahead of the ranks
(:data:`raypod.driver.ledger.STEPS_IN_FLIGHT`), so no rank waits for the rest of the send."""

COLLECT_PER_POLL = 1024
"""At most this many streams (step windows' calls) have their results collected per
:meth:`InFlight.poll`: a step of 10,000 ranks' results is collected over about 10 driver loop
iterations (~0.1 s of driver CPU each at ~0.1 ms a result, the calibration's ``stream_item``)
instead of in one ~1 s block, during which a failure would wait. Streams that ended (a lost
rank's error, a window's end) are taken first, and the others in turn, so a lost rank's error
never waits behind the other ranks' results (:meth:`InFlight._take_first`)."""


NODE = -1
"""The rank of a node's window stream in :attr:`InFlight._pending`: its ranks are in
:attr:`InFlight._members`."""


class InFlight:
    """The rank calls submitted and not collected yet: ``ref -> (rank, what, step)``, and the
    calls queued to be sent (:meth:`queue`), in order.

    A node's window (:meth:`raypod.worker.node_agent.NodeAgent.window`: its agent opened its
    ranks' windows and streams their results in one list per step) is one stream for several
    ranks: its entry's rank is :data:`NODE`, and :attr:`_members` holds the ranks whose own
    stream has not ended yet, each with the next step it will return."""

    def __init__(self, per_flush: int = SUBMIT_PER_POLL, per_collect: int = COLLECT_PER_POLL) -> None:
        self._pending: dict[Any, tuple[int, str, int]] = {}
        self._members: dict[Any, dict[int, int]] = {}
        self._held = PollResult()
        """Results collected outside a poll (:meth:`await_started`), handed out by the next one."""
        self._queued: collections.deque[tuple[Callable[[], Any], int | tuple[int, ...], str, int]] = \
            collections.deque()
        self.per_flush = per_flush
        self.per_collect = per_collect

    def __len__(self) -> int:
        return len(self._pending) + len(self._queued)

    def add(self, ref: Any, rank: int | tuple[int, ...], what: str, step: int) -> None:
        """A call sent (``rank``: a tuple of ranks for a node's window stream)."""
        if isinstance(rank, tuple):
            self._members[ref] = dict.fromkeys(rank, step)
            rank = NODE
        self._pending[ref] = (rank, what, step)

    def queue(self, send: Callable[[], Any], rank: int | tuple[int, ...], what: str, step: int) -> None:
        """A call to send at the next :meth:`flush` (``send()`` submits it and returns its ref;
        ``rank``: a tuple of ranks for a node's window stream). Calls go out in the order
        queued, so each rank gets its calls in order."""
        self._queued.append((send, rank, what, step))

    def _entries(self) -> list[tuple[int, str, int]]:
        """``(rank, what, step)`` of every call in flight, a node window's ranks each apart."""
        out = [e for e in self._pending.values() if e[0] != NODE]
        for members in self._members.values():
            out.extend((r, STEP, step) for r, step in members.items())
        return out

    def flush(self, limit: int | None = None) -> int:
        """Send up to ``limit`` (default :attr:`per_flush`) queued calls; returns how many."""
        n = min(len(self._queued), self.per_flush if limit is None else limit)
        for _ in range(n):
            send, rank, what, step = self._queued.popleft()
            self.add(send(), rank, what, step)
        return n

    @property
    def queued(self) -> int:
        """Calls queued and not sent yet."""
        return len(self._queued)

    def clear(self) -> None:
        self._pending.clear()
        self._members.clear()
        self._queued.clear()
        self._held = PollResult()

    def _take_held(self, out: PollResult) -> PollResult:
        held, self._held = self._held, PollResult()
        out.steps[:0], out.saved[:0], out.errors[:0], out.replicated[:0] = (
            held.steps, held.saved, held.errors, held.replicated)
        return out

    def ahead_of(self, ranks: set[int]) -> dict[int, list[Any]]:
        """Per rank of ``ranks``: refs that end with its calls in flight that run in its actor's
        default concurrency group (all but replica waits; a window stream's completion ref),
        which a call from another caller (its node agent) must wait for to run after them."""
        out: dict[int, list[Any]] = {}
        for ref, (rank, what, _) in self._pending.items():
            if rank in ranks and what != REPLICA:
                out.setdefault(rank, []).append(ref.completed() if isinstance(ref, ray.ObjectRefGenerator) else ref)
        return out

    def not_started(self) -> set[int]:
        """Ranks in a node's window (opened by their node agent) that have returned nothing
        from it yet (still at the window's first step, its entry's): their ``train_window`` call
        may not have reached them."""
        return {r for gen, members in self._members.items() for r, step in members.items()
                if step == self._pending[gen][2]}

    def await_started(self, timeout: float) -> None:
        """Wait until every rank in a node's window has returned something from it (a step, its
        error or its end): then its window call has reached it, and a call the driver sends it
        directly now runs after that window (a rank runs one caller's calls in order, and a node
        window's calls come from the agent). What arrives meanwhile goes to the next poll; a
        rank that has not started by ``timeout`` is reported failed there."""
        deadline = time.monotonic() + timeout
        while (waiting := self.not_started()) and time.monotonic() < deadline:
            gens = [g for g, m in self._members.items() if not waiting.isdisjoint(m)]
            self._collect(finished(gens, max(0.0, deadline - time.monotonic())), self._held)
        late = self.not_started()
        for members in self._members.values():
            for rank in sorted(late & set(members)):
                self._held.errors.append(WorkerError(
                    rank=rank, step=members[rank], kind=ErrorKind.EXCEPTION,
                    message=f"its step window, opened by its node agent, had not started {timeout:.0f} s later"))
                members.pop(rank)

    def poll(self, actors: list[Any], timeout: float) -> PollResult:
        """Send the next queued calls (:meth:`flush`), then collect whatever finished within
        ``timeout`` seconds; after an error, ranks that do not answer a ping are reported dead
        too (``actors``: the ranks' actors)."""
        out = self._take_held(PollResult())
        self.flush()
        if not self._pending or out.errors:
            return out
        self._collect(finished(self._pending, timeout), out, self.per_collect)
        if out.errors:  # find the dead: the ranks that no longer answer
            self._find_dead(actors, out)
        return out

    def _find_dead(self, actors: list[Any], out: PollResult) -> None:
        # A rank whose call raised is alive (its process answered); ping the silent ones.
        heard = {e.rank for e in out.errors} | {r.rank for r in out.steps}
        others = [r for r in range(len(actors)) if r not in heard]
        dead = {others[i] for i in unresponsive([actors[r] for r in others])}
        if dead:
            log.info("ranks %s do not answer a ping within %.1f s", sorted(dead), PING_TIMEOUT_S)
        ready, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=0)
        self._collect(ready, out)
        if not dead and all(e.kind == ErrorKind.PEER_LOST for e in out.errors):
            self._await_cause(out)
        known = {e.rank for e in out.errors if e.kind == ErrorKind.WORKER_DIED}
        for rank in sorted(dead - known):
            step = min((st for r, what, st in self._entries() if r == rank and what == STEP),
                       default=-1)
            out.errors.append(WorkerError(rank=rank, step=step, kind=ErrorKind.WORKER_DIED,
                                          message="the worker does not answer (process or node lost)"))

    def _await_cause(self, out: PollResult, grace: float = CAUSE_GRACE_S) -> None:
        """Every error so far says that a peer broke the collective, and every rank answered its
        ping: the rank that failed on its own aborted its groups a moment before it raised, so
        its error is on its way. Collect what arrives for up to ``grace`` seconds, until an
        error that is not a peer's breakage (the cause the driver names) is among them."""
        deadline = time.monotonic() + grace
        while self._pending and time.monotonic() < deadline:
            ready = finished(self._pending, deadline - time.monotonic())
            if not ready:
                return
            self._collect(ready, out)
            if any(e.kind != ErrorKind.PEER_LOST for e in out.errors):
                return

    def quiesce(self, timeout: float) -> PollResult:
        """Let every call in flight finish (the queued ones are sent first; nothing new is
        submitted); return what arrived."""
        out = self._take_held(PollResult())
        self.flush(len(self._queued))
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            ready, _ = ray.wait(list(self._pending), num_returns=len(self._pending),
                                timeout=max(0.0, deadline - time.monotonic()))
            self._collect(ready, out)
        return out

    def drain(self, actors: list[Any], timeout: float, attempt: int | None = None,
              keep: set[int] | frozenset[int] = frozenset(),
              patience: Callable[[], float] | None = None,
              gone: set[int] | frozenset[int] = frozenset(),
              relay: Relay | None = None) -> set[int]:
        """After a failure: let every call in flight finish or fail; return the lost ranks.

        A rank is lost when its actor died, or when its call is still running after
        ``timeout`` (hung, even though its peers' collectives broke). ``attempt`` (the
        attempt the ranks are in) keeps a late interrupt from reaching a rejoined rank.

        A rank of ``keep`` (it holds the only in-memory copy of some rank's state now) that
        answered the interrupt (by the end of ``timeout``: a busy host answers late) is
        waited for longer before it is given up: up to
        ``patience()`` seconds in all (what the way back without it would take; see
        :func:`raypod.driver.recovery_plan.patience_s`).

        ``gone``: ranks being killed already (the failed rank and every rank found dead): never
        interrupted, so the wait for the interrupts' answers does not run to its end on a rank
        that cannot answer (a frozen rank cost every freeze recovery the ping's 0.5 s).

        ``relay``: sends the interrupts through the node agents (one driver call per node:
        with NCCL every survivor is blocked, so every survivor is interrupted).
        """
        lost: set[int] = set()
        gone = set(gone)
        self._queued.clear()  # never sent: nothing to settle
        first = min(timeout, INTERRUPT_AFTER_S)
        self._settle(time.monotonic() + first, lost)
        stuck = sorted(self._busy() - lost - gone)
        if stuck:
            # Still running: hung, or alive but blocked in a collective the failure broke (on
            # NCCL nothing breaks it: a dead peer's kernels just never arrive). A live rank is
            # told to abort its groups; it then returns with its process and its copies.
            where, unanswered = self._interrupt({r: actors[r] for r in stuck}, attempt, first, relay)
            self._settle(time.monotonic() + timeout, lost, set(stuck))
            still = self._busy() - lost - gone
            where.update(self._answers(unanswered, still & set(keep)))  # late on a busy host
            # Only a rank that answered the interrupt (its process runs) is worth waiting for.
            held = still & set(keep) & set(where)
            extra = (patience() - timeout) if held and patience is not None else 0.0
            if extra > 0:
                log.warning("rank(s) %s still in their calls %.1f s after their groups were aborted, "
                            "and they hold the only in-memory copy of a rank's state: waiting up to "
                            "%.1f s more before giving them up (the way back without them is "
                            "estimated at %.1f s)", sorted(held), timeout, extra, extra + timeout)
                self._settle(time.monotonic() + extra, lost, held)
                still = self._busy() - lost - gone
                if not still & held:
                    log.info("rank(s) %s ended their calls within the extra wait: kept", sorted(held))
            if still:
                calls = sorted((r, what, step) for r, what, step in self._entries()
                               if r in still and what != REPLICA)
                log.warning("rank(s) %s still in %s %.1f s after their groups were aborted (%s): "
                            "given up as lost", sorted(still), calls, timeout + max(0.0, extra),
                            "; ".join(f"rank {r} was in step {w.step}, phase {w.phase_name} for "
                                      f"{w.in_phase_s:.1f} s" for r, w in sorted(where.items()) if r in still)
                            or "no answer to the interrupt")
        lost |= self._busy()
        self.clear()
        return lost

    # A replica wait may hang on an exchange with the dead peer until its own timeout; it
    # says nothing about its rank, which the regroup releases (not waited for).
    def _work(self, ranks: set[int] | None = None) -> list[Any]:
        return [ref for ref, (rank, what, _) in self._pending.items()
                if what != REPLICA and (ranks is None or rank in ranks
                                        or (rank == NODE and not ranks.isdisjoint(self._members.get(ref, ()))))]

    def _busy(self) -> set[int]:
        return {rank for rank, what, _ in self._entries() if what != REPLICA}

    def _settle(self, deadline: float, lost: set[int], ranks: set[int] | None = None) -> None:
        """Collect the calls (other than replica waits; of ``ranks`` only, when given) that end
        before ``deadline``; the ranks whose actor died join ``lost``."""
        while self._work(ranks) and time.monotonic() < deadline:
            refs = self._work(ranks)
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            out = PollResult()
            self._collect(ready, out)
            lost.update(e.rank for e in out.errors if e.kind == ErrorKind.WORKER_DIED)

    @staticmethod
    def _interrupt(stuck: dict[int, Any], attempt: int | None, after_s: float,
                   relay: Relay | None = None) -> tuple[dict[int, Interrupted], dict[Any, int]]:
        """Abort the groups of the ranks whose calls are ``stuck``: where each one that answered
        within a ping's time was, and the interrupts not answered by then (``ref -> rank``).
        Through ``relay`` (the node agents), a rank whose answer did not come back in time is
        sent one interrupt directly, whose late answer the drain can still collect."""
        if relay is not None:
            out = dict(relay("interrupt", sorted(stuck), (attempt,), PING_TIMEOUT_S).answers)
            log.info("interrupted %d rank(s) through their node agents (%d answered)", len(stuck), len(out))
            refs = {stuck[r].interrupt.remote(attempt): r for r in sorted(set(stuck) - set(out))}
            ready = []
        else:
            refs = {actor.interrupt.remote(attempt): r for r, actor in stuck.items()}
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=PING_TIMEOUT_S)
            out = InFlight._answers({ref: refs[ref] for ref in ready})
        for r, where in sorted(out.items()):
            log.info("rank %d's call still ran %.1f s after the failure (step %s, phase %s "
                     "for %.1f s): interrupted", r, after_s, where.step, where.phase_name, where.in_phase_s)
        return out, {ref: r for ref, r in refs.items() if ref not in ready}

    @staticmethod
    def _answers(refs: dict[Any, int], ranks: set[int] | None = None) -> dict[int, Interrupted]:
        """The interrupt answers among ``refs`` (``ref -> rank``; of ``ranks`` only, when given)
        that have arrived: ``rank -> where it was``; an actor gone answers nothing."""
        wanted = [ref for ref, r in refs.items() if ranks is None or r in ranks]
        ready, _ = ray.wait(wanted, num_returns=len(wanted), timeout=0) if wanted else ([], [])
        out: dict[int, Interrupted] = {}
        for ref in ready:
            try:
                out[refs[ref]] = ray.get(ref)
            except Exception:  # noqa: BLE001 - the actor is gone
                continue
        return out

    def _collect(self, ready: list[Any], out: PollResult, per_collect: int | None = None) -> None:
        """Take the results of the calls ``ready``; of streams at most ``per_collect`` (see
        :data:`COLLECT_PER_POLL`; ``None``: all)."""
        streams = [ref for ref in ready if isinstance(ref, ray.ObjectRefGenerator)]
        if per_collect is not None and len(streams) > per_collect:
            streams = self._take_first(streams, per_collect)
        if streams:
            self._collect_streams(streams, out)
        for ref in ready:
            if isinstance(ref, ray.ObjectRefGenerator):
                continue
            rank, what, step = self._pending.pop(ref)
            try:
                value = ray.get(ref)
            except Exception as e:  # noqa: BLE001
                kind, msg = describe(e)
                out.errors.append(WorkerError(rank=rank, step=step, kind=kind, message=msg))
                continue
            if what == STEP:
                out.steps.append(value)
            elif what == REPLICA:
                out.replicated.append((rank, *value))
            elif value:
                out.saved.append((rank, value))

    def _take_first(self, gens: list[Any], limit: int) -> list[Any]:
        """The ``limit`` streams of ``gens`` (all with results ready) to collect now: those whose
        call ended (its last result or its error is there: one ``ray.wait`` over the calls'
        completion refs) first, then the others in the order of :attr:`_pending`, where each
        stream taken moves to the end, so that every stream is taken in turn."""
        done = set(ray.wait([g.completed() for g in gens], num_returns=len(gens), timeout=0, fetch_local=False)[0])
        taken = sorted(gens, key=lambda g: g.completed() not in done)[:limit]  # stable: the ended first
        for gen in taken:
            self._pending[gen] = self._pending.pop(gen)
        return taken

    def _collect_streams(self, gens: list[Any], out: PollResult) -> None:
        """Every step result the window calls ``gens`` (``train_window``: streams) have ready, got
        in one ``ray.get``; a call leaves :attr:`_pending` when its stream ends (after its last
        step, or its error). Its entry's step is the next one it will return."""
        items = [(gen, ref) for gen in gens for ref in stream_refs(gen)]
        try:
            values = ray.get([ref for _, ref in items])
            failed: list[BaseException | None] = [None] * len(items)
        except Exception:  # noqa: BLE001 - some stream ended with an error: take them one by one
            values, failed = [], []
            for _, ref in items:
                try:
                    values.append(ray.get(ref))
                    failed.append(None)
                except Exception as e:  # noqa: BLE001
                    values.append(None)
                    failed.append(e)
        for (gen, _), value, err in zip(items, values, failed, strict=True):
            rank, what, step = self._pending[gen]
            if rank == NODE:
                self._node_results(gen, value, err, out)
                continue
            if err is not None:
                kind, msg = describe(err)
                out.errors.append(WorkerError(rank=rank, step=step, kind=kind, message=msg))
                continue
            out.steps.append(value)
            self._pending[gen] = (rank, what, value.step + 1)
        for gen in gens:
            if gen.is_finished() and not gen.next_ready():
                self._pending.pop(gen, None)
                for rank, step in self._members.pop(gen, {}).items():  # its agent ended it without them
                    out.errors.append(WorkerError(rank=rank, step=step, kind=ErrorKind.WORKER_DIED,
                                                  message="its node agent's window ended without its results "
                                                          "(the agent's process or node lost)"))

    def _node_results(self, gen: Any, value: Any, err: BaseException | None, out: PollResult) -> None:
        """One item of a node's window stream: ``[(rank, tag, payload)]`` (``tag`` ``"step"``:
        a :class:`~raypod.protocol.StepResult`; ``"error"``: ``(ErrorKind value, one line)``;
        ``"end"``: the rank's window ended), or the stream's own error (its agent is gone):
        every rank still in it is lost with it."""
        members = self._members.get(gen, {})
        if err is not None:
            _, msg = describe(err)
            for rank, step in sorted(members.items()):
                out.errors.append(WorkerError(rank=rank, step=step, kind=ErrorKind.WORKER_DIED,
                                              message=f"its node agent's window failed: {msg}"))
            members.clear()
            return
        for rank, tag, payload in value:
            if tag == "step":
                out.steps.append(payload)
                members[rank] = payload.step + 1
            elif tag == "error":
                kind, msg = payload
                out.errors.append(WorkerError(rank=rank, step=members.get(rank, -1), kind=ErrorKind(kind),
                                              message=msg))
                members.pop(rank, None)
            else:
                members.pop(rank, None)
