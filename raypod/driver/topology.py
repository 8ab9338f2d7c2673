"""Where the ranks' state lives besides themselves: pure functions of the group's layout.

Which rank holds each rank's in-memory replica (:func:`peer_ring`), which rank is its HSDP
twin (:func:`hsdp_twins`), and how a placement keeps off excluded nodes (:func:`avoid_nodes`).
No Ray: the worker group and the recovery planning both use them, and tests call them directly.
"""

from __future__ import annotations


def hsdp_twins(strategy: str, replicas: int, world_size: int) -> list[int | None] | None:
    """With HSDP, the rank of the next replica that holds the same shard as each rank.

    HSDP replicas hold identical shards (same gradients, same update), so a lost rank's
    state is already in its twin's own snapshot and nothing needs replicating. ``None``
    when the job is not HSDP with two or more replicas (mesh as in ``build_mesh``).
    """
    if strategy != "hsdp" or replicas < 2 or world_size % replicas:
        return None
    shard = world_size // replicas
    return [(r + shard) % world_size for r in range(world_size)]


def peer_ring(nodes: list[str]) -> list[int | None]:
    """Who holds each rank's replica: the rank ``k`` places on, ``k`` = most ranks on a node.

    With ranks contiguous per node and two or more nodes, that is always a rank on
    another node, so a whole node can go; on one node it is the next rank. A single
    rank has no peer.
    """
    n = len(nodes)
    if n < 2:
        return [None] * n
    per_node = max(nodes.count(x) for x in set(nodes))
    k = per_node if len(set(nodes)) > 1 and per_node < n else 1
    return [(r + k) % n for r in range(n)]


def peers_of(peer_to: list[int | None], rank: int) -> tuple[int | None, int | None]:
    """``(rank this one replicates to, rank that replicates to this one)`` in ``peer_to``."""
    to = peer_to[rank] if peer_to else None
    frm = peer_to.index(rank) if to is not None else None
    return to, frm


def avoid_nodes(excluded: set[str], bundles: int) -> list[dict[str, str]] | None:
    """A placement-group label selector that keeps every bundle off the ``excluded`` nodes."""
    if not excluded:
        return None
    return [{"ray.io/node-id": f"!in({','.join(sorted(excluded))})"}] * bundles
