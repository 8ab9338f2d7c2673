"""A rank's persistent checkpoint saves: started after a step, finished in the background.

:class:`SaveQueue` keeps at most one write in flight (DCP's async save), notes when each
finished (the steps the rank reports to the driver, which commits a step every rank saved)
and how long the last one took, and turns a write that failed for good (full, over quota,
read-only, forbidden) into one :class:`~raypod.storage.StorageError` sentence.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

from raypod.checkpoint import dcp as ckpt
from raypod.config import JobConfig


class SaveQueue:
    """The saves of one rank in flight, by step.

    Args:
        config: the job config (``checkpoint.async_save``, ``checkpoint.storage``).
    """

    def __init__(self, config: JobConfig) -> None:
        self.cfg = config
        self.pending: dict[int, Future] = {}
        self.started: dict[int, float] = {}
        self.save_s: float | None = None
        """Seconds the last persistent save took (reported with steps: the driver's load estimate)."""
        self.digests: dict[int, dict[str, dict[str, Any]]] = {}
        """Per step in flight or finished and not reported yet: the files this rank wrote, with
        their size and sha256 (taken by the writer, for the manifest)."""

    def save(self, model: Any, optimizer: Any, group: Any, step: int, path: str) -> list[int]:
        """Start saving the state after ``step`` on the process group ``group``; returns saves
        finished meanwhile (the one before is waited for: one write in flight at a time)."""
        done = self.reap(wait=True)
        t0 = time.perf_counter()
        self.digests[step] = {}
        try:
            fut = ckpt.save(model, optimizer, path, async_save=self.cfg.checkpoint.async_save,
                            process_group=group, digests=self.digests[step])
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            self._storage_failure(e, step)
            raise
        if fut is None:
            done.append(step)
            self.save_s = time.perf_counter() - t0
        else:
            self.pending[step] = fut
            self.started[step] = t0
        return done

    def reap(self, wait: bool = False) -> list[int]:
        """The steps whose saves finished (all of them, with ``wait``); a failed write raises."""
        done = []
        for step, fut in list(self.pending.items()):
            if wait or fut.done():
                try:
                    fut.result()  # re-raises a failed write
                except BaseException as e:  # DCP's CheckpointException is a BaseException
                    self._storage_failure(e, step)
                    raise
                done.append(step)
                del self.pending[step]
                started = self.started.pop(step, None)
                if started is not None:  # at most a step late: an upper bound of the write
                    self.save_s = time.perf_counter() - started
        return done

    def take_digests(self) -> dict[int, dict[str, dict[str, Any]]]:
        """The file digests of every finished save not handed over yet (each handed over once)."""
        return {s: self.digests.pop(s) for s in [s for s in self.digests if s not in self.pending]}

    def clear(self) -> None:
        """Forget the saves in flight (the group they wrote with is gone)."""
        self.pending.clear()
        self.started.clear()
        self.digests.clear()

    def _storage_failure(self, e: BaseException, step: int) -> None:
        """Raise a full, read-only or forbidden storage as one :class:`StorageError` sentence."""
        from raypod.storage import probe_storage, storage_error

        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            return
        doing = f"writing checkpoint step {step}"
        err = (storage_error(e, self.cfg.checkpoint.storage, doing)
               or probe_storage(self.cfg.job_dir, self.cfg.checkpoint.storage, doing))
        if err is not None:
            raise err from None
