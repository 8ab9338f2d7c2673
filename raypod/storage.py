"""Storage and URIs: one way to reach local paths and fsspec/pyarrow URIs (s3://, gs://, ...).

Everything raypod reads or writes outside a rank's memory (checkpoints, manifests, the job
folder's JSON files, data shards, token caches) goes through these helpers: paths are
joined with :func:`join_uri`, files opened with :func:`get_fs` (fsspec) or
:func:`arrow_fs` (pyarrow), small JSON files written with :func:`write_json_atomic`, and
a failing write is turned into one sentence by :func:`storage_error`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def resolve_storage(storage: str) -> str:
    """Make a local storage path absolute (URIs are kept as they are)."""
    if "://" in storage:
        return storage.rstrip("/")
    return str(Path(os.path.expanduser(storage)).resolve())


def join_uri(base: str, *parts: str) -> str:
    """Join a local path or URI with path components."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def get_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and in-filesystem path for a local path or URI."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def write_json_atomic(uri: str, obj: Any) -> None:
    """Write JSON so that readers see the whole file or none of it.

    Local files are written aside and renamed; object stores publish a single PUT
    atomically.
    """
    fs, path = get_fs(uri)
    data = json.dumps(obj, indent=2, sort_keys=False).encode()
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:  # nothing half-written stays behind (a full disk leaves an empty file)
                os.unlink(tmp)
            except OSError:
                pass
            raise
    else:
        fs.pipe_file(path, data)


def file_sha256(fs: fsspec.AbstractFileSystem, path: str, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file of ``fs`` (the manifests' digests), read into one reused
    ``chunk``-byte buffer: no new allocation per piece (a 48 MB checkpoint file: 27 ms
    against 35-42 ms with a fresh 8 MB bytes object per read, taken from training on a
    busy host, since the ranks digest what they write)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with fs.open(path, "rb") as f:
        if not hasattr(f, "readinto"):
            while piece := f.read(chunk):
                h.update(piece)
            return h.hexdigest()
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def read_json(uri: str) -> Any | None:
    """Read a JSON file, or None when it is missing or unreadable."""
    fs, path = get_fs(uri)
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None


STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})
"""Write errors that no retry fixes: the storage is full, over quota, read-only or not ours."""


class StorageError(OSError):
    """Writing to ``checkpoint.storage`` failed in a way no retry can fix (see :data:`STORAGE_ERRNOS`).

    The message is one sentence naming ``checkpoint.storage`` and the errno's text.
    """

    def __str__(self) -> str:
        return str(self.strerror)


def storage_error(exc: BaseException, storage: str, doing: str) -> StorageError | None:
    """A :class:`StorageError` when ``exc`` (or an error it wraps) is a storage write error, else None.

    Args:
        exc: what was raised (DCP wraps the ranks' errors in a ``CheckpointException``).
        storage: ``checkpoint.storage``, named in the message.
        doing: what was being written, e.g. ``"writing checkpoint step 20"``.
    """
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        while isinstance(getattr(e, "cause", None), BaseException):  # a RayTaskError: the rank's own
            e = e.cause  # type: ignore[attr-defined]
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, StorageError):
            return e
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            text = e.strerror or os.strerror(e.errno)
            return StorageError(e.errno, f"checkpoint.storage '{storage}' cannot be written ({text}, "
                                         f"errno {errno.errorcode.get(e.errno, e.errno)}) while {doing}")
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint.api.CheckpointException
        if isinstance(failures, dict):  # rank -> exception, or (exception, stack) as DCP wraps it
            for x in failures.values():
                x = x[0] if isinstance(x, tuple) and x else x
                if isinstance(x, BaseException):
                    todo.append(x)
    return None


def probe_storage(folder: str, storage: str, doing: str) -> StorageError | None:
    """After a write failed with no errno to tell why (torch's zip writer says "unexpected
    pos" on a full disk), try a small write in ``folder`` (which exists): a full,
    over-quota, read-only or forbidden storage then shows itself as a :class:`StorageError`."""
    try:
        fs, path = get_fs(folder)
        probe = f"{path.rstrip('/')}/.raypod-probe-{uuid.uuid4().hex[:12]}"
        fs.pipe_file(probe, b"\0" * 65536)
        found = None
    except OSError as e:
        found = storage_error(e, storage, doing)
    except Exception:  # noqa: BLE001 - the probe only adds to an error being raised
        found = None
    try:
        fs.rm(probe)  # a write that failed on a full disk still leaves an empty file
    except Exception:  # noqa: BLE001
        pass
    return found


def arrow_fs(path: str) -> tuple[Any, str, str]:
    """``(pyarrow filesystem, inner path, uri prefix)`` for a local path or a URI."""
    import pyarrow.fs as pafs  # only the data paths need pyarrow

    if "://" in path:
        fs, inner = pafs.FileSystem.from_uri(path)
        return fs, inner, path.split("://", 1)[0] + "://"
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path)), ""
