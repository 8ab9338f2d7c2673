"""Driver-side checkpoint bookkeeping: layout, atomic commit, latest, retention.

Layout under ``<storage>/<name>/checkpoints/``::

    step_00000020/            # DCP shards and .metadata, written by the ranks
    step_00000020/manifest.json   # written by the driver last: the commit point

A checkpoint without ``manifest.json`` is never loaded, so a save cut short by a
failure is harmless; it is deleted by the next retention sweep. The manifest records
the size and digest of every file (:mod:`raypod.checkpoint.verify`), and a checkpoint
is chosen for loading only once its files match (:meth:`CheckpointStore.latest_verified`).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from raypod.checkpoint import verify
from raypod.storage import get_fs, join_uri, read_json, write_json_atomic

log = logging.getLogger("raypod.checkpoint")

MANIFEST = verify.MANIFEST
FORMAT_VERSION = 2
"""2: the manifest records ``files`` (size and digest of each) and, when signed, ``hmac_sha256``."""
_STEP_DIR = re.compile(r"step_(\d+)$")


@dataclass(frozen=True)
class CommittedCheckpoint:
    """A checkpoint whose manifest exists."""

    step: int
    path: str
    manifest: dict[str, Any]

    @property
    def metadata_sha256(self) -> str | None:
        """The manifest's sha256 of DCP's ``.metadata`` (a rank checks the bytes it unpickles)."""
        entry = (self.manifest.get("files") or {}).get(".metadata") or {}
        return entry.get("sha256") if isinstance(entry, dict) else None


@dataclass(frozen=True)
class RejectedCheckpoint:
    """A committed checkpoint that failed verification."""

    step: int
    path: str
    file: str
    """The file at fault (``manifest.json`` when the manifest itself is)."""
    reason: str
    """One sentence naming the checkpoint and the file."""


class CheckpointStore:
    """Checkpoints of one job.

    Args:
        job_dir: ``<checkpoint.storage>/<name>``.
        keep: committed checkpoints to keep.
        signing_key: the key of ``checkpoint.signing_key_env``: manifests are signed with
            it at commit, and one without a good signature fails verification.
    """

    def __init__(self, job_dir: str, keep: int, signing_key: bytes | None = None) -> None:
        self.root = join_uri(job_dir, "checkpoints")
        self.keep = keep
        self.signing_key = signing_key

    def path_for(self, step: int) -> str:
        """Where the ranks write step ``step``."""
        return join_uri(self.root, f"step_{step:08d}")

    def _step_dirs(self) -> dict[int, str]:
        fs, root = get_fs(self.root)
        try:
            entries = fs.ls(root, detail=False)
        except FileNotFoundError:
            return {}
        out = {}
        for e in entries:
            m = _STEP_DIR.search(e.rstrip("/"))
            if m:
                out[int(m.group(1))] = self.path_for(int(m.group(1)))
        return out

    def committed(self) -> list[CommittedCheckpoint]:
        """Committed checkpoints, oldest first."""
        out = []
        for step, path in sorted(self._step_dirs().items()):
            manifest = read_json(join_uri(path, MANIFEST))
            if manifest and manifest.get("step") == step:
                out.append(CommittedCheckpoint(step, path, manifest))
        return out

    def latest(self) -> CommittedCheckpoint | None:
        """The newest committed checkpoint, or None (not verified: see :meth:`latest_verified`)."""
        done = self.committed()
        return done[-1] if done else None

    def _read_manifest(self, step: int, path: str) -> CommittedCheckpoint | RejectedCheckpoint | None:
        """The checkpoint of a step folder; None when it has no manifest (never committed)."""
        fs, p = get_fs(join_uri(path, MANIFEST))
        where = f"checkpoint step {step} ({path})"
        try:
            with fs.open(p, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            return RejectedCheckpoint(step, path, MANIFEST, f"{where}: {MANIFEST} cannot be read ({e})")
        try:
            manifest = json.loads(raw)
        except ValueError:
            return RejectedCheckpoint(step, path, MANIFEST, f"{where}: {MANIFEST} is not valid JSON")
        if not isinstance(manifest, dict) or manifest.get("step") != step:
            other = manifest.get("step") if isinstance(manifest, dict) else None
            return RejectedCheckpoint(step, path, MANIFEST,
                                      f"{where}: {MANIFEST} is for step {other}, not {step}")
        return CommittedCheckpoint(step, path, manifest)

    def latest_verified(self) -> tuple[CommittedCheckpoint | None, list[RejectedCheckpoint]]:
        """The newest committed checkpoint whose files match its manifest, and the newer ones that do not.

        Every choice of a checkpoint to load goes through here, on the driver, before
        any rank touches a file: a manifest that is not JSON or names another step, a
        file missing or changed, a manifest without digests or (with a signing key)
        without a good signature, each rejects its checkpoint and the one before is tried.
        """
        rejected: list[RejectedCheckpoint] = []
        for step, path in sorted(self._step_dirs().items(), reverse=True):
            found = self._read_manifest(step, path)
            if found is None:
                continue
            if isinstance(found, CommittedCheckpoint):
                bad = verify.problem(found, self.signing_key)
                if bad is None:
                    return found, rejected
                found = RejectedCheckpoint(step, path, *bad)
            log.debug("%s", found.reason)  # the driver reports it, with what it uses instead
            rejected.append(found)
        return None, rejected

    def commit(self, step: int, world_size: int, extra: dict[str, Any] | None = None,
               digests: dict[str, dict[str, Any]] | None = None) -> str:
        """Write the manifest (the commit point), then apply retention. Returns the path.

        The manifest records the size and digest of every file the ranks wrote (they are
        all written and flushed by now) and, with a signing key, is signed over all of it.
        ``digests``: what the ranks measured as they wrote; files it misses are hashed here.

        Raises:
            OSError: the manifest could not be written (nothing is left half-written).
        """
        path = self.path_for(step)
        t0 = time.perf_counter()
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": world_size,
            "committed_at": time.time(),
            **(extra or {}),
            "files": verify.digest_files(path, digests),
        }
        if self.signing_key is not None:
            manifest[verify.SIGNATURE] = verify.sign(manifest, self.signing_key)
        write_json_atomic(join_uri(path, MANIFEST), manifest)
        log.info("checkpoint step %d: %d files (%.1f MB) digested and committed in %.3f s", step,
                 len(manifest["files"]), sum(f["size"] for f in manifest["files"].values()) / 1e6,
                 time.perf_counter() - t0)
        self._sweep(latest=step)
        return path

    def remove_uncommitted(self) -> list[int]:
        """Delete every step folder without a manifest (saves that will never be committed).

        Only for when no rank writes any more (the end of a job). Returns the steps removed.
        """
        fs, _ = get_fs(self.root)
        gone = []
        for step, path in sorted(self._step_dirs().items()):
            if self._read_manifest(step, path) is not None:
                continue  # committed, or a damaged manifest kept for a look
            try:
                fs.rm(get_fs(path)[1], recursive=True)
                gone.append(step)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("could not delete the uncommitted checkpoint step %d: %s", step, e)
        return gone

    def _sweep(self, latest: int) -> None:
        committed = [c.step for c in self.committed() if c.step <= latest]
        # Committed steps after the one just committed belong to a timeline the job left
        # (it fell back past them because they failed verification): never loaded again.
        doomed = {c.step for c in self.committed() if c.step > latest}
        doomed |= set(committed[: max(0, len(committed) - self.keep)])
        # Uncommitted folders older than the newest commit are dead saves.
        doomed |= {s for s in self._step_dirs() if s < latest and s not in committed}
        fs, _ = get_fs(self.root)
        for step in sorted(doomed):
            try:
                fs.rm(get_fs(self.path_for(step))[1], recursive=True)
            except FileNotFoundError:
                pass
            except OSError as e:  # retention must never stop training
                log.warning("could not delete old checkpoint step %d: %s", step, e)
