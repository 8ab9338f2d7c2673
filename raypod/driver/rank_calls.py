"""Small Ray helpers for calls on rank actors: naming a failure, getting many results, pinging.

Shared by the worker group, its calls in flight (:mod:`raypod.driver.inflight`) and its
spares (:mod:`raypod.driver.spares`), so that each says a failed call the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import remove_placement_group

from raypod.driver.outcomes import GroupStartError
from raypod.protocol import ErrorKind

PING_TIMEOUT_S = 0.5
"""After the first error, every rank is pinged (on a thread of its actor's own, which
answers even inside a collective); a rank that does not answer within this time is taken
for dead, so that a dead rank (or a lost node) is blamed rather than the peer whose
collective broke because of it."""

PEER_LOST_SIGNS = ("connection closed by peer", "connection reset by peer", "broken pipe",
                   "remote worker crashing", "communicator was aborted", "ncclremoteerror",
                   "while its process groups were aborted", "stopped after a failed step")
"""Words of a rank's error that say a peer broke its collective (gloo's pair closed or reset by
the other side, an NCCL communicator aborted or a remote error, raypod's own "the groups were
aborted while the step ran"), not that this rank failed on its own. A timed-out collective is
not among them: :meth:`raypod.driver.diagnosis.Diagnosis.failure_from` blames the rank waited for."""


def describe(e: BaseException) -> tuple[ErrorKind, str]:
    """``(kind, one line)`` for an exception from a rank call."""
    if isinstance(e, RayActorError):
        return ErrorKind.WORKER_DIED, "the worker process died"
    if isinstance(e, RayTaskError):
        cause = e.cause if e.cause is not None else e
        if type(cause).__name__ == "StorageError":  # raypod.storage: one sentence already
            return ErrorKind.STORAGE, str(cause)
        kind = ErrorKind.INJECTED if type(cause).__name__ == "InjectedFault" else ErrorKind.EXCEPTION
        text = str(cause).strip()
        if kind == ErrorKind.EXCEPTION and any(sign in text.lower() for sign in PEER_LOST_SIGNS):
            kind = ErrorKind.PEER_LOST
        return kind, f"{type(cause).__name__}: {text.splitlines()[-1] if text else ''}"
    return ErrorKind.EXCEPTION, f"{type(e).__name__}: {e}"


@contextmanager
def rank_failures(doing: str) -> Iterator[None]:
    """Turn any failure of the calls inside into one :class:`GroupStartError` sentence,
    ``"<doing>: <what went wrong>"`` (a :class:`GroupStartError` passes as it is)."""
    try:
        yield
    except GroupStartError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of a rank call is reported as one
        kind, msg = describe(e)
        raise GroupStartError(f"{doing}: {msg}", kind=kind) from None


def stream_refs(gen: Any) -> list[Any]:
    """The refs a streaming call (a ``ray.ObjectRefGenerator``) has ready now, in order, without
    blocking: its results, and once it ended, its error's ref if it ended with one."""
    refs = []
    while gen.next_ready():
        try:
            refs.append(next(gen))
        except StopIteration:
            break
    if gen.is_finished():  # its end (or its error, among the refs) has arrived
        try:
            refs.append(next(gen))  # none is left: the stream is over
        except StopIteration:
            pass
    return refs


def finished(refs: Iterable[Any], timeout: float) -> list[Any]:
    """Wait up to ``timeout`` for the first of ``refs`` to finish, then return every one finished
    by now: a wait for each finished call, over all that are left, is O(N²) at N ranks."""
    refs = list(refs)
    if not refs:
        return []
    ready, _ = ray.wait(refs, num_returns=1, timeout=max(0.0, timeout))
    if ready:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    return ready


def get_all(refs: list[Any], timeout: float, check: Callable[[], None] | None = None,
            every_s: float = 0.25) -> list[Any]:
    """Get every ref, failing fast on the first error instead of waiting on the rest.

    ``check`` (called every ``every_s`` while calls are outstanding) may raise to end the wait
    early: the liveness watch that finds a rank frozen during a rendezvous.

    Raises:
        GroupStartError: a call failed (naming its index as the rank) or not all finished in time.
    """
    left = {r: i for i, r in enumerate(refs)}
    out: list[Any] = [None] * len(refs)
    deadline = time.monotonic() + timeout
    while left:
        wait_s = max(0.0, deadline - time.monotonic())
        ready = finished(left, min(wait_s, every_s) if check else wait_s)
        if not ready and time.monotonic() >= deadline:
            raise GroupStartError(f"ranks did not finish setting up within {timeout:.0f} s")
        if check is not None:
            check()
        failed: list[tuple[int, ErrorKind, str]] = []
        for r in ready:
            rank = left.pop(r)
            try:
                out[rank] = ray.get(r)
            except Exception as e:  # noqa: BLE001
                failed.append((rank, *describe(e)))
        if failed:  # a rank's own failure before the peers' broken collectives it caused
            rank, kind, msg = min(failed, key=lambda f: f[1] == ErrorKind.PEER_LOST)
            raise GroupStartError(f"rank {rank} failed to start: {msg}", kind=kind, rank=rank)
    return out


