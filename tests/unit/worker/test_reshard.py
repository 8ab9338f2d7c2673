"""In-memory resharding N -> M: pieces cut and joined back equal torch.chunk of the full tensors."""

from __future__ import annotations

import pytest
import torch

from raypod.worker import reshard
from raypod.worker.reshard import TensorLayout


def _full_state(rows: list[int], seed: int = 0) -> tuple[list[torch.Tensor], list[TensorLayout]]:
    g = torch.Generator().manual_seed(seed)
    tensors, lay = [], []
    for r in rows:
        tensors.append(torch.randn(r, 3, generator=g))
        lay.append(TensorLayout(r, (3,), torch.float32))
    tensors.append(torch.tensor(7.0))  # a replicated scalar, like Adam's step
    lay.append(TensorLayout(None, (), torch.float32))
    return tensors, lay


def _shard(full: list[torch.Tensor], lay: list[TensorLayout], world: int, rank: int) -> list[torch.Tensor]:
    out = []
    for t, lt in zip(full, lay, strict=True):
        if lt.rows is None:
            out.append(t.clone())
        else:
            chunks = list(torch.chunk(t, world, dim=0))
            chunks += [t[:0]] * (world - len(chunks))
            out.append(chunks[rank].clone())
    return out


@pytest.mark.parametrize(("old", "new"), [(3, 2), (2, 3), (1, 4), (4, 1), (3, 3), (5, 2)])
def test_reshard_matches_chunking_at_the_new_size(old, new):
    full, lay = _full_state([7, 1, 2, 10, 0])
    snaps = [_shard(full, lay, old, i) for i in range(old)]
    for i in range(old):  # what every old rank would hold
        assert [tuple(t.shape) for t in snaps[i]] == reshard.local_shapes(lay, old, i)
    cut = [reshard.split(snaps[i], lay, old, i, new) for i in range(old)]
    for j in range(new):
        pieces = [cut[i][j] for i in range(old)]
        for i in range(old):
            assert [tuple(p.shape) for p in pieces[i]] == reshard.piece_shapes(lay, old, i, new, j)
            like = reshard.piece_like(lay, old, i, new, j)
            assert [(tuple(t.shape), t.dtype) for t in like] == [(tuple(p.shape), p.dtype) for p in pieces[i]]
        got = reshard.assemble(pieces, lay, new, j)
        expected = _shard(full, lay, new, j)
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)


def test_wrong_snapshot_is_refused():
    full, lay = _full_state([4])
    with pytest.raises(reshard.ReshardError, match="snapshot has 1 tensors"):
        reshard.split(full[:1], lay, 1, 0, 2)
