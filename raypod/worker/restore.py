"""Putting a rank's state back from memory after a failure: its own snapshot, a peer's
replica, or the pieces of a resharded group.

Each function works on the model and optimizer shard and the rank's
:class:`~raypod.worker.snapshot.SnapshotStore`; the :class:`~raypod.worker.trainer.Trainer`
calls them in a group just joined (or, for a roll-back, in the same group) and then moves
its step and data stream to the restored step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from raypod.worker import reshard, snapshot
from raypod.worker.snapshot import SnapshotStore


def drop_after(store: SnapshotStore, step: int, replicas: bool = False) -> None:
    """Forget the own snapshots (and, with ``replicas``, the held replicas) of steps after
    ``step``: those steps are being redone."""
    with store.lock:
        for s in [s for s in store.own if s > step]:
            del store.own[s]
        if replicas:
            for held in store.replicas.values():
                for s in [s for s in held if s > step]:
                    del held[s]


def exchange_moves(model: Any, optimizer: Any, store: SnapshotStore, rank: int, step: int,
                   moves: list[tuple[int, int, int]]) -> int:
    """Restore the state after ``step`` on every rank of a group just joined.

    Args:
        moves: ``(holder, target, source)``: rank ``holder`` sends the replica it holds of
            old rank ``source`` to the new rank ``target`` (a replacement); every other
            rank restores its own snapshot.

    Returns:
        The bytes this rank received from a peer.
    """
    received = 0
    targets = {t for _, t, _ in moves}
    sending: list[tuple[Any, torch.Tensor]] = []
    for holder, target, source in moves:
        if rank == holder:
            # The replica held for ``source``, or (HSDP twin) this rank's identical own state.
            buf = store.replicas.get(source, {}).get(step)
            if buf is None:
                buf = snapshot.to_bytes(store.own[step])
            size = torch.tensor([buf.numel()], dtype=torch.int64)
            # Sent in the background: this rank restores its own state meanwhile.
            sending += [(dist.isend(size, dst=target), size), (dist.isend(buf, dst=target), buf)]
        elif rank == target:
            n = torch.zeros(1, dtype=torch.int64)
            dist.recv(n, src=holder)
            buf = torch.empty(int(n.item()), dtype=torch.uint8)
            dist.recv(buf, src=holder)
            received += buf.numel()
            snap = snapshot.from_bytes(buf, snapshot.state_tensors(model, optimizer))
            snapshot.restore(model, optimizer, snap)
            store.add_own(step, snap)
    if rank not in targets:
        if step not in store.own:
            raise RuntimeError(f"rank {rank} has no snapshot of step {step}")
        snapshot.restore(model, optimizer, store.own[step])
    for work, _ in sending:
        work.wait()
    return received


def export_pieces(model: Any, optimizer: Any, store: SnapshotStore, rank: int, step: int,
                  sources: list[int], old_world: int, new_world: int) -> dict[int, list[torch.Tensor]]:
    """Cut the state after ``step`` of each old rank in ``sources`` into ``new_world`` pieces.

    ``sources`` are this rank (its own snapshot) and lost ranks whose replica it holds.
    Returns ``{source: [bytes for new rank 0, 1, ...]}``.
    """
    lay = reshard.layout(model, optimizer)
    out = {}
    for src in sources:
        if src == rank:
            snap = store.own[step]
        else:
            snap = snapshot.from_bytes(store.replicas[src][step], reshard.local_like(lay, old_world, src))
        out[src] = [snapshot.to_bytes(p) for p in reshard.split(snap, lay, old_world, src, new_world)]
    return out


def assemble_pieces(model: Any, optimizer: Any, rank: int, world_size: int, old_world: int,
                    bufs: list[torch.Tensor]) -> snapshot.Snapshot:
    """Restore this rank's shard of a resharded group from every old rank's piece (old rank
    order); returns the restored state as a snapshot."""
    lay = reshard.layout(model, optimizer)
    pieces = [snapshot.from_bytes(buf, reshard.piece_like(lay, old_world, i, world_size, rank))
              for i, buf in enumerate(bufs)]
    snap = reshard.assemble(pieces, lay, world_size, rank)
    snapshot.restore(model, optimizer, snap)
    return snap
