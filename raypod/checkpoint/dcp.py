"""Rank-side save and load with torch.distributed.checkpoint (DCP).

``get_state_dict`` / ``set_state_dict`` give world-size-independent keys (FQNs with
DTensor shards), so a checkpoint written by N ranks loads on M ranks.

Nothing read back runs code. DCP's ``.metadata`` is a pickle and its non-tensor
items are ``torch.save`` pickles; the driver verifies every file against the manifest
before a rank is told to load (:mod:`raypod.checkpoint.verify`), and the rank itself
(a) checks ``.metadata`` against the manifest's sha256 on the very bytes it then reads,
(b) unpickles it with an allowlist of DCP's metadata classes (no other callable can
be named), and (c) loads every item with ``weights_only=True`` (tensors, numbers,
strings, tuples, lists and dicts only), where DCP's default planner would not.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.optim import Optimizer

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}
"""What a DCP ``.metadata`` pickle may name (besides ``torch.<dtype>``): data classes, no functions
that act."""


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A checkpoint file asked to run something it never needs to (not loaded)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpoint(f"checkpoint file .metadata names {module}.{name}, which DCP metadata "
                               "never holds: not loaded")


def read_metadata(raw: bytes) -> Metadata:
    """Unpickle DCP metadata with the allowlist; raises :class:`UnsafeCheckpoint` otherwise."""
    metadata = _MetadataUnpickler(io.BytesIO(raw)).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint("checkpoint file .metadata does not hold DCP metadata: not loaded")
    return metadata


class _SafeMetadata:
    """Mixin for a DCP reader: ``.metadata`` checked against its digest and unpickled safely."""

    expect_sha256: str | None = None
    refused: UnsafeCheckpoint | None = None
    """Why the metadata was not loaded (DCP flattens the error into its own)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))  # type: ignore[attr-defined]
        with self.fs.create_stream(path, "rb") as f:  # type: ignore[attr-defined]
            raw = f.read()
        try:
            if self.expect_sha256 is not None and hashlib.sha256(raw).hexdigest() != self.expect_sha256:
                raise UnsafeCheckpoint(f"checkpoint file {path} does not match its sha256 in the "
                                       "manifest: not loaded")
            metadata = read_metadata(raw)
        except UnsafeCheckpoint as e:
            self.refused = self.refused or e
            raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # type: ignore[attr-defined]
        return metadata


class _SafeFileSystemReader(_SafeMetadata, dcp.FileSystemReader):
    pass


class _WeightsOnlyPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but non-tensor items load with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class _Digesting:
    """Mixin for a DCP writer: the size and digest of every file this rank wrote (and, on the
    coordinator, ``.metadata``), taken right after writing, into :attr:`digests`.

    So the manifest's digests are computed where the files were written, by every rank on
    its own share, beside the write in the save's background thread; the driver only lists
    the folder at commit, instead of reading the whole checkpoint back (at scale: every
    rank's files, on one process)."""

    ckpt_path: str = ""
    digests: dict[str, dict[str, Any]]

    def _note(self, names: list[str]) -> None:
        from raypod.checkpoint.verify import digest_named

        self.digests.update(digest_named(self.ckpt_path, names))

    def write_data(self, plan: Any, planner: Any) -> Any:
        fut = super().write_data(plan, planner)  # type: ignore[misc]
        fut.wait()
        self._note(sorted({r.storage_data.relative_path for r in fut.value()}))
        return fut

    def finish(self, metadata: Metadata, results: Any) -> None:
        super().finish(metadata, results)  # type: ignore[misc]
        self._note([".metadata"])


def _writer(path: str, digests: dict[str, dict[str, Any]] | None = None) -> dcp.StorageWriter:
    if "://" in path and not path.startswith("file://"):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        if digests is None:
            return FsspecWriter(path)

        class _DigestingFsspecWriter(_Digesting, FsspecWriter):
            pass

        writer: Any = _DigestingFsspecWriter(path)
    elif digests is None:
        return dcp.FileSystemWriter(path.removeprefix("file://"))
    else:
        writer = _DigestingFileSystemWriter(path.removeprefix("file://"))
    writer.ckpt_path, writer.digests = path, digests
    return writer


class _DigestingFileSystemWriter(_Digesting, dcp.FileSystemWriter):
    pass


def _reader(path: str, metadata_sha256: str | None = None) -> dcp.StorageReader:
    if "://" in path and not path.startswith("file://"):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        class _SafeFsspecReader(_SafeMetadata, FsspecReader):
            pass

        reader: Any = _SafeFsspecReader(path)
    else:
        reader = _SafeFileSystemReader(path.removeprefix("file://"))
    reader.expect_sha256 = metadata_sha256
    return reader


def save(model: nn.Module, optimizer: Optimizer, path: str, *, async_save: bool,
         process_group: dist.ProcessGroup | None = None,
         digests: dict[str, dict[str, Any]] | None = None) -> Future | None:
    """Save model and optimizer shards to ``path``.

    With ``async_save`` the state is copied to host memory before returning and
    written by a background thread; the returned future completes when this rank's
    files and (on the coordinator) ``.metadata`` are written. ``digests``, when given,
    receives the size and sha256 of each of those files (``{name: {"size", "sha256"}}``,
    as the manifest records them) before the save completes.
    """
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    writer = _writer(path, digests)
    if async_save:
        return dcp.async_save(state, storage_writer=writer, process_group=process_group)
    dcp.save(state, storage_writer=writer, process_group=process_group)
    return None


def load(model: nn.Module, optimizer: Optimizer, path: str, metadata_sha256: str | None = None) -> None:
    """Load model and optimizer from ``path``, resharding to this world size.

    Args:
        metadata_sha256: the manifest's sha256 of ``.metadata``; the bytes read must match.
    """
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    reader = _reader(path, metadata_sha256)
    try:
        dcp.load(state, storage_reader=reader, planner=_WeightsOnlyPlanner())
    except BaseException:  # DCP's CheckpointException is a BaseException
        if getattr(reader, "refused", None) is not None:
            raise reader.refused from None  # one sentence, not DCP's per-rank traceback dump
        raise
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
