"""Token cache entries: committed by a manifest, verified on every reuse, shared per user.

An entry is ``<root>/tokens-<fingerprint>/`` holding one token file (a unique name per
writer) and ``manifest.json``, written last and atomically: readers ignore a folder
without one, and two jobs writing the same entry at once each write their own file, so
neither can corrupt the other's (the last manifest wins; both files are whole).

The manifest records the token file's size and SHA-256, taken while it was written.
:func:`read_entry` checks both before an entry is reused: a truncated or altered file is
reported in a warning naming it and the caller tokenises again. Nothing in an entry is
ever executed or unpickled: the manifest is JSON, the token file raw integers, and the
manifest's file name and dtype are checked against what a writer can produce.

Besides the job's own cache root (``<checkpoint.storage>/.raypod_data`` or
``recipe.args.cache_dir``, which every rank reads from), the driver keeps a per-user
cache, :func:`user_token_cache` (``~/.cache/raypod/tokens``): an entry found there is
published into the job's root by a hard link or a copy instead of being tokenised again,
so a job with another name or another storage over the same data and tokenizer reuses it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import shutil
import uuid
from typing import Any, BinaryIO

from fsspec.implementations.local import LocalFileSystem

from raypod.storage import file_sha256, get_fs, read_json, write_json_atomic

log = logging.getLogger("raypod.data")

USER_CACHE_ENV = "RAYPOD_TOKEN_CACHE"
"""Environment variable naming the per-user token cache folder (set but empty: none)."""
DTYPES = ("uint8", "uint16", "uint32")
"""Token dtypes a writer produces (:class:`raypod.data.prepare.TextTokenizer`); others are refused."""
_FILE_RE = re.compile(r"^tokens-[0-9a-f]{12}\.(uint8|uint16|uint32)$")


def user_token_cache() -> str | None:
    """The per-user token cache folder: ``$RAYPOD_TOKEN_CACHE`` (empty: off), else
    ``$XDG_CACHE_HOME/raypod/tokens``, else ``~/.cache/raypod/tokens``."""
    if USER_CACHE_ENV in os.environ:
        value = os.environ[USER_CACHE_ENV].strip()
        return os.path.abspath(os.path.expanduser(value)) if value else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "raypod", "tokens")


def entry_dir(root: str, fingerprint: str) -> str:
    """The folder of ``fingerprint``'s entry under ``root``."""
    return root.rstrip("/") + f"/tokens-{fingerprint}"


def new_file_name(dtype: str) -> str:
    """A token file name no other writer uses."""
    return f"tokens-{uuid.uuid4().hex[:12]}.{dtype}"


class DigestWriter:
    """Wraps an open output file: counts and hashes what is written (the manifest's checks)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out, self.size, self._h = out, 0, hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.out.write(data)
        self._h.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        return self._h.hexdigest()


def _check_file(fs: Any, inner: str, manifest: dict[str, Any]) -> str | None:
    """Why the token file does not match its manifest (None: it does)."""
    try:
        size = fs.size(inner)
    except (FileNotFoundError, OSError):
        return "it is missing"
    if size != manifest["bytes"]:
        return f"it holds {size} bytes, its manifest says {manifest['bytes']}"
    if file_sha256(fs, inner) != manifest["sha256"]:
        return "its SHA-256 differs from its manifest's"
    return None


def _valid_manifest(m: Any, fingerprint: str) -> bool:
    """The fields a reader relies on, of the types and values a writer produces."""
    if not isinstance(m, dict) or m.get("fingerprint") != fingerprint:
        return False
    return (isinstance(m.get("file"), str) and bool(_FILE_RE.match(m["file"]))
            and m.get("dtype") in DTYPES and m["file"].endswith("." + m["dtype"])
            and isinstance(m.get("num_tokens"), int) and isinstance(m.get("bytes"), int)
            and m["bytes"] == m["num_tokens"] * int(m["dtype"][4:]) // 8
            and isinstance(m.get("sha256"), str) and len(m["sha256"]) == 64)


def read_entry(root: str, fingerprint: str) -> dict[str, Any] | None:
    """The committed, verified manifest of ``fingerprint``'s entry under ``root``, with its
    token file's URI as ``uri``; None when there is none or it fails its checks (warned)."""
    d = entry_dir(root, fingerprint)
    manifest = read_json(d + "/manifest.json")
    if manifest is None:
        return None
    if isinstance(manifest, dict) and manifest.get("fingerprint") == fingerprint and "sha256" not in manifest:
        log.info("data: the token cache entry %s was written without a digest (an older raypod); "
                 "tokenising again", d)
        return None
    if not _valid_manifest(manifest, fingerprint):
        log.warning("data: ignoring the token cache entry %s: its manifest is not one raypod wrote; "
                    "tokenising again", d)
        return None
    uri = d + "/" + manifest["file"]
    fs, inner = get_fs(uri)
    why = _check_file(fs, inner, manifest)
    if why is not None:
        log.warning("data: the cached token file %s is not the one written (%s); tokenising again", uri, why)
        return None
    return {**manifest, "uri": uri}


def commit(root: str, fingerprint: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Commit an entry whose token file ``manifest["file"]`` is written: its manifest last."""
    d = entry_dir(root, fingerprint)
    write_json_atomic(d + "/manifest.json", manifest)
    return {**manifest, "uri": d + "/" + manifest["file"]}


def publish(entry: dict[str, Any], root: str, fingerprint: str) -> dict[str, Any]:
    """Put a verified local ``entry`` into ``root``: a hard link where the file system allows,
    else a copy (an upload for a URI); the manifest is committed after the file is whole."""
    name = new_file_name(entry["dtype"])
    fs, inner = get_fs(entry_dir(root, fingerprint) + "/" + name)
    src = entry["uri"]
    fs.makedirs(posixpath.dirname(inner), exist_ok=True)
    try:
        if isinstance(fs, LocalFileSystem):
            try:
                os.link(src, inner)
            except OSError:  # another file system, or links not allowed
                tmp = f"{inner}.{uuid.uuid4().hex}.tmp"
                shutil.copyfile(src, tmp)
                os.replace(tmp, inner)
        else:
            fs.put_file(src, inner)
    except BaseException:
        remove_quietly(fs, inner)
        raise
    manifest = {k: v for k, v in entry.items() if k != "uri"}
    return commit(root, fingerprint, {**manifest, "file": name, "published_from": src})


def remove_quietly(fs: Any, inner: str) -> None:
    """Remove one file this writer made; a failure to do so is not the caller's error."""
    try:
        fs.rm_file(inner)
    except (FileNotFoundError, OSError):
        pass


def remove_empty_dirs(fs: Any, dirs: list[str]) -> None:
    """Remove the folders this writer created, deepest first, only while they are empty:
    another job may have begun writing the same entry into them meanwhile."""
    for p in reversed(dirs):
        try:
            if not fs.ls(p, detail=False):
                fs.rmdir(p)
        except (FileNotFoundError, OSError):
            pass
