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


def peers(peer_to: list[int | None]) -> list[tuple[int | None, int | None]]:
    """Per rank: ``(rank it replicates to, rank that replicates to it)`` in ``peer_to``
    (one pass over the ranks, not a search per rank: at 10,000 ranks a search each was
    5e7 comparisons of driver CPU in every re-formation)."""
    frm: dict[int, int] = {to: r for r, to in enumerate(peer_to) if to is not None}
    return [(to, frm.get(r) if to is not None else None) for r, to in enumerate(peer_to)]


def link_first(peer_to: list[int | None],
               pairs: list[tuple[int | None, int | None]] | None = None) -> list[int | None]:
    """Per rank: the replica peer whose link (:class:`~raypod.worker.group.ReplicaLinks`) it
    forms first, so that every rank forms its two links one after the other in at most three
    rounds, whatever the ring's length. ``pairs`` is ``peers(peer_to)`` when the caller has it.

    A link forms only while both of its ranks are at it. The ring's links are coloured as a
    ring's edges are (0 and 1 alternating along each cycle of ``peer_to``, 2 for the one that
    closes a cycle of odd length) and each rank forms its links in colour order: the links of
    colour 0 all form at once, then those of 1, then those of 2. (A fixed order by rank
    number would chain the ring: each link waiting for the one before it, N in a row.)
    """
    n = len(peer_to)
    pos: list[int | None] = [None] * n
    length = [0] * n
    for start in range(n):
        cycle: list[int] = []
        r: int | None = start
        while r is not None and pos[r] is None:
            pos[r] = len(cycle)
            cycle.append(r)
            r = peer_to[r]
        for c in cycle:
            length[c] = len(cycle)

    def colour(r: int) -> int:  # of the link from r to the rank it replicates to
        p, cycle_len = pos[r] or 0, length[r]
        return 2 if cycle_len % 2 and p == cycle_len - 1 else p % 2

    out: list[int | None] = []
    for r, (to, frm) in enumerate(pairs if pairs is not None else peers(peer_to)):
        if to is None or frm is None:
            out.append(to if to is not None else frm)
        else:
            out.append(to if colour(r) <= colour(frm) else frm)
    return out


def avoid_nodes(excluded: set[str], bundles: int) -> list[dict[str, str]] | None:
    """A placement-group label selector that keeps every bundle off the ``excluded`` nodes."""
    if not excluded:
        return None
    return [{"ray.io/node-id": f"!in({','.join(sorted(excluded))})"}] * bundles
