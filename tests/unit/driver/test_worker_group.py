"""The real worker group against the driver's contract, and its Ray-free parts.

``WorkerGroup`` must offer every member of ``WorkerGroupProtocol`` with the same parameters
(the driver relies on nothing else, and the tests' fake implements the same protocol); the
topology helpers and the spare pool's bookkeeping need no cluster.
"""

from __future__ import annotations

from typing import Any

import pytest
from support import assert_implements_group_protocol

from raypod.config import JobConfig
from raypod.driver.spares import SparePool
from raypod.driver.topology import avoid_nodes, hsdp_twins, link_first, peer_ring, peers
from raypod.driver.worker_group import GroupStartError, PollResult, WorkerError, WorkerGroup
from raypod.protocol import ErrorKind
from raypod.recipe import Recipe


def _group(tmp_path) -> WorkerGroup:  # noqa: ANN001 - pytest's tmp_path
    cfg = JobConfig.model_validate({"name": "x", "recipe": {"target": "raypod.recipe:Recipe"},
                                    "checkpoint": {"storage": str(tmp_path)}})
    return WorkerGroup(cfg, Recipe())  # places nothing until start()


def test_the_real_group_implements_the_protocol(tmp_path):
    group = _group(tmp_path)
    assert_implements_group_protocol(group)


def test_the_old_import_path_still_names_the_messages():
    assert WorkerError(rank=1, step=2, kind=ErrorKind.WORKER_DIED, message="x").kind == "worker_died"
    assert PollResult().steps == [] and GroupStartError("x").kind == "setup_failed"


def test_topology():
    assert peer_ring(["a"]) == [None]
    assert peer_ring(["a", "a", "a"]) == [1, 2, 0]  # one node: the next rank
    assert peer_ring(["a", "a", "b", "b"]) == [2, 3, 0, 1]  # always a rank on the other node
    assert hsdp_twins("hsdp", 2, 4) == [2, 3, 0, 1] and hsdp_twins("fsdp", 2, 4) is None
    assert peers([1, 2, 0]) == [(1, 2), (2, 0), (0, 1)] and peers([None, None]) == [(None, None)] * 2
    assert peers([]) == [] and peers([1, 0]) == [(1, 1), (0, 0)]
    assert avoid_nodes(set(), 2) is None


def _rounds_to_link(peer_to: list[int | None]) -> int:
    """Rounds until every replica link has formed, each rank forming its links one after the
    other in :func:`link_first`'s order and a link forming only when it is next for both of its
    ranks; fails on a ring whose links would wait on each other for ever."""
    first = link_first(peer_to)
    todo = {}
    for r, (to, frm) in enumerate(peers(peer_to)):
        mine = sorted({p for p in (to, frm) if p is not None and p != r}, key=lambda p: p != first[r])
        todo[r] = [frozenset((r, p)) for p in mine]
    rounds = 0
    while any(todo.values()):
        heads = [links[0] for links in todo.values() if links]
        ready = {link for link in heads if heads.count(link) == 2}
        assert ready, f"the links of {peer_to} wait on each other: {todo}"
        for links in todo.values():
            if links and links[0] in ready:
                links.pop(0)
        rounds += 1
    return rounds


@pytest.mark.parametrize("nodes", [1, 2, 3, 5])
def test_replica_links_of_any_ring_form_in_at_most_three_rounds(nodes):
    for per_node in range(1, 9):
        ring = peer_ring([f"n{i // per_node}" for i in range(nodes * per_node)])
        assert _rounds_to_link(ring) <= 3, ring
    assert _rounds_to_link([(r + 1) % 1001 for r in range(1001)]) == 3  # an odd ring: one more round
    assert _rounds_to_link([(r + 1) % 1000 for r in range(1000)]) == 2


def test_spare_pool_hands_out_spares_oldest_first(tmp_path):
    group = _group(tmp_path)
    pool: SparePool = group.pool
    pool.spares.extend([("a", ("pg", 0)), ("b", ("pg", 1)), ("c", ("pg", 2))])
    assert group.take_spares(2) == [("a", ("pg", 0)), ("b", ("pg", 1))]
    assert group.spares == [("c", ("pg", 2))] and group.take_spares(5) == [("c", ("pg", 2))]
    assert group.joining() == 0 and group.freed == [] and group.ready_joiners() == []


