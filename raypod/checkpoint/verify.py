"""What a committed checkpoint must prove before any rank reads it.

At commit the driver records a digest of every file of the step folder in
``manifest.json`` (:func:`digest_files`): the size and the sha256 of local files, or
the object store's own checksum (ETag, md5Hash, crc32c) where fsspec lists one. The
ranks take those digests of the files they write as they write them
(:func:`digest_named`, through :mod:`raypod.checkpoint.dcp`'s writer) and send them with
their step results; the driver lists the folder and hashes only what no rank reported. With
``checkpoint.signing_key_env`` set, the manifest also carries an HMAC-SHA256 over its
canonical JSON, digests included (:func:`sign`), so that it cannot be edited to match a
swapped file without the key.

Before a checkpoint is loaded the driver checks it (:func:`verify`): a file missing,
of another size or digest, a manifest without digests (committed by an older raypod)
or without a good signature fails, in one sentence naming the file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from fsspec.implementations.local import LocalFileSystem

from raypod.config import ConfigError
from raypod.storage import file_sha256, get_fs

if TYPE_CHECKING:
    from raypod.checkpoint.store import CommittedCheckpoint
    from raypod.config import JobConfig

MANIFEST = "manifest.json"
SIGNATURE = "hmac_sha256"
"""The manifest field that holds its HMAC (over every other field)."""
_STORE_CHECKSUMS = ("ETag", "etag", "md5Hash", "crc32c")
"""Checksums an object store lists with a file (s3, gcs): no read needed."""


def signing_key(config: JobConfig) -> bytes | None:
    """The key named by ``checkpoint.signing_key_env``, or None when none is configured.

    Raises:
        ConfigError: the environment variable is not set (or empty).
    """
    name = config.checkpoint.signing_key_env
    if not name:
        return None
    value = os.environ.get(name, "")
    if not value:
        raise ConfigError(f"checkpoint.signing_key_env names the environment variable {name}, which is "
                          "not set: set it to the key that signs this job's checkpoints")
    return value.encode()


def _digest(fs: Any, path: str, info: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"size": int(info.get("size") or 0)}
    if not isinstance(fs, LocalFileSystem):
        for key in _STORE_CHECKSUMS:
            if info.get(key):
                out[key] = str(info[key])
                return out
    out["sha256"] = file_sha256(fs, path)
    return out


def _files(fs: Any, root: str) -> dict[str, dict[str, Any]]:
    """Relative name -> fsspec info of every file under ``root`` but the manifest."""
    found = fs.find(root, detail=True)
    out = {}
    for p, info in found.items():
        rel = p[len(root.rstrip("/")):].lstrip("/")
        if info.get("type") == "file" and not rel.startswith(MANIFEST):
            out[rel] = info
    return out


def digest_files(path: str, known: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Size and digest of every file of a step folder (hashed on a few threads).

    ``known``: digests the ranks took as they wrote (:func:`digest_named`); a file listed
    there with the size and modification time found is not read again, every other file is
    hashed here.
    """
    fs, root = get_fs(path)
    files = _files(fs, root)
    known = (known or {}) if isinstance(fs, LocalFileSystem) else {}  # an object store lists its checksums
    out = {rel: {k: v for k, v in known[rel].items() if k != "mtime"} for rel, info in files.items()
           if rel in known and _unchanged(known[rel], info)}
    todo = {rel: info for rel, info in files.items() if rel not in out}
    if todo:
        with ThreadPoolExecutor(max_workers=min(8, len(todo))) as pool:
            digests = pool.map(lambda kv: _digest(fs, f"{root.rstrip('/')}/{kv[0]}", kv[1]), todo.items())
            out.update(zip(todo, digests, strict=True))
    return {rel: out[rel] for rel in files}


def _unchanged(known: dict[str, Any], info: dict[str, Any]) -> bool:
    """Whether a file is still the one a rank digested: same size and modification time (a
    step saved again after a recovery rewrites its files)."""
    return (known.get("size") == int(info.get("size") or 0) and known.get("mtime") is not None
            and known.get("mtime") == info.get("mtime"))


def digest_named(path: str, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size and digest of the files ``names`` (relative) of the step folder ``path``, as
    :func:`digest_files` records them (a rank's own files, right after it wrote them), plus
    the modification time they had (``mtime``: :func:`digest_files` trusts a digest only
    while the file still has it)."""
    fs, root = get_fs(path)
    out = {}
    for rel in names:
        full = f"{root.rstrip('/')}/{rel}"
        info = fs.info(full)
        out[rel] = {**_digest(fs, full, info), "mtime": info.get("mtime")}
    return out


def _canonical(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != SIGNATURE}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign(manifest: dict[str, Any], key: bytes) -> str:
    """The HMAC-SHA256 of a manifest's canonical JSON (every field but the signature)."""
    return hmac.new(key, _canonical(manifest), hashlib.sha256).hexdigest()


def problem(committed: CommittedCheckpoint, key: bytes | None = None) -> tuple[str, str] | None:
    """``(file, one sentence)`` for the first thing wrong with a checkpoint, or None.

    Args:
        committed: the checkpoint, its manifest already read.
        key: the signing key (``checkpoint.signing_key_env``), or None.
    """
    where = f"checkpoint step {committed.step} ({committed.path})"
    m = committed.manifest
    if key is not None:
        given = m.get(SIGNATURE)
        if not isinstance(given, str):
            return MANIFEST, (f"{where}: {MANIFEST} is not signed, although checkpoint.signing_key_env "
                              "is set")
        if not hmac.compare_digest(given, sign(m, key)):
            return MANIFEST, (f"{where}: the signature of {MANIFEST} does not match (edited after "
                              "commit, or signed with another key)")
    expected = m.get("files")
    if not isinstance(expected, dict):
        return MANIFEST, (f"{where}: {MANIFEST} records no file digests (committed by an older "
                          "raypod), so its files cannot be verified")
    fs, root = get_fs(committed.path)
    try:
        present = _files(fs, root)
    except FileNotFoundError:
        present = {}
    for name, want in sorted(expected.items()):
        if (not isinstance(name, str) or not isinstance(want, dict) or name.startswith("/")
                or ".." in name.split("/")):
            return MANIFEST, f"{where}: {MANIFEST} lists a file entry that is not valid ({name!r})"
        info = present.get(name)
        if info is None:
            return name, f"{where}: file {name} is missing"
        size = int(info.get("size") or 0)
        if size != want.get("size"):
            return name, f"{where}: file {name} is {size} bytes, the manifest says {want.get('size')}"
        kind = next((k for k in ("sha256", *_STORE_CHECKSUMS) if k in want), None)
        if kind is None:
            return MANIFEST, f"{where}: {MANIFEST} records no digest of file {name}"
        try:
            got = file_sha256(fs, f"{root.rstrip('/')}/{name}") if kind == "sha256" else str(info.get(kind))
        except OSError as e:
            return name, f"{where}: file {name} cannot be read ({e})"
        if got != want[kind]:
            return name, f"{where}: file {name} does not match its {kind} in the manifest"
    return None


def verify(committed: CommittedCheckpoint, key: bytes | None = None) -> str | None:
    """None when every file of ``committed`` matches its manifest, else one sentence naming the file."""
    found = problem(committed, key)
    return None if found is None else found[1]