K = TypeVar("K")

RELAY_MARGIN_S = 0.5
"""How much longer than the calls' own timeout the driver waits for a node agent's relayed
answer (one hop more)."""


@dataclass
class Fanout:
    """The answers of one call to many ranks (:func:`call_ranks`)."""

    answers: dict[int, Any] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    """Ranks whose call raised or whose actor is gone: one line each."""
    late: list[int] = field(default_factory=list)
    """Ranks that had not answered by the deadline."""


def call_ranks(method: str, ranks: list[int], actors: list[Any], nodes: list[str],
               agents: Mapping[str, Any] | None, args: tuple[Any, ...] = (), timeout: float = 5.0,
               zoned_from: int | None = None) -> Fanout:
    """Call ``method(*args)`` on each of ``ranks`` and wait up to ``timeout`` for the answers.

    With node agents (``agents``: node -> running agent), one call per node: the node's agent
    calls its ranks and answers for all of them (:meth:`~raypod.worker.node_agent.NodeAgent.relay`),
    so the driver's cost is a call per node, not per rank (at 10,000 ranks, a round of 10,000
    actor calls is seconds of driver CPU). Past ``zoned_from`` nodes (``fault.agent_zones_from``)
    one call per zone of about sqrt(nodes) agents, whose leader relays through the others
    (:meth:`~raypod.worker.node_agent.NodeAgent.relay_zone`; the zones of the liveness probes).
    A rank on a node without a running agent, or whose agent fails, is called directly.
    """
    from raypod.driver.liveness import zones

    deadline = time.monotonic() + timeout
    by_node: dict[str, dict[int, Any]] = {}
    straight: list[int] = []
    for r in ranks:
        node = nodes[r] if r < len(nodes) else None
        if agents and node in agents:
            by_node.setdefault(node, {})[r] = actors[r]
        else:
            straight.append(r)
    out = Fanout()
    cut = zones(by_node, zoned_from) if zoned_from is not None and agents else []
    requests = {agents[z[0]].relay_zone.remote(method, {n: (agents[n], by_node[n]) for n in z}, args, timeout):  # type: ignore[index]
                tuple(z) for z in cut}
    if not cut:
        requests = {agents[n].relay.remote(method, handles, args, timeout): (n,)  # type: ignore[index]
                    for n, handles in by_node.items()}
    replies, broken, late = gather(requests, timeout + RELAY_MARGIN_S * (2 if cut else 1))
    for z in late:
        out.late.extend(r for n in z for r in by_node[n])
    for z in broken:  # the agent (a zone's leader) is gone: call its ranks directly
        straight.extend(r for n in z for r in by_node[n])
    for reply in replies.values():
        out.answers.update(reply["answers"])
        out.failed.update(reply["failed"])
        out.late.extend(reply["late"])
        for n in reply.get("broken", ()):  # a member of the zone whose agent is gone
            straight.extend(by_node[n])
    answers, errors, late = gather({getattr(actors[r], method).remote(*args): r for r in straight},
                                   deadline - time.monotonic())
    out.answers.update(answers)
    out.failed.update({r: describe(e)[1] for r, e in errors.items()})
    out.late = sorted(out.late + late)
    return out


def gather(refs: Mapping[Any, K], timeout: float) -> tuple[dict[K, Any], dict[K, Exception], list[K]]:
    """Wait up to ``timeout`` for ``refs`` (``ref -> key``): ``(values, errors, keys not ready)``
    by key, an error being what getting the ref raised (the actor is gone, the call raised)."""
    ready = set(ray.wait(list(refs), num_returns=len(refs), timeout=max(0.0, timeout))[0]) if refs else set()
    values: dict[K, Any] = {}
    errors: dict[K, Exception] = {}
    for ref, key in refs.items():
        if ref in ready:
            try:
                values[key] = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - reported to the caller
                errors[key] = e
    return values, errors, [key for ref, key in refs.items() if ref not in ready]


def unresponsive(actors: list[Any], timeout: float = PING_TIMEOUT_S) -> set[int]:
    """Indices of ``actors`` that do not answer a ping within ``timeout`` seconds.

    The ping runs on a thread of the actor's own, so a live rank answers at once even
    while its main thread is inside a collective; a dead process or a lost node does not.
    """
    _, gone, late = gather({a.ping.remote(): i for i, a in enumerate(actors)}, timeout)
    return set(gone) | set(late)


def kill_quietly(actor: Any) -> None:
    """End an actor's process now; one that is already gone is fine."""
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - usually already dead
        pass


def remove_pg_quietly(pg: Any) -> None:
    """Give back a placement group; one already gone (with its node) is fine."""
    try:
        remove_placement_group(pg)
    except Exception:  # noqa: BLE001
        pass
