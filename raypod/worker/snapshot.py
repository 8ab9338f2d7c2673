"""In-memory snapshots of a rank's shard, and their replication to a peer rank.

After a step, a rank copies its local shard (parameters and optimizer state) to host
memory: the snapshot. A background thread sends it to one peer rank (on another node
when there is one) over a gloo group of its own, and receives the snapshot of the rank
that replicates to it. When a rank is lost, its replacement gets the shard from that
peer and the survivors restore their own copies: no storage is read (Gemini,
SOSP 2023; HyperPod checkpointless training).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from raypod.protocol import MemoryReport

if TYPE_CHECKING:
    from raypod.worker.group import ReplicaLinks

log = logging.getLogger("raypod.worker")


def state_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """This rank's local parameter shards then optimizer-state shards, in a fixed order.

    The order only depends on the recipe, so a rebuilt model and optimizer of the same
    world size and rank line up with a snapshot taken before.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out = [_local(p) for p in params]
    for p in params:
        st = optimizer.state.get(p, {})
        out.extend(_local(st[k]) for k in sorted(st) if isinstance(st[k], torch.Tensor))
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class Snapshot(list):
    """A snapshot's tensors, all views into one flat host buffer (``flat``, in :func:`to_bytes` layout).

    The replica exchange sends ``flat`` as it is instead of concatenating the tensors
    again, and when the snapshot is dropped its buffer goes back to a small pool that
    the next :func:`take` reuses, so a step's snapshot neither allocates (and faults in)
    fresh pages nor copies the shard twice.

    A snapshot of CUDA tensors is copied into pinned memory on a stream of its own, beside
    the next step's compute; reading it (iterating, indexing, ``flat``) first waits for
    that copy, and :func:`before_update` makes the next optimizer step wait for it on the GPU.
    """

    event: torch.cuda.Event | None = None
    _flat: torch.Tensor

    def wait(self) -> None:
        """Block until the copy to host memory is complete."""
        ev = self.event
        if ev is not None:
            ev.synchronize()
            self.event = None

    @property
    def flat(self) -> torch.Tensor:
        self.wait()
        return self._flat

    def __iter__(self):  # noqa: ANN204 - list's own signature
        self.wait()
        return super().__iter__()

    def __getitem__(self, i):  # noqa: ANN001, ANN204
        self.wait()
        return super().__getitem__(i)


KEEP_STEPS = 4
"""Own snapshots (and replicas per peer) a rank keeps: the driver's counted step plus the
``raypod.driver.ledger.STEPS_IN_FLIGHT`` (3) steps a rank may have finished beyond it, so a
recovery always finds the last counted step in memory (no counted step is lost)."""
_POOL: dict[int, list[torch.Tensor]] = {}
_POOL_LOCK = threading.Lock()
_POOL_MAX = 4
"""Free buffers kept per size (a rank keeps :data:`KEEP_STEPS` own snapshots and as many
replicas per peer; each step takes one of each and gives one of each back)."""


def _give_back(flat: torch.Tensor) -> None:
    with _POOL_LOCK:
        free = _POOL.setdefault((flat.numel(), flat.is_pinned()), [])
        if len(free) < _POOL_MAX:
            free.append(flat)


_ALLOC_S = [0.0]
"""Seconds spent allocating new buffers since :func:`pop_alloc_s` (a one-off, not a step's cost)."""


def _buffer(nbytes: int, pinned: bool = False, timed: bool = True) -> torch.Tensor:
    """A free buffer of the pool, else a new one (its time counted in :func:`pop_alloc_s`
    when ``timed``: the step's own snapshot, not the replica thread)."""
    with _POOL_LOCK:
        free = _POOL.get((nbytes, pinned))
        if free:
            return free.pop()
    t0 = time.perf_counter()
    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    if timed:
        _ALLOC_S[0] += time.perf_counter() - t0
    return buf


def pop_alloc_s() -> float:
    """Seconds the buffers allocated since the last call took (the pool then reuses them)."""
    spent, _ALLOC_S[0] = _ALLOC_S[0], 0.0
    return spent


