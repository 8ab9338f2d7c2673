"""A rank's process groups, as one session that can be aborted while a collective runs.

:class:`GroupSession` is the only place where a rank creates, aborts and drops its
process groups: the training group (the default group and the device mesh built on it),
the checkpoint group and the replica links (:class:`ReplicaLinks`: a two-rank group with
each of the rank's two replica peers). The :class:`~raypod.worker.trainer.Trainer`
only builds and steps the model on them.

Why an abort of its own: when a rank is lost, its peers are blocked inside whatever
collective they were in (an FSDP all-gather or reduce-scatter mid-step, the optimizer,
the start-of-step sync, a replica round, a checkpoint write). The driver then calls
:meth:`GroupSession.abort` on every survivor, from a thread of the actor's own, and the
blocked call fails within milliseconds; the process, its data and its in-memory
snapshots stay, and the rank joins the next group (:meth:`configure` again).

- **NCCL**: communicators are non-blocking (``TORCH_NCCL_USE_COMM_NONBLOCKING``) so that
  ``ncclCommAbort`` returns while a kernel waits on a dead peer, and the watchdog only
  cleans up (``TORCH_NCCL_ASYNC_ERROR_HANDLING=2``): it never tears a survivor's process
  down. :meth:`abort` calls ``ProcessGroup.abort`` on every group, as torchft's
  ``ProcessGroupNCCL.abort`` and NVIDIA's in-process restart do. A step that ran while its
  communicators were aborted never reports a result (:meth:`errored`).
- **gloo** has no abort that releases a rank once FSDP2 has used the group: its waiting
  thread sleeps on a condition only a socket event wakes. The session notes the TCP
  connections gloo opened while it built the groups (socket inodes, so a reused file
  descriptor is never touched) and :meth:`abort` shuts them down: the rank's own pending
  operations fail at once ("Connection closed"), and so do its peers' reads from it, which
  is how one abort releases a whole ring. Listening sockets are left alone (gloo's
  listener thread ends the process on an error there). Measured: a rank blocked in an
  FSDP2 all-gather is released 2–6 ms after :meth:`abort`; the process then destroys the
  group and trains in a new one.
- **The checkpoint group forms off the recovery path.** It is the second world-wide group
  (gloo's full mesh: N - 1 connections per rank, every rank reading every other's address
  from the store), and nothing before a persistent save needs it. :meth:`configure` forms
  the training group and the replica links only; the trainer starts the checkpoint group
  in a thread of its own once the rank has trained its first step in the new group
  (:meth:`start_checkpoint_group`), so it forms while the ranks train, and a save waits for
  it (:meth:`checkpoint_group`). Its connections join those an abort shuts down once it has
  formed; an abort while it forms shuts the connections it opened so far and this rank's
  store connection (the thread may be waiting in the store for a peer that never comes),
  and :meth:`leave` aborts a formation still running before it drops the groups.
- **The rendezvous store outlives the groups.** A rank keeps its connection to the store
  from one group to the next (each group under a prefix of its own), so a re-formation
  opens no store connection on the ranks that stay. An abort of formed groups leaves the
  store's connections alone; an abort during the rendezvous also shuts this rank's own
  store connection (a rank waiting in the store for a peer that never joins), and the
  worker connects again for the next group.

``fault.pg_timeout_s`` still bounds what no abort reaches: a collective left waiting when
the driver itself is gone, and the rendezvous store's waits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger("raypod.worker")

NCCL_ENV = {
    "TORCH_NCCL_USE_COMM_NONBLOCKING": "1",  # ncclCommAbort can end a collective in progress
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",  # on an error or timeout: abort the communicators, keep the process
    "TORCH_NCCL_ENABLE_MONITORING": "0",  # no heartbeat monitor that SIGABRTs a rank whose watchdog waits
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "0",
}
"""The NCCL settings under which an abort releases a survivor and nothing ever kills it."""


def _set_env(values: dict[str, str], why: str) -> dict[str, str]:
    """Set ``values`` in this process's environment; returns the values replaced (warned
    about, with ``why``)."""
    replaced = {k: os.environ[k] for k, v in values.items() if os.environ.get(k, v) != v}
    if replaced:
        log.warning("replacing %s: %s", ", ".join(f"{k}={v}" for k, v in replaced.items()), why)
    os.environ.update(values)
    return replaced


def nccl_env() -> dict[str, str]:
    """Set :data:`NCCL_ENV` in this process (before its first NCCL group); returns the values
    replaced (a cluster's own ``TORCH_NCCL_*`` that would kill survivors)."""
    return _set_env(NCCL_ENV, "raypod aborts communicators itself and keeps survivors alive")


GLOO_ENV = {
    # A rank's rendezvous key holds its address, not also one pair number per peer (8N
    # bytes): every rank reads every peer's key, so 8N^2 bytes a rank (800 MB at 10,000).
    "GLOO_ENABLE_RANK_AS_SEQUENCE_NUMBER": "1",
    # Those keys read 128 to a store request (multi_get), not one round trip each.
    "GLOO_ENABLE_STORE_V2_API": "1",
}
"""gloo's rendezvous settings (every rank of a group needs the same): measured with
``benchmarks/gloo_formation_probe.py 64 links``, formation 0.53-0.87 s instead of 1.2-1.4 s,
the store's host 29-45 ms of CPU instead of 350-370 ms (BENCHMARKS.md, Scale)."""


def gloo_env() -> dict[str, str]:
    """Set :data:`GLOO_ENV` in this process (before its first gloo group); returns the values
    replaced."""
    return _set_env(GLOO_ENV, "every rank of a raypod group forms it with "
                    + ", ".join(f"{k}={v}" for k, v in GLOO_ENV.items()))


def _sockets() -> dict[int, str]:
    """This process's open sockets: ``fd -> "socket:[inode]"``."""
    out: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:"):
            out[int(name)] = link
    return out


@contextlib.contextmanager
def _borrowed(fd: int) -> Iterator[socket.socket | None]:
    """A socket object over ``fd`` that leaves the fd open (its owner closes it); None when
    ``fd`` is no socket any more."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        yield None
        return
    try:
        yield sock
    finally:
        sock.detach()


def _ports(sock: socket.socket) -> tuple[int, int]:
    """``(local port, remote port)`` of a connected TCP socket; ``(0, 0)`` when it is not."""
    try:
        return sock.getsockname()[1], sock.getpeername()[1]
    except OSError:
        return 0, 0


def _store_clients(port: int) -> dict[int, str]:
    """This process's TCP connections to a rendezvous store listening on ``port``."""
    out: dict[int, str] = {}
    for fd, link in _sockets().items():
        with _borrowed(fd) as sock:
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) and _ports(sock)[1] == port:
                out[fd] = link
    return out


