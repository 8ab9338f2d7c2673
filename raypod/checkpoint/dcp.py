"""Rank-side save and load with torch.distributed.checkpoint (DCP).

``get_state_dict`` / ``set_state_dict`` give world-size-independent keys (FQNs with
DTensor shards), so a checkpoint written by N ranks loads on M ranks.
"""

from __future__ import annotations

from concurrent.futures import Future

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.optim import Optimizer


def _writer(path: str) -> dcp.StorageWriter:
    if "://" in path and not path.startswith("file://"):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(path)
    return dcp.FileSystemWriter(path.removeprefix("file://"))


def _reader(path: str) -> dcp.StorageReader:
    if "://" in path and not path.startswith("file://"):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(path)
    return dcp.FileSystemReader(path.removeprefix("file://"))


def save(model: nn.Module, optimizer: Optimizer, path: str, *, async_save: bool,
         process_group: dist.ProcessGroup | None = None) -> Future | None:
    """Save model and optimizer shards to ``path``.

    With ``async_save`` the state is copied to host memory before returning and
    written by a background thread; the returned future completes when this rank's
    files and (on the coordinator) ``.metadata`` are written.
    """
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    if async_save:
        return dcp.async_save(state, storage_writer=_writer(path), process_group=process_group)
    dcp.save(state, storage_writer=_writer(path), process_group=process_group)
    return None


def load(model: nn.Module, optimizer: Optimizer, path: str) -> None:
    """Load model and optimizer from ``path``, resharding to this world size."""
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, storage_reader=_reader(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