def test_spares_are_reserved_with_the_ranks_and_started_after_the_first_step(tmp_path, monkeypatch):
    """A spare's process (torch, data, a rehearsal step) never competes with the ranks' own
    start: place() only reserves the slots; the refill after the group's first step starts
    them, as it starts a replaced rank's spare after a recovery."""
    import types

    import raypod.driver.spares as spares
    from raypod.driver.membership import Membership

    cfg = JobConfig.model_validate({"name": "x", "recipe": {"target": "raypod.recipe:Recipe"},
                                    "checkpoint": {"storage": str(tmp_path)}, "scaling": {"spares": 2}})
    group = WorkerGroup(cfg, Recipe())
    monkeypatch.setattr(spares, "placement_group", lambda bundles, **_: types.SimpleNamespace(
        n=len(bundles), ready=lambda: "ready"))
    monkeypatch.setattr(spares.ray, "get", lambda ref, timeout=None: ref)
    started: list[tuple[Any, int]] = []

    class Actor:
        def __init__(self, pg: Any, i: int) -> None:
            started.append((pg, i))
            self.warm = types.SimpleNamespace(remote=lambda *a: ("warming", i))

    group.pool._new_actor = Actor
    group.pool.place()
    assert started == [] and group.spares == [] and [i for _, i in group.freed] == [0, 1]
    joins = Membership(cfg.scaling, policy=None)
    joins.refill_after = 0  # the group started at step 0 (the driver's reset)
    joins.refill(group, done_step=0)
    assert started == []
    joins.refill(group, done_step=1)  # its first step is done
    assert [i for _, i in started] == [0, 1] and len(group.spares) == 2 and group.freed == []
    assert sorted(group.pool.warming.values()) == [("warming", 0), ("warming", 1)]


def test_a_replacement_spare_keeps_the_ranks_spread_over_the_nodes(tmp_path, monkeypatch):
    # Rank 1 on node B is lost, rank 0 stays on A: the spare on B takes its place, not the
    # older one on A (rank 0 and the holder of its copy would share node A).
    import raypod.driver.spares as spares

    nodes = {("pg", 0): "A", ("pg", 1): "B", ("pg", 2): "B"}
    monkeypatch.setattr(spares, "node_of", nodes.get)
    pool: SparePool = _group(tmp_path).pool
    pool.spares.extend([("on-A", ("pg", 0)), ("on-B", ("pg", 1)), ("on-B2", ("pg", 2))])
    crowd = {"A": 1}
    assert pool.take(1, crowd) == [("on-B", ("pg", 1))]
    assert crowd == {"A": 1, "B": 1}  # the next lost rank counts the one just placed
    assert pool.take(1, crowd) == [("on-A", ("pg", 0))]  # ties: the oldest
    assert pool.take(1, {"A": 1}) == [("on-B2", ("pg", 2))]


def test_calls_are_sent_in_order_a_bounded_number_per_flush():
    from raypod.driver.inflight import STEP, InFlight

    sent: list[tuple[int, int]] = []
    calls = InFlight(per_flush=3)

    def send(rank: int, step: int):
        return lambda: sent.append((rank, step)) or f"ref-{rank}-{step}"

    for step in (1, 2):
        for rank in range(4):
            calls.queue(send(rank, step), rank, STEP, step)
    assert len(calls) == 8 and calls.queued == 8 and not sent
    assert calls.flush() == 3
    assert sent == [(0, 1), (1, 1), (2, 1)] and len(calls) == 8 and calls.queued == 5
    assert calls.flush(10) == 5
    assert sent[3:] == [(3, 1), (0, 2), (1, 2), (2, 2), (3, 2)]  # each rank's calls in order
    calls.queue(send(0, 3), 0, STEP, 3)
    calls.clear()
    assert len(calls) == 0 and calls.flush() == 0


def test_every_group_meets_through_the_drivers_own_store_until_the_group_is_shut_down(tmp_path, monkeypatch):
    """The store is a real TCP store in the driver's process: each rendezvous gets a prefix of
    its own on the same port (the ranks that stay keep their connection), and a client
    reaches it; closing it drops the server (a group shut down opens another one next time)."""
    from datetime import timedelta

    import torch.distributed as dist

    import raypod.driver.worker_group as wg

    monkeypatch.setattr(wg.ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    group = _group(tmp_path)
    group.actors = ["r0", "r1"]
    first, second = group._rendezvous(), group._rendezvous()
    host_port = first.removeprefix("tcp://").split("/")[0]
    assert second.startswith(f"tcp://{host_port}/") and first != second
    port = int(host_port.split(":")[1])
    client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=5))
    client.set("k", "v")
    assert group.store is not None and group.store._store.get("k") == b"v"
    group.store.close()
    assert group.store._store is None
