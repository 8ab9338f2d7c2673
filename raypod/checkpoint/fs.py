"""One way to reach storage for local paths and fsspec URIs (s3://, gs://, ...)."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


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
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def read_json(uri: str) -> Any | None:
    """Read a JSON file, or None when it is missing or unreadable."""
    fs, path = get_fs(uri)
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None