_COPY_STREAMS: dict[int, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _COPY_STREAMS:
        _COPY_STREAMS[idx] = torch.cuda.Stream(device=idx)
    return _COPY_STREAMS[idx]


def take(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Copy the local shard to host memory (one flat buffer, see :class:`Snapshot`).

    CUDA tensors are copied asynchronously (pinned memory, a stream of its own); the
    returned snapshot waits for the copy when it is read.
    """
    src = [t.detach() for t in state_tensors(model, optimizer)]
    sizes = [t.numel() * t.element_size() for t in src]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))] if src else []
    if any(off % t.element_size() for off, t in zip(offsets, src, strict=True)):
        with torch.no_grad():  # mixed dtypes that do not align: one tensor each
            return [t.to("cpu", copy=True) for t in src]
    cuda = [t for t in src if t.is_cuda]
    flat = _buffer(sum(sizes), pinned=bool(cuda))
    snap = Snapshot()
    for t, off, n in zip(src, offsets, sizes, strict=True):
        snap.append(flat[off:off + n].view(t.dtype).reshape(t.shape))
    with torch.no_grad():
        host = [(d, t) for d, t in zip(snap, src, strict=True) if not t.is_cuda]
        for d, t in host:
            d.copy_(t)
        if cuda:
            stream = _copy_stream(cuda[0].device)
            stream.wait_stream(torch.cuda.current_stream(cuda[0].device))  # after the optimizer step
            with torch.cuda.stream(stream):
                dst = [list.__getitem__(snap, i) for i, t in enumerate(src) if t.is_cuda]
                torch._foreach_copy_(dst, cuda, non_blocking=True)
                snap.event = torch.cuda.Event()
                snap.event.record(stream)
    snap._flat = flat
    weakref.finalize(snap, _give_back, flat)
    return snap


def before_update(snap: list[torch.Tensor] | None) -> tuple[torch.cuda.Event, torch.cuda.Event] | None:
    """Make the current CUDA stream wait for ``snap``'s copy before the state changes.

    Returns timing events around the wait, for :func:`stall_s` once the step is done.
    """
    event = getattr(snap, "event", None)
    if event is None:
        return None
    stream = torch.cuda.current_stream()
    before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    before.record(stream)
    stream.wait_event(event)
    after.record(stream)
    return before, after


def stall_s(events: tuple[torch.cuda.Event, torch.cuda.Event] | None) -> float:
    """Seconds the GPU waited in :func:`before_update` (its stream must have got past it)."""
    if events is None:
        return 0.0
    before, after = events
    return before.elapsed_time(after) / 1e3


def _adam_state(optimizer: torch.optim.Optimizer) -> bool:
    """Create ``Adam``/``AdamW``'s state tensors as their first step would, uninitialised.

    Same keys, dtypes, devices and (DTensor) layouts as ``Adam._init_group`` makes for
    every parameter that takes gradients, so :func:`state_tensors` lines up with a
    snapshot; the snapshot then overwrites every value. False (nothing done) for any
    other optimizer or a setting this does not mirror.
    """
    from torch.optim.optimizer import _get_scalar_dtype

    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    groups = optimizer.param_groups
    if any(g.get("differentiable") or "amsgrad" not in g for g in groups):
        return False
    keep = torch.preserve_format
    for g in groups:
        on_device = bool(g.get("capturable") or g.get("fused"))
        for p in g["params"]:
            if not p.requires_grad:
                continue  # never gets a gradient, so never gets state
            st = {"step": (torch.zeros((), dtype=_get_scalar_dtype(is_fused=g.get("fused")), device=p.device)
                           if on_device else torch.tensor(0.0, dtype=_get_scalar_dtype(), device="cpu")),
                  "exp_avg": torch.empty_like(p, memory_format=keep),
                  "exp_avg_sq": torch.empty_like(p, memory_format=keep)}
            if g["amsgrad"]:
                st["max_exp_avg_sq"] = torch.empty_like(p, memory_format=keep)
            optimizer.state[p] = st
    return True


def init_state(optimizer: torch.optim.Optimizer) -> None:
    """Give a fresh optimizer the state tensors a snapshot is copied into (no-op if it has some).

    Adam and AdamW get them directly (:func:`_adam_state`); any other optimizer runs DCP's
    ``_init_optim_state`` (one optimizer step with zero gradients and learning rate).
    """
    if optimizer.state:
        return
    if not _adam_state(optimizer):
        from torch.distributed.checkpoint.state_dict import _init_optim_state

        _init_optim_state(optimizer)


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, snap: list[torch.Tensor]) -> None:
    """Copy a snapshot into a freshly built model and optimizer of the same layout."""
    init_state(optimizer)  # creates the state tensors to copy into
    dst = state_tensors(model, optimizer)
    if len(dst) != len(snap) or any(d.shape != s.shape for d, s in zip(dst, snap, strict=True)):
        raise RuntimeError("the snapshot does not match this rank's shard layout")
    with torch.no_grad():
        for d, s in zip(dst, snap, strict=True):
            d.copy_(s)


def to_bytes(snap: list[torch.Tensor]) -> torch.Tensor:
    """One flat uint8 buffer (what travels to the peer)."""
    if not snap:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in snap])


def from_bytes(buf: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Split a buffer made by :func:`to_bytes` into tensors shaped like ``like``.

    The tensors are views of ``buf`` (no copy): :func:`restore` copies them into place.
    """
    out, off = [], 0
    for t in like:
        n = t.numel() * t.element_size()
        piece = buf[off : off + n]
        if off % t.element_size():  # a view must be aligned to its element size
            piece = piece.clone()
        out.append(piece.view(t.dtype).reshape(t.shape))
        off += n
    if off != buf.numel():
        raise RuntimeError(f"replica holds {buf.numel()} bytes, this shard needs {off}")
    return out


class SnapshotStore:
    """This rank's own snapshots (the last ``keep`` steps) and the replicas it holds."""

    def __init__(self, keep: int = KEEP_STEPS) -> None:
        self.keep = keep
        self.own: dict[int, list[torch.Tensor]] = {}
        self.replicas: dict[int, dict[int, torch.Tensor]] = {}
        """source rank -> step -> bytes."""
        self.lock = threading.Lock()

    def add_own(self, step: int, snap: list[torch.Tensor]) -> None:
        with self.lock:
            self.own[step] = snap
            for s in sorted(self.own)[: -self.keep]:
                del self.own[s]

    def add_replica(self, src: int, step: int, buf: torch.Tensor) -> None:
        """Hold ``src``'s snapshot of ``step``; the oldest beyond ``keep`` goes back to the
        buffer pool, for the next exchange to receive into (no fresh pages to fault in).
        ``buf`` is a pool buffer (:meth:`PeerReplicator._exchange` receives into one).
        Replicas are read only while no exchange runs (a recovery, after the replicator
        closed), so an evicted buffer is never still in use."""
        with self.lock:
            held = self.replicas.setdefault(src, {})
            held[step] = buf
            for s in sorted(held)[: -self.keep]:
                _give_back(held.pop(s))

    def report(self) -> MemoryReport:
        """What the driver needs to plan a recovery."""
        with self.lock:
            return MemoryReport(own=sorted(self.own),
                                replicas={src: sorted(steps) for src, steps in self.replicas.items()})

    def clear_replicas(self) -> None:
        """Replicas are keyed by the ranks of a group; a new group starts afresh."""
        with self.lock:
            self.replicas.clear()


class PeerReplicator:
    """Sends each snapshot to ``peer_to`` and receives ``peer_from``'s, in a background thread.

    Every rank takes part in every round, in step order, so the point-to-point sends
    pair up; a new round waits for the previous one (backpressure, not skipped rounds).
    The driver learns when a step's replicas are in place (a step only counts once losing
    any one rank can no longer lose it) from :meth:`take_acked`, whose steps ride in the
    next step's result; :meth:`wait_round` is the fallback when no later result will come.
    """

    def __init__(self, group: ReplicaLinks | None, peer_to: int | None, peer_from: int | None,
                 on_round: Callable[[int], None] | None = None) -> None:
        self.group, self.peer_to, self.peer_from = group, peer_to, peer_from
        self.on_round = on_round
        """Called with the step in the exchange thread, once the round is under way (faults)."""
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="raypod-replica")
        self._last: Future | None = None
        self._rounds: dict[int, Future] = {}
        self._cv = threading.Condition()
        self._closed = False
        self._spent = 0.0
        self._acked: list[int] = []
        """Steps whose round completed since :meth:`take_acked` last ran."""

    @property
    def enabled(self) -> bool:
        return self.peer_to is not None and self.peer_from is not None

    def submit(self, step: int, snap: list[torch.Tensor], store: SnapshotStore) -> float:
        """Start replicating ``snap``; returns the seconds spent waiting for the previous round."""

        if not self.enabled:
            return 0.0
        t0 = time.perf_counter()
        while self._last is not None:
            if self._closed:  # abandoned (the driver interrupts a rank stuck here)
                raise RuntimeError(f"replica exchange abandoned before step {step}'s round")
            try:
                self._last.result(timeout=0.1)
                break
            except TimeoutError:
                continue
            except Exception as e:  # noqa: BLE001 - a lost peer shows up in training too
                log.warning("replica exchange failed: %s", e)
                break
        waited = time.perf_counter() - t0
        self._last = self._pool.submit(self._exchange, step, snap, store)
        with self._cv:
            self._rounds[step] = self._last
            for s in [s for s in self._rounds if s < step - 4]:
                del self._rounds[s]
            self._cv.notify_all()
        return waited

    def wait_round(self, step: int, timeout: float) -> bool:
        """Block until the exchange of ``step`` finished; False if it failed, was abandoned
        (:meth:`abort`) or did not finish within ``timeout`` seconds."""

        deadline = time.monotonic() + timeout
        with self._cv:
            while step not in self._rounds and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.5))
            fut = self._rounds.get(step)
        while fut is not None and not self._closed:
            try:
                fut.result(timeout=0.05)
                return True
            except TimeoutError:
                if time.monotonic() > deadline:
                    return False
            except Exception:  # noqa: BLE001 - the peer is gone; recovery follows
                return False
        return False

    def take_acked(self) -> list[int]:
        """The steps whose round completed successfully since the last call (and forget
        them); never blocks. A failed round is never acknowledged."""
        with self._cv:
            done, self._acked = self._acked, []
        return done

    def exchange_s(self) -> float:
        """Seconds the exchanges finished since the last call took (and forget them)."""
        with self._cv:
            spent, self._spent = self._spent, 0.0
        return spent

    def _exchange(self, step: int, snap: list[torch.Tensor], store: SnapshotStore) -> None:

        t0 = time.perf_counter()
        # A Snapshot is sent as it is (no second copy), once its copy to host is complete.
        buf = snap.flat if isinstance(snap, Snapshot) else to_bytes(snap)
        g, to, frm = self.group, self.peer_to, self.peer_from
        size = torch.tensor([buf.numel()], dtype=torch.int64)
        rsize = torch.zeros(1, dtype=torch.int64)
        for w in (g.isend(size, to), g.irecv(rsize, frm)):
            w.wait()
        if self.on_round is not None:
            self.on_round(step)
        rbuf = _buffer(int(rsize.item()), timed=False)
        for w in (g.isend(buf, to), g.irecv(rbuf, frm)):
            w.wait()
        store.add_replica(frm, step, rbuf)
        with self._cv:
            self._spent += time.perf_counter() - t0
            self._acked.append(step)

    def abort(self) -> None:
        """Release every :meth:`wait_round` caller at once (the rank's step failed)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def close(self) -> None:
        """Stop after the round in flight (a broken group makes it fail fast)."""
        self.abort()
        self._pool.shutdown(wait=False, cancel_futures=True)
