"""Per-rank data: a Ray Data stream of each step's batch, with cheap rewinds.

A rank consumes, at step ``s``, its strided share of the ``global_batch`` sample ids
that :class:`raypod.data.order.SampleOrder` gives step ``s`` (the same at any world
size). :class:`StepFeed` hands the trainer those batches:

- **Streamed sources** (:class:`TokenWindows`, the GPT's data) run a Ray Data pipeline
  per rank: ``range(steps) → map_batches(assemble)`` where each task computes the
  rank's ids of its steps and cuts their fixed-length windows out of the token file
  (the packing), executed in order (``preserve_order``) and prefetched by
  ``iter_batches`` and a small queue filled by a background thread. Rows carry the
  step and the sample ids, and the trainer reports exactly those ids to the ledger.
- **Cheap rewinds**: the batches of the last few steps taken stay in memory keyed by
  step, so an in-place recovery that rewinds a surviving rank by a few steps is served
  from there and the stream keeps going. Only a new ``(rank, world_size)`` or a rewind
  beyond that memory restarts the stream; while a new stream warms up (Ray Data takes
  a second or more to start its first tasks) the rank assembles the batches itself
  from the memory-mapped token file, so a replacement rank's first step does not wait
  for Ray Data.
- **Late rows**: a step waits for a live stream's row at most ``PATIENCE_FRAC`` of
  the recent step interval (at least ``PATIENCE_MIN_S``), then the rank assembles
  that batch itself (a memory copy of a few windows) and the stream's row for it is
  skipped when it comes. So a stream that falls behind for a moment (a data task
  queued behind other work) costs a step milliseconds, not the task's delay, and a
  stream that cannot run at all (no CPU left for data tasks) never deadlocks
  training; a warning says so.
- **Map-style sources** (anything with ``__len__`` and ``get_batch(ids)``, such as
  the synthetic MLP data) are fetched in-process, as before.

The time :meth:`StepFeed.take` waits is what the rank reports as ``data_s``.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from raypod.data.order import SampleOrder
from raypod.data.prepare import DATA_TASK_CPUS, TokenCorpus

if TYPE_CHECKING:
    import torch

log = logging.getLogger("raypod.data")

STEPS_PER_TASK = 8
"""Steps one Ray Data task assembles (fewer tasks, same order)."""
PATIENCE_FRAC = 0.01
"""A live stream is waited for at most this fraction of the recent step interval ..."""
PATIENCE_MIN_S = 0.005
"""... or this many seconds, whichever is longer; then the rank assembles the batch itself."""
LIVE_AHEAD = 2
"""Rows a new stream must hold ready before the rank stops serving itself and waits on it."""
LATE_WARNING = 50
"""Late steps in a row after which a warning is logged."""
MAX_SKIP = 256
"""A running stream is kept when it is at most this many steps behind the step wanted
(its rows up to there are skipped) rather than restarted."""


@functools.lru_cache(maxsize=4)
def _tokens(uri: str, dtype: str) -> np.ndarray:
    """The token file, memory-mapped when local, else read once into this process."""
    from raypod.storage import get_fs

    if "://" not in uri or uri.startswith("file://"):
        return np.memmap(uri.removeprefix("file://"), dtype=np.dtype(dtype), mode="r")
    fs, inner = get_fs(uri)
    return np.frombuffer(fs.cat_file(inner), dtype=np.dtype(dtype))


@functools.lru_cache(maxsize=4)
def _order(num_samples: int, global_batch: int, seed: int) -> SampleOrder:
    return SampleOrder(num_samples, global_batch, seed)


class TokenWindows:
    """Fixed-length windows of a :class:`TokenCorpus`, addressable by id, streamable per rank.

    Sample ``i`` is ``tokens[j*L : j*L + L + 1]`` with ``j = first + i`` (inputs and shifted
    targets). Small and picklable: it holds the token file's address, not the tokens.

    Args:
        corpus: the prepared token file.
        seq_len: ``L``.
        first: the file's window that is sample 0 (a held-out split starts further on).
        count: samples, at most those from ``first`` to the end of the file (default).
    """

    def __init__(self, corpus: TokenCorpus, seq_len: int, first: int = 0, count: int | None = None) -> None:
        self.corpus, self.seq_len, self.first = corpus, seq_len, first
        left = max(0, corpus.num_samples(seq_len) - first)
        self.n = left if count is None else min(count, left)

    def __len__(self) -> int:
        return self.n

    def windows(self, ids: np.ndarray) -> np.ndarray:
        """``[len(ids), L + 1]`` tokens (the file's dtype), ids in the order given."""
        tokens = _tokens(self.corpus.uri, self.corpus.dtype)
        idx = ((np.asarray(ids, dtype=np.int64).reshape(-1, 1) + self.first) * self.seq_len
               + np.arange(self.seq_len + 1))
        return np.asarray(tokens[idx])

    def to_batch(self, windows: np.ndarray) -> torch.Tensor:
        """What :meth:`raypod.Recipe.loss` receives: int64 ``[n, L + 1]``."""
        import torch

        return torch.from_numpy(np.ascontiguousarray(windows).astype(np.int64))

    def get_batch(self, ids: Any) -> torch.Tensor:
        """The batch of samples ``ids``, assembled in this process."""
        return self.to_batch(self.windows(np.asarray(ids, dtype=np.int64)))

    def warm(self) -> None:
        """Get a spare or joiner ready: token file in the page cache, Ray Data imported.

        Then a replacement rank's first batches and its stream's start cost milliseconds.
        """
        import ray.data  # noqa: F401 - a second or more on a busy machine; not on the recovery path

        tokens = _tokens(self.corpus.uri, self.corpus.dtype)
        int(tokens[:: 4096].sum())

    def stream(self, rank: int, world_size: int, order: SampleOrder, first: int, last: int) -> Any:
        """A Ray Data dataset of rows ``{step, ids, windows}`` for steps ``first..last`` of ``rank``.

        Rows come in step order when executed with ``preserve_order``.
        """
        import ray.data

        # Rows must come in step order; the rank's process runs only its own streams.
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        n = last - first + 1
        blocks = max(1, min(-(-n // STEPS_PER_TASK), 1000))
        ds = ray.data.range(n, override_num_blocks=blocks)
        return ds.map_batches(
            _assemble, batch_size=STEPS_PER_TASK, batch_format="numpy", num_cpus=DATA_TASK_CPUS,
            compute=ray.data.TaskPoolStrategy(size=min(2, blocks)),
            fn_kwargs={"source": self, "first": first, "rank": rank, "world_size": world_size,
                       "order": (order.num_samples, order.global_batch, order.seed)})


def _assemble(batch: dict[str, np.ndarray], source: TokenWindows, first: int, rank: int,
              world_size: int, order: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Ray Data task: the ids of ``rank``'s share of each step and their packed windows."""
    o = _order(*order)
    steps = batch["id"].astype(np.int64) + first
    ids = np.stack([SampleOrder.rank_share(o.ids(int(s)), rank, world_size) for s in steps])
    windows = source.windows(ids.reshape(-1)).reshape(len(steps), ids.shape[1], source.seq_len + 1)
    return {"step": steps, "ids": ids.astype(np.int64), "windows": windows}


class _Pump(threading.Thread):
    """Builds one Ray Data stream (``dataset()``: Ray Data is imported there the first time)
    and iterates it in the background into a bounded queue."""

    def __init__(self, dataset: Callable[[], Any], prefetch: int) -> None:
        super().__init__(daemon=True, name="raypod-data-stream")
        self.dataset = dataset
        self.queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def run(self) -> None:
        it = None
        try:
            it = iter(self.dataset().iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=2))
            for b in it:
                if not self._put((int(b["step"][0]), b["ids"][0], b["windows"][0])):
                    break
            else:
                self._put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which falls back
            self._put(e)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001 - shutting down a stream nobody reads
                    pass


class StepFeed:
    """A rank's batches by step (see the module docstring).

    Args:
        source: the recipe's data (:class:`TokenWindows` streams; others are map-style).
        order: the job's sample order.
        last_step: the job's last step (streams end there).
        keep: batches of recent steps kept for rewinds.
        prefetch: rows the background thread holds ready.
    """

    def __init__(self, source: Any, order: SampleOrder, last_step: int, keep: int = 8,
                 prefetch: int = 8) -> None:
        self.source, self.order, self.last_step = source, order, last_step
        self.streamed = hasattr(source, "stream")
        self.keep, self.prefetch = keep, prefetch
        self.interval: float | None = None
        """Moving average of the seconds between two :meth:`take` calls (the step interval)."""
        self.last_take: float | None = None
        self.late_in_a_row = 0
        self.key: tuple[int, int] | None = None
        self.recent: OrderedDict[int, tuple[np.ndarray, Any]] = OrderedDict()
        self.pump: _Pump | None = None
        self.stopping: list[_Pump] = []
        """Stopped streams whose thread has not ended yet (one blocked inside Ray Data,
        waiting for CPU that the cluster does not have, ends only when it gets some)."""
        self.next_row = 0
        """Step of the next row the stream will deliver."""
        self.live = False
        """Whether the stream has run ahead of training (until then the rank serves itself)."""
        self.start_after: int | None = None
        """``seek(start=False)``: the step served here before any stream starts (the stream
        starts at the next :meth:`take`, once that step is done)."""
        self.stats = {"streamed": 0, "local": 0, "late": 0, "recent": 0, "restarts": 0}

    # ---- positioning -------------------------------------------------------------
    def seek(self, rank: int, world_size: int, step: int, start: bool = True) -> None:
        """The next :meth:`take` is ``step`` as ``rank`` of ``world_size``: get a stream ready for it.

        Keeps the running stream when it will reach the first step not held in memory
        (the usual case after an in-place recovery at the same world size). With
        ``start=False`` no stream starts before ``step`` is done: it is served here and
        the next :meth:`take` starts one (a job's first step then does not share the
        rank's CPU with importing and starting Ray Data).
        """
        if (rank, world_size) != self.key:
            self.key = (rank, world_size)
            self.recent.clear()
            self._stop()
        self.start_after = None if start else step
        if not self.streamed or step > self.last_step or not start:
            return
        first = step
        while first in self.recent:
            first += 1
        if first > self.last_step or (self.pump is not None and self._reaches(first)):
            return
        self._start(first)

    def _reaches(self, step: int) -> bool:
        """Whether the running stream delivers ``step`` after skipping a few rows at most."""
        return self.next_row <= step <= self.next_row + MAX_SKIP

    def _start(self, first: int) -> None:
        self._stop()
        self.stopping = [p for p in self.stopping if p.is_alive()]
        if len(self.stopping) > 1:
            # Streams that cannot even get their tasks scheduled (no free CPU) end only
            # when they do; restarted every few steps they would pile up and their
            # executors starve training. With more than one still winding down, the
            # rank serves itself until they end.
            self.stats["held_back"] = self.stats.get("held_back", 0) + 1
            return
        rank, world_size = self.key
        self.pump = _Pump(functools.partial(self.source.stream, rank, world_size, self.order, first, self.last_step),
                          self.prefetch)
        self.pump.start()
        self.next_row, self.live = first, False
        self.stats["restarts"] += 1

    def _stop(self, wait_s: float = 0.0) -> None:
        if self.pump is not None:
            self.pump.stop.set()
            if wait_s:
                self.pump.join(wait_s)
            self.stopping.append(self.pump)
            self.pump = None

    # ---- consuming ---------------------------------------------------------------
    def _local(self, step: int) -> tuple[np.ndarray, Any]:
        rank, world_size = self.key
        ids = SampleOrder.rank_share(self.order.ids(step), rank, world_size).astype(np.int64)
        self.stats["local"] += 1
        return ids, self.source.get_batch(ids)

    def _patience(self) -> float:
        return max(PATIENCE_MIN_S, PATIENCE_FRAC * (self.interval or 0.0))

    def _from_stream(self, step: int) -> tuple[np.ndarray, Any] | None:
        """The stream's row for ``step``; ``None`` when the rank should serve itself.

        Until the stream has run ahead of training (``LIVE_AHEAD`` rows ready) it is
        never waited for; after that, for at most :meth:`_patience`.
        """
        deadline = time.monotonic() + (self._patience() if self.live else 0.0)
        while True:
            left = deadline - time.monotonic()
            try:
                item = self.pump.queue.get(timeout=left) if left > 0 else self.pump.queue.get_nowait()
            except queue.Empty:
                if self.live:
                    self.stats["late"] += 1
                    self.late_in_a_row += 1
                    if self.late_in_a_row == LATE_WARNING:
                        log.warning("data stream late for %d steps in a row at step %d (no CPU for Ray "
                                    "Data tasks?); the rank assembles its batches meanwhile", LATE_WARNING, step)
                return None
            if item is None or isinstance(item, BaseException):
                log.warning("data stream ended before step %d: %r; restarting it", step, item)
                self.pump = None
                return None
            row_step, ids, windows = item
            self.next_row = row_step + 1
            if not self.live and self.pump.queue.qsize() >= LIVE_AHEAD:
                self.live = True  # the stream is ahead of training: wait for it from now on
            if row_step == step:
                self.stats["streamed"] += 1
                self.late_in_a_row = 0
                return ids, self.source.to_batch(windows)
            if row_step > step:  # rows come in order, so this is a bug; never train on it
                self._stop()
                return None

    def take(self, step: int, rank: int, world_size: int) -> tuple[np.ndarray, Any]:
        """The sample ids and batch of ``step`` for ``rank`` of ``world_size``.

        The ids are those of the stream's row (or of the batch assembled here).
        """
        now = time.monotonic()
        if self.last_take is not None:
            gap = now - self.last_take
            self.interval = gap if self.interval is None else 0.8 * self.interval + 0.2 * gap
        self.last_take = now
        if (rank, world_size) != self.key:
            self.seek(rank, world_size, step)
        if step in self.recent:
            self.stats["recent"] += 1
            return self.recent[step]
        if not self.streamed:
            out = self._local(step)
        else:
            if self.pump is not None and not self._reaches(step):
                self.seek(rank, world_size, step)
            out = (self._from_stream(step) if self.pump is not None else None) or self._local(step)
            if self.pump is None and step < self.last_step and (self.start_after is None or step > self.start_after):
                self._start(step + 1)  # this step served here; a stream for the next ones
        self.recent[step] = out
        for s in [s for s in self.recent if s < step - self.keep]:
            del self.recent[s]
        return out

    def close(self) -> None:
        """Stop the stream (waits a little for its thread to shut Ray Data down)."""
        self._stop(wait_s=5.0)
