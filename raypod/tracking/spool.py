"""The MLflow callback's on-disk spool: what could not be sent yet, kept until it can.

When the tracking store is down or unreachable, the callback's thread moves every
unsent metric point, tag and event record into the spool (one JSON-lines *segment*
file per spill, written to a temporary name and renamed, so a crash never leaves half
a segment) and training goes on. When the store answers again the segments are sent
oldest first and deleted once every record in them is in the store. The spool lives
with the job (``<job_dir>/mlflow_spool/``, or ``~/.raypod/spool/<name>`` when the job's
storage is remote), so a driver that restarts, or the next submission of the same job,
sends what an earlier driver left behind.

A segment line is one JSON object:

- ``{"m": [[key, value, timestamp_ms, step], ...]}``: metric points (whole steps);
- ``{"t": {key: value}}``: run tags;
- ``{"e": {"id": ..., field: value, ...}}``: fields of one failure/resize event.

The end of a job that could not be logged (its artifacts and final status) is kept as
a folder ``finish-<driver id>/`` holding the artifact files and ``finish.json``.
Sending a segment twice is harmless: an SQL tracking store (the default, and what
``mlflow server`` runs on) keeps one row per identical point, and tags are idempotent.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger("raypod.tracking")

SPOOL_DIR = "mlflow_spool"
"""Folder under a local job folder that holds the spool."""
FINISH_FILE = "finish.json"

_counter = itertools.count()


def spool_dir(job_dir: str, name: str) -> Path:
    """Where a job's spool lives.

    Args:
        job_dir: ``<checkpoint.storage>/<name>``: a local path, ``file://`` URI or remote URI.
        name: The job's name (used for remote job folders).

    Returns:
        ``<job_dir>/mlflow_spool`` for local job folders, else ``~/.raypod/spool/<name>``.
    """
    if job_dir.startswith("file://"):
        return Path(job_dir[len("file://"):]) / SPOOL_DIR
    if "://" not in job_dir:
        return Path(os.path.expanduser(job_dir)) / SPOOL_DIR
    return Path(os.path.expanduser("~/.raypod/spool")) / name


class Spool:
    """Segments of unsent records in one folder (created on first write).

    Args:
        root: The spool folder.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, records: list[dict[str, Any]]) -> Path | None:
        """Write records as a new segment (atomically). Returns its path (None if empty).

        Raises:
            OSError: the folder or file could not be written.
        """
        if not records:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"seg-{time_ns():020d}-{os.getpid()}-{next(_counter):06d}.jsonl"
        tmp = self.root / f".{name}.tmp"
        final = self.root / name
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                for rec in records:
                    f.write(json.dumps(rec, separators=(",", ":")))
                    f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            try:  # a full disk leaves no empty or partial segment behind
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise
        return final

    def segments(self) -> list[Path]:
        """The segment files, oldest first."""
        try:
            return sorted(p for p in self.root.glob("seg-*.jsonl") if p.is_file())
        except OSError:
            return []

    def finishes(self) -> list[Path]:
        """The folders of job ends that were not logged yet, oldest first."""
        try:
            return sorted(p for p in self.root.glob("finish-*")
                          if p.is_dir() and (p / FINISH_FILE).is_file())
        except OSError:
            return []

    def finish_dir(self, uid: str) -> Path:
        """The folder for the end of the driver ``uid`` (not created)."""
        return self.root / f"finish-{uid}"

    @staticmethod
    def read(segment: Path) -> list[dict[str, Any]]:
        """A segment's records; unreadable lines are skipped with a warning."""
        out: list[dict[str, Any]] = []
        try:
            text = segment.read_text(encoding="utf-8")
        except OSError as e:
            logger.warning("cannot read MLflow spool segment %s: %s", segment, e)
            return out
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                logger.warning("skipping a damaged line %d of MLflow spool segment %s", i + 1, segment)
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    @staticmethod
    def points(records: list[dict[str, Any]]) -> Iterator[tuple[str, float, int, int]]:
        """The metric points in a segment's records."""
        for rec in records:
            for p in rec.get("m", ()):
                try:
                    key, value, ts, step = p
                    yield str(key), float(value), int(ts), int(step)
                except (TypeError, ValueError):
                    continue

    @staticmethod
    def remove(path: Path) -> None:
        """Delete a sent segment or finish folder."""
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            pass

    def quarantine(self, segment: Path, why: str) -> None:
        """Rename a segment the store refuses for good to ``*.bad`` so it no longer blocks."""
        logger.warning("MLflow refused spool segment %s for good (%s); kept as %s.bad",
                       segment, why, segment.name)
        try:
            os.replace(segment, segment.with_name(segment.name + ".bad"))
        except OSError:
            self.remove(segment)


def time_ns() -> int:
    """``time.time_ns()`` (a function so segment names sort by creation time)."""
    import time

    return time.time_ns()
