"""Moved to :mod:`raypod.storage` (kept until the last importers move over)."""

from raypod.storage import (  # noqa: F401
    StorageError,
    get_fs,
    probe_storage,
    read_json,
    storage_error,
    write_json_atomic,
)
