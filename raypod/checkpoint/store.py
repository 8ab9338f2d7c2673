"""Driver-side checkpoint bookkeeping: layout, atomic commit, latest, retention.

Layout under ``<storage>/<name>/checkpoints/``::

    step_00000020/            # DCP shards and .metadata, written by the ranks
    step_00000020/manifest.json   # written by the driver last: the commit point

A checkpoint without ``manifest.json`` is never loaded, so a save cut short by a
failure is harmless; it is deleted by the next retention sweep.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from raypod.checkpoint.fs import get_fs, read_json, write_json_atomic
from raypod.config import join_uri

log = logging.getLogger("raypod.checkpoint")

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step_(\d+)$")


@dataclass(frozen=True)
class CommittedCheckpoint:
    """A checkpoint whose manifest exists."""

    step: int
    path: str
    manifest: dict[str, Any]


class CheckpointStore:
    """Checkpoints of one job.

    Args:
        job_dir: ``<checkpoint.storage>/<name>``.
        keep: committed checkpoints to keep.
    """

    def __init__(self, job_dir: str, keep: int) -> None:
        self.root = join_uri(job_dir, "checkpoints")
        self.keep = keep

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
        """The newest committed checkpoint, or None."""
        done = self.committed()
        return done[-1] if done else None

    def commit(self, step: int, world_size: int, extra: dict[str, Any] | None = None) -> str:
        """Write the manifest (the commit point), then apply retention. Returns the path."""
        path = self.path_for(step)
        write_json_atomic(join_uri(path, MANIFEST), {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": world_size,
            "committed_at": time.time(),
            **(extra or {}),
        })
        self._sweep(latest=step)
        return path

    def _sweep(self, latest: int) -> None:
        committed = [c.step for c in self.committed()]
        doomed = set(committed[: max(0, len(committed) - self.keep)])
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
