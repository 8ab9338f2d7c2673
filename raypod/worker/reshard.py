"""Reshard in-memory snapshots from ``N`` ranks to ``M`` ranks, without storage.

A snapshot (:func:`raypod.worker.snapshot.state_tensors`) is this rank's local pieces of
every parameter and optimizer-state tensor, in a fixed order. FSDP2 shards a tensor on
dim 0 the way :func:`torch.chunk` does (chunks of ``ceil(rows / world)`` rows, the last
ones shorter or empty); DDP, and scalars such as Adam's ``step``, are replicated. So
the global tensor is the concatenation of the ranks' pieces, and the piece that new
rank ``j`` of ``M`` needs from old rank ``i`` of ``N`` is the overlap of their row
ranges. Each old rank (or, for a lost rank, the peer holding its replica) cuts its
snapshot into ``M`` such pieces; each new rank concatenates the ``N`` pieces it gets.
Replicated tensors travel once, from old rank 0's snapshot.

This is the in-memory counterpart of torch.distributed.checkpoint's resharding, for
the 1-D meshes of FSDP2 and DDP (HSDP's 2-D mesh resizes through the persistent
checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard


@dataclass(frozen=True)
class TensorLayout:
    """How one snapshot tensor is laid out across ranks."""

    rows: int | None
    """Global size of dim 0 when sharded on it; ``None`` when every rank holds all of it."""
    tail: tuple[int, ...]
    """The shape after dim 0 (sharded) or the whole shape (replicated)."""
    dtype: torch.dtype


class ReshardError(RuntimeError):
    """The model cannot be resharded in memory (the caller uses the persistent checkpoint)."""


def _layout_of(t: torch.Tensor, param: torch.Tensor, alone: bool = False) -> TensorLayout:
    if isinstance(t, DTensor):
        placements = tuple(t.placements)
        if len(placements) != 1:
            raise ReshardError("in-memory resharding supports 1-D meshes (FSDP2, DDP), not HSDP")
        if isinstance(placements[0], Shard):
            if placements[0].dim != 0:
                raise ReshardError(f"a tensor is sharded on dim {placements[0].dim}, not 0")
            return TensorLayout(int(t.shape[0]), tuple(t.shape[1:]), t.dtype)
        return TensorLayout(None, tuple(t.shape), t.dtype)
    if alone and t.ndim >= 1:  # a lone FSDP rank's whole tensor: one shard of one
        return TensorLayout(int(t.shape[0]), tuple(t.shape[1:]), t.dtype)
    return TensorLayout(None, tuple(t.shape), t.dtype)


def layout(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[TensorLayout]:
    """The layout of each tensor of :func:`raypod.worker.snapshot.state_tensors`, same order."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    # A lone rank's FSDP/HSDP model is not wrapped (parallel.parallelize): its tensors
    # are laid out as FSDP2 would shard them over one rank.
    alone = not isinstance(model, (FSDPModule, DistributedDataParallel))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out = [_layout_of(p, p, alone) for p in params]
    for p in params:
        st = optimizer.state.get(p, {})
        out.extend(_layout_of(st[k], p, alone) for k in sorted(st) if isinstance(st[k], torch.Tensor))
    return out


def row_range(rows: int, world: int, rank: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of a ``rows``-row tensor that ``rank`` of ``world`` holds (torch.chunk)."""
    chunk = -(-rows // world)
    return min(rows, rank * chunk), min(rows, (rank + 1) * chunk)


def local_shapes(lay: list[TensorLayout], world: int, rank: int) -> list[tuple[int, ...]]:
    """Shapes of ``rank``'s snapshot tensors in a group of ``world``."""
    out = []
    for t in lay:
        if t.rows is None:
            out.append(t.tail)
        else:
            lo, hi = row_range(t.rows, world, rank)
            out.append((hi - lo, *t.tail))
    return out


def piece_shapes(lay: list[TensorLayout], old_world: int, old_rank: int, new_world: int,
                 new_rank: int) -> list[tuple[int, ...]]:
    """Shapes of the tensors old rank ``old_rank`` sends to new rank ``new_rank``.

    Sharded tensors: the overlap of their row ranges (maybe empty). Replicated ones
    only come from old rank 0.
    """
    out = []
    for t in lay:
        if t.rows is None:
            if old_rank == 0:
                out.append(t.tail)
            continue
        a_lo, a_hi = row_range(t.rows, old_world, old_rank)
        b_lo, b_hi = row_range(t.rows, new_world, new_rank)
        out.append((max(0, min(a_hi, b_hi) - max(a_lo, b_lo)), *t.tail))
    return out


def _sent_by(lay: list[TensorLayout], old_rank: int) -> list[TensorLayout]:
    """The tensors old rank ``old_rank`` sends: every sharded one, replicated ones from rank 0 only."""
    return [t for t in lay if t.rows is not None or old_rank == 0]


def local_like(lay: list[TensorLayout], world: int, rank: int) -> list[torch.Tensor]:
    """Meta tensors shaped like ``rank``'s snapshot (to split a byte buffer, see ``from_bytes``)."""
    return [torch.empty(sh, dtype=t.dtype, device="meta")
            for sh, t in zip(local_shapes(lay, world, rank), lay, strict=True)]


def piece_like(lay: list[TensorLayout], old_world: int, old_rank: int, new_world: int,
               new_rank: int) -> list[torch.Tensor]:
    """Meta tensors shaped like the piece old rank ``old_rank`` sends to new rank ``new_rank``."""
    shapes = piece_shapes(lay, old_world, old_rank, new_world, new_rank)
    return [torch.empty(sh, dtype=t.dtype, device="meta")
            for sh, t in zip(shapes, _sent_by(lay, old_rank), strict=True)]


def split(snap: list[torch.Tensor], lay: list[TensorLayout], old_world: int, old_rank: int,
          new_world: int) -> list[list[torch.Tensor]]:
    """Cut old rank ``old_rank``'s snapshot into the pieces for each of ``new_world`` new ranks."""
    if len(snap) != len(lay):
        raise ReshardError(f"snapshot has {len(snap)} tensors, the model {len(lay)}")
    out: list[list[torch.Tensor]] = []
    for j in range(new_world):
        pieces = []
        for t, lt in zip(snap, lay, strict=True):
            if lt.rows is None:
                if old_rank == 0:
                    pieces.append(t)
                continue
            a_lo, a_hi = row_range(lt.rows, old_world, old_rank)
            b_lo, b_hi = row_range(lt.rows, new_world, j)
            lo, hi = max(a_lo, b_lo), min(a_hi, b_hi)
            pieces.append(t[max(0, lo - a_lo): max(0, hi - a_lo)] if hi > lo else t[:0])
        out.append(pieces)
    return out


def assemble(pieces: list[list[torch.Tensor]], lay: list[TensorLayout], new_world: int,
             new_rank: int) -> list[torch.Tensor]:
    """New rank ``new_rank``'s snapshot from the pieces of every old rank (old rank order)."""
    want = local_shapes(lay, new_world, new_rank)
    cursors = [0] * len(pieces)
    out = []
    for k, lt in enumerate(lay):
        if lt.rows is None:
            t = pieces[0][cursors[0]]
            cursors[0] += 1
        else:
            parts = []
            for i, p in enumerate(pieces):
                parts.append(p[cursors[i]])
                cursors[i] += 1
            t = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0].clone()
        if tuple(t.shape) != want[k]:
            raise ReshardError(f"tensor {k}: assembled {tuple(t.shape)}, this rank needs {want[k]}")
        out.append(t)
    return out