def _shutdown(fds: dict[int, str], store_port: int | None = None, release_store: bool = False) -> int:
    """Shut down the TCP connections among ``fds`` that are still the same sockets (same
    inode); listening sockets are skipped, and so is rendezvous-store traffic on
    ``store_port`` (the store outlives the group: its master's side of other ranks'
    connections always, this rank's own connection unless ``release_store``). Returns how
    many were shut down."""
    now, done = _sockets(), 0
    for fd, link in fds.items():
        if now.get(fd) != link:
            continue  # closed (gloo drops a pair after its error), or the fd was reused
        with _borrowed(fd) as sock:  # the fd stays gloo's, which closes it
            if sock is None:
                continue
            try:
                if (sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
                        and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
                    local, remote = _ports(sock) if store_port else (0, 0)
                    if store_port and (local == store_port or (remote == store_port and not release_store)):
                        continue
                    sock.shutdown(socket.SHUT_RDWR)
                    done += 1
            except OSError:
                pass  # not connected any more
    return done


def _port_of(store: Any) -> int | None:
    """The listening port of the TCP store behind ``store`` (through any ``PrefixStore``)."""
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return getattr(store, "port", None)


class ReplicaLinks:
    """The replica exchange's links: a two-rank gloo group with each of this rank's peers
    (the rank its snapshots go to and the one whose snapshots it keeps), not a group of the
    whole world.

    The exchange is point-to-point with those two ranks only, so a world-wide group formed a
    full mesh of connections (N - 1 per rank) for two of them: with the links a rank holds
    2N + 2 sockets instead of 3N (``benchmarks/gloo_formation_probe.py``). A link forms
    through the group's store under a prefix of its own (the two ranks, lower first), and only
    while both of its ranks are at it, so a rank forms its links in the order the driver gives
    (``first``: :func:`raypod.driver.topology.link_first`), which lets every link of the ring
    form in at most three rounds. (Not in two threads at once: both would share the rank's one
    store connection, whose client holds its lock while it waits for a key, and a ring of such
    waits never ends.) They are created inside :meth:`GroupSession.configure`, so their
    sockets are among those an abort shuts down.
    """

    def __init__(self, store: Any, rank: int, peers: tuple[int | None, int | None],
                 timeout: timedelta, first: int | None = None) -> None:
        self.rank = rank
        wanted = sorted({p for p in peers if p is not None and p != rank}, key=lambda p: p != first)
        self._links: dict[int, tuple[Any, int]] = {}
        """``peer -> (two-rank group, the peer's rank in it)``."""
        for peer in wanted:
            lo, hi = min(rank, peer), max(rank, peer)
            pg = dist.ProcessGroupGloo(dist.PrefixStore(f"raypod-replica/{lo}-{hi}", store),
                                       0 if rank == lo else 1, 2, timeout)
            self._links[peer] = (pg, 0 if peer < rank else 1)

    def _link(self, peer: int) -> tuple[Any, int]:
        try:
            return self._links[peer]
        except KeyError:
            raise ValueError(f"rank {self.rank} has no replica link to rank {peer}") from None

    def isend(self, tensor: torch.Tensor, dst: int) -> Any:
        """Send ``tensor`` to peer ``dst`` (a global rank); returns the work to wait on."""
        pg, at = self._link(dst)
        return pg.send([tensor], at, 0)

    def irecv(self, tensor: torch.Tensor, src: int) -> Any:
        """Receive into ``tensor`` from peer ``src`` (a global rank); returns the work to wait on."""
        pg, at = self._link(src)
        return pg.recv([tensor], at, 0)


class GroupSession:
    """The process groups of one rank in one group attempt; abortable from any thread.

    Args:
        device: the rank's device (NCCL for the training group on CUDA, gloo on CPU).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rank, self.world_size = -1, 0
        self.mesh: DeviceMesh | None = None
        self.ckpt: dist.ProcessGroup | None = None
        """Checkpoint writes (gloo), apart from the training collectives; formed in the
        background (:meth:`start_checkpoint_group`), None until it has formed."""
        self._ckpt_thread: threading.Thread | None = None
        self._ckpt_done = threading.Event()
        self._ckpt_error: str | None = None
        self._ckpt_before: dict[int, str] | None = None
        """This process's sockets when the checkpoint group started forming (None when it is
        not forming)."""
        self._timeout = timedelta(minutes=30)
        self.store_lost = False
        """An abort shut this rank's store connection (it was waiting in the store): the next
        group connects to the store anew."""
        self.replica: ReplicaLinks | None = None
        """The replica exchange's links to this rank's two peers (gloo), apart from the
        training collectives."""
        self._lock = threading.Lock()
        self._before: dict[int, str] | None = None
        self._opened: dict[int, str] = {}
        self._error: str | None = None
        self.store_port: int | None = None
        """The port of the rendezvous store the groups were formed through: a store that
        outlives the groups (the worker keeps its connection from one group to the next), so
        an abort of formed groups leaves its traffic alone."""
        self.phases: dict[str, float] = {}
        """Seconds each part of the last :meth:`configure` took (``store``, ``world``,
        ``replica``, ``mesh``): where a slow rendezvous goes; ``ckpt`` once the checkpoint
        group has formed in the background."""

    @property
    def backend(self) -> str:
        return "cpu:gloo,cuda:nccl" if self.device.type == "cuda" else "gloo"

    def configure(self, store: Any | Callable[[], Any], rank: int, world_size: int, timeout_s: float,
                  make_mesh: Callable[[int], DeviceMesh],
                  peers: tuple[int | None, int | None] = (None, None),
                  link_first: int | None = None) -> DeviceMesh:
        """Form this rank's groups: ``rank`` of ``world_size`` through ``store`` (or a callable
        that connects to it, so that an abort during the rendezvous reaches its socket too).

        ``make_mesh(world_size)`` builds the training mesh on the new default group;
        ``peers`` (``(peer_to, peer_from)``) are the ranks the replica exchange links to, the
        link to ``link_first`` formed first (:class:`ReplicaLinks`).

        Raises:
            RuntimeError: :meth:`abort` was called while the groups were being formed.
        """
        with self._lock:
            self.rank, self.world_size, self._error = rank, world_size, None
            self._before, self._opened = _sockets(), {}
            self._ckpt_thread, self._ckpt_error, self._ckpt_before = None, None, None
            self._ckpt_done = threading.Event()
        gloo_env()  # the checkpoint group and the replica links are gloo on every device
        if self.device.type == "cuda":
            nccl_env()
        timeout = self._timeout = timedelta(seconds=timeout_s)
        marks = [time.perf_counter()]
        store = store() if callable(store) else store
        self.store_port, self.store_lost = _port_of(store), False
        marks.append(time.perf_counter())
        extra = {"device_id": self.device} if self.device.type == "cuda" else {}
        dist.init_process_group(self.backend, store=store, rank=rank, world_size=world_size,
                                timeout=timeout, **extra)
        marks.append(time.perf_counter())
        self.replica = ReplicaLinks(store, rank, peers, timeout, link_first)
        marks.append(time.perf_counter())
        self.mesh = make_mesh(world_size)
        marks.append(time.perf_counter())
        names = ("store", "world", "replica", "mesh")
        self.phases = {k: b - a for k, a, b in zip(names, marks, marks[1:], strict=False)}
        with self._lock:
            self._opened = self._new_sockets()
            self._before = None
            if self._error is not None:
                raise RuntimeError(f"rank {rank}: the group was aborted while it formed ({self._error})")
        return self.mesh

    def _new_sockets(self, before: dict[int, str] | None = None) -> dict[int, str]:
        before = (self._before or {}) if before is None else before
        return {fd: link for fd, link in _sockets().items() if before.get(fd) != link}

    def start_checkpoint_group(self) -> None:
        """Start forming the checkpoint group in a thread of its own (once per group; every
        rank of the group starts it, the trainer after its first step in the group)."""
        with self._lock:
            if (self._ckpt_thread is not None or self._error is not None or self._before is not None
                    or not dist.is_initialized()):
                return
            self._ckpt_before = _sockets()
            self._ckpt_thread = threading.Thread(target=self._form_checkpoint_group, daemon=True,
                                                 name=f"raypod-ckpt-group-{self.rank}")
            self._ckpt_thread.start()

    def _form_checkpoint_group(self) -> None:
        t0 = time.perf_counter()
        pg, error = None, None
        try:
            # The store is this rank's one connection: nothing else uses it while the rank
            # trains (the next configure comes after leave, which ends this thread first).
            pg = dist.new_group(backend="gloo", timeout=self._timeout)
        except Exception as e:  # noqa: BLE001 - reported by the save that needs it
            error = f"{type(e).__name__}: {e}"
        with self._lock:
            before, self._ckpt_before = self._ckpt_before, None
            if self._error is not None:  # aborted while it formed: its sockets are shut already
                error = error or f"aborted while it formed ({self._error})"
            elif pg is not None and before is not None:
                self._opened.update(self._new_sockets(before))
                self.ckpt = pg
                self.phases["ckpt"] = time.perf_counter() - t0
            self._ckpt_error = error
            self._ckpt_done.set()
        if error is not None:
            log.info("[rank %d] the checkpoint group did not form: %s", self.rank, error)

    def checkpoint_group(self) -> dist.ProcessGroup:
        """The checkpoint group, once formed (started now if it was not; waits up to the
        group's timeout).

        Raises:
            RuntimeError: it did not form (aborted, or a peer never joined).
        """
        self.start_checkpoint_group()
        if not self._ckpt_done.wait(self._timeout.total_seconds()):
            raise RuntimeError(f"rank {self.rank}: the checkpoint group did not form in "
                               f"{self._timeout.total_seconds():.0f} s (fault.pg_timeout_s)")
        if self.ckpt is None:
            raise RuntimeError(f"rank {self.rank}: the checkpoint group did not form "
                               f"({self._ckpt_error or self._error or 'no group'})")
        return self.ckpt

    def errored(self) -> str | None:
        """Why this rank's groups were aborted (None while they are usable)."""
        return self._error

    def abort(self, reason: str = "aborted by the driver") -> bool:
        """Release every collective this rank is blocked in, on every group (any thread).

        The groups are unusable afterwards; :meth:`leave` drops them. Returns False when
        there was nothing to abort (no groups, or aborted already).
        """
        with self._lock:
            if self._error is not None or (not dist.is_initialized() and self._before is None):
                return False
            self._error = reason
            forming = self._before is not None or self._ckpt_before is not None
            opened = self._new_sockets() if self._before is not None else dict(self._opened)
            if self._ckpt_before is not None:  # the checkpoint group forming in the background
                opened.update(self._new_sockets(self._ckpt_before))
            if forming and self.store_port:  # a rank waiting in the store for a peer that never joins
                opened.update(_store_clients(self.store_port))
                self.store_lost = True
        if self.device.type == "cuda" and dist.is_initialized():
            for pg in self._groups():
                try:
                    pg.abort()  # ncclCommAbort of its communicators (non-blocking: returns at once)
                except Exception as e:  # noqa: BLE001 - a backend without abort: its sockets below
                    log.info("[rank %d] abort of a %s group: %s", self.rank, pg.name(), e)
        closed = _shutdown(opened, self.store_port, release_store=forming)
        log.info("[rank %d] process groups aborted (%s): %d connections shut down%s", self.rank, reason,
                 closed, " during the rendezvous" if forming else "")
        return True

    def _groups(self) -> list[dist.ProcessGroup]:
        """The groups this process created, sub-groups (mesh, checkpoint, replica) first."""
        world = dist.group.WORLD
        subs = [pg for pg in list(dist.distributed_c10d._world.pg_map) if pg is not world]
        return subs + ([world] if world is not None else [])

    def leave(self) -> None:
        """Drop the groups (aborted or not); the process stays, ready to :meth:`configure` again.
        A checkpoint group still forming is aborted first (the group is being left)."""
        thread = self._ckpt_thread
        if thread is not None and thread.is_alive():
            self.abort("left while the checkpoint group formed")
            thread.join(timeout=self._timeout.total_seconds())
            if thread.is_alive():
                log.warning("[rank %d] the checkpoint group's formation did not end after its abort",
                            self.rank)
        self.mesh = self.ckpt = self.replica = None
        self._opened = {}
        if not dist.is_initialized():
            return
        try:
            if self._error is not None and self.device.type == "cuda":
                dist.distributed_c10d._abort_process_group()  # a clean destroy would wait on the dead peer
            else:
                dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - a broken group is why we leave
            log.info("[rank %d] leaving a broken process group: %s", self.rank, e)
