"""One owner per job: a lease in the job's folder that its driver renews.

A job is ``<checkpoint.storage>/<name>``; two drivers of it would both commit
checkpoints, write ``summary.json`` and log to the one MLflow run. Before writing
anything for the job, the driver takes its lease, a small JSON file under
``<job_dir>/lease/``, and a background thread renews it every ``ttl / 4`` seconds. A
second driver is refused in one sentence naming the owner (:class:`JobOwned`).

A lease is taken over when its owner is gone:

- at once, when the owner ran on this machine (same host name, boot id and pid
  namespace) and its process no longer exists (or the pid now belongs to a process
  started at another time);
- otherwise once the lease has not been renewed for its ``ttl_s``
  (``fault.lease_ttl_s``). This compares the owner's wall clock with ours: hosts'
  clocks must agree to well within the TTL (NTP does that). A driver that finds a
  lease whose owner already missed renewals waits for it to expire rather than
  refusing.

Generations make take-overs safe: the lease of generation ``g`` is the file
``lease/<g>.json``; only its owner rewrites it (renewals), and a take-over creates
``lease/<g + 1>.json``. Creating a generation is exclusive: on local (and NFS) paths
the file is written aside and hard-linked into place, which fails when the name
exists. Object stores (s3, gs) have no exclusive create through fsspec, so there a
contender checks the name is free, writes it with a random nonce, waits
``settle_s`` and reads it back: the last writer's nonce wins and every other
contender sees it is not theirs. The residual race: a writer delayed by more than
``settle_s`` between its check and its write can overwrite a lease already read
back by the winner; both then believe they own the job until the next renewal, when
the owner whose nonce is gone sees it and stops (at most ``ttl / 4`` seconds of two
writers, only for two drivers started within a second of each other).

The owner's renewal checks that its file still holds its nonce and that no newer
generation exists; otherwise the lease was lost (the driver was frozen past the TTL
and another driver took over) and :attr:`JobLease.lost` says why. So does a renewal
that failed for longer than the TTL. The driver then stops without writing anything
more for the job.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from raypod.config import ConfigError
from raypod.storage import get_fs, join_uri, read_json, write_json_atomic

log = logging.getLogger("raypod.lease")

LEASE_DIR = "lease"
_GEN = re.compile(r"^(\d{6,})\.json$")


class JobOwned(ConfigError):
    """Another live driver owns the job; the message names it (one sentence)."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _start_time(pid: int) -> float | None:
    """The process's start time, or None when there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.Error:
        return -1.0  # exists, but we may not look at it: alive


def _utc(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe_owner(lease: dict[str, Any], now: float | None = None) -> str:
    """``driver pid 1234 on host h since ... (lease renewed 2 s ago)``."""
    now = time.time() if now is None else now
    since = lease.get("since")
    renewed = lease.get("renewed")
    out = f"driver pid {lease.get('pid', '?')} on host {lease.get('host', '?')}"
    if isinstance(since, (int, float)):
        out += f" since {_utc(since)}"
    if isinstance(renewed, (int, float)):
        out += f" (lease renewed {max(0.0, now - renewed):.0f} s ago)"
    return out


class JobLease:
    """The lease of one job folder.

    Args:
        job_dir: ``<checkpoint.storage>/<name>`` (local path or URI).
        name: the job's name, for messages.
        ttl_s: how long the lease lasts without renewal (``fault.lease_ttl_s``).
        settle_s: object stores only: the wait between writing a new generation and
            reading it back.
    """

    def __init__(self, job_dir: str, name: str, ttl_s: float = 30.0, settle_s: float = 1.0) -> None:
        self.job_dir = job_dir
        self.name = name
        self.ttl_s = float(ttl_s)
        self.renew_s = max(0.2, self.ttl_s / 4)
        self.settle_s = settle_s
        self.dir = join_uri(job_dir, LEASE_DIR)
        self.fs, self._dir_path = get_fs(self.dir)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.nonce = uuid.uuid4().hex
        self.generation: int | None = None
        self.record: dict[str, Any] = {}
        self.took_over: str | None = None
        """Why an earlier owner's lease was taken over, if it was."""
        self._lost: str | None = None
        self._confirmed = 0.0  # time.monotonic() of the last renewal that saw the lease ours
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- paths ---------------------------------------------------------------------
    def _uri(self, gen: int) -> str:
        return join_uri(self.dir, f"{gen:06d}.json")

    def _generations(self) -> list[int]:
        try:
            self.fs.invalidate_cache(self._dir_path)  # s3fs / gcsfs cache listings
            names = self.fs.ls(self._dir_path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        gens = []
        for n in names:
            m = _GEN.match(str(n).rstrip("/").rsplit("/", 1)[-1])
            if m:
                gens.append(int(m.group(1)))
        return sorted(gens)

    # ---- taking it -----------------------------------------------------------------
    def acquire(self, wait_s: float | None = None) -> JobLease:
        """Take the lease, taking over a dead owner's; start renewing it.

        Args:
            wait_s: the longest wait for the lease of an owner that already missed its
                renewals to expire (default: that lease's TTL).

        Raises:
            JobOwned: a live driver owns the job.
        """
        waited_until: float | None = None
        while True:
            gens = self._generations()
            top = gens[-1] if gens else 0
            current: dict[str, Any] = {}
            stale: str | None = None
            if top:
                got = self._read(top)
                if got is not None:
                    current = got
                    stale = self._stale(current)
                elif self._unreadable_expired(top):
                    stale = "its lease file is unreadable and older than the TTL"
                # else: unreadable but recent: judged like an owner that missed its renewals
            if top == 0 or stale is not None:
                if self._create(top + 1):
                    if stale is not None:
                        self.took_over = f"{describe_owner(current)}: {stale}"
                        log.warning("job '%s': took over the lease of %s", self.name, self.took_over)
                    for g in gens:
                        self._delete(g)
                    self._start()
                    return self
                continue  # another driver won this generation: look again
            # Alive as far as we can tell. An owner that already missed renewals is
            # probably gone: wait for its lease to expire rather than refuse.
            age = time.time() - float(current.get("renewed", 0) or 0)
            ttl = float(current.get("ttl_s", self.ttl_s) or self.ttl_s)
            missed = age > 2 * max(0.2, ttl / 4) + 1.0
            if missed:
                if waited_until is None:
                    waited_until = time.monotonic() + (ttl if wait_s is None else wait_s) + 1.0
                    log.warning("job '%s' is owned by %s, which missed its renewals; waiting up "
                                "to %.0f s for the lease to expire", self.name, describe_owner(current),
                                max(0.0, ttl - age))
                if time.monotonic() < waited_until:
                    time.sleep(min(1.0, max(0.1, ttl / 8)))
                    continue
            raise JobOwned(
                f"job '{self.name}' is already running: owned by {describe_owner(current)}; stop it "
                f"or wait for its lease to expire (fault.lease_ttl_s={ttl:g}, lease files in {self.dir})")

    def _stale(self, lease: dict[str, Any]) -> str | None:
        """Why ``lease``'s owner is gone, or None when it may be alive."""
        pid = lease.get("pid")
        if (lease.get("host") == socket.gethostname() and lease.get("boot_id") == _boot_id()
                and lease.get("pid_ns") == _pid_ns() and isinstance(pid, int)):
            started = _start_time(pid)
            if started is None:
                return "that process no longer exists"
            want = lease.get("pid_start")
            if started >= 0 and isinstance(want, (int, float)) and abs(started - want) > 1.0:
                return "that pid now belongs to another process"
        renewed = lease.get("renewed")
        ttl = float(lease.get("ttl_s", self.ttl_s) or self.ttl_s)
        if not isinstance(renewed, (int, float)):
            return "its lease has no renewal time"
        age = time.time() - renewed
        if age > ttl:
            return f"its lease expired {age - ttl:.0f} s ago (not renewed for {age:.0f} s, TTL {ttl:g} s)"
        return None

    def _unreadable_expired(self, gen: int) -> bool:
        try:
            info = self.fs.info(self._uri_path(gen))
        except FileNotFoundError:
            return True
        mtime = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("created")
        if isinstance(mtime, _dt.datetime):
            mtime = mtime.timestamp()
        try:
            return time.time() - float(mtime) > self.ttl_s
        except (TypeError, ValueError):
            return False

    def _uri_path(self, gen: int) -> str:
        return get_fs(self._uri(gen))[1]

    def _fresh_record(self, gen: int) -> dict[str, Any]:
        now = time.time()
        pid = os.getpid()
        return {"job": self.name, "generation": gen, "nonce": self.nonce, "host": socket.gethostname(),
                "pid": pid, "pid_start": _start_time(pid), "boot_id": _boot_id(), "pid_ns": _pid_ns(),
                "since": now, "renewed": now, "ttl_s": self.ttl_s}

    def _create(self, gen: int) -> bool:
        """Create generation ``gen`` exclusively; False when another driver has it."""
        record = self._fresh_record(gen)
        data = json.dumps(record, indent=2).encode()
        path = self._uri_path(gen)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{self.nonce}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # atomic and exclusive: fails when the name exists
            except FileExistsError:
                return False
            except OSError as e:  # a filesystem without hard links: O_EXCL, then write
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
                    raise
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            finally:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        else:
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, data)
            time.sleep(self.settle_s)
            back = self._read(gen)
            if not back or back.get("nonce") != self.nonce:
                return False
        with self._lock:
            self.generation, self.record = gen, record
            self._confirmed = time.monotonic()
        return True

    def _read(self, gen: int) -> dict[str, Any] | None:
        got = read_json(self._uri(gen))
        return got if isinstance(got, dict) else None

    def _delete(self, gen: int) -> None:
        try:
            self.fs.rm(self._uri_path(gen))
        except (FileNotFoundError, OSError):
            pass

    # ---- keeping it ----------------------------------------------------------------
    def _start(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="raypod-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_s):
            self.renew()
            if self._lost is not None:
                return

    def renew(self) -> bool:
        """Check the lease is still ours and push its expiry; False once it is lost."""
        with self._lock:
            if self._lost is not None or self.generation is None:
                return self._lost is None
            gen = self.generation
            try:
                newer = [g for g in self._generations() if g > gen]
                mine = self._read(gen)
                if newer:
                    owner = self._read(newer[-1]) or {}
                    self._lose(f"another driver took it over: {describe_owner(owner)}")
                elif mine is None or mine.get("nonce") != self.nonce:
                    self._lose("its lease file was replaced or removed"
                               + (f" by {describe_owner(mine)}" if mine else ""))
                else:
                    self.record = dict(self.record, renewed=time.time())
                    write_json_atomic(self._uri(gen), self.record)
                    self._confirmed = time.monotonic()
            except Exception as e:  # noqa: BLE001 - storage trouble: retried; lost after the TTL
                log.warning("job '%s': renewing the lease failed: %s: %s", self.name, type(e).__name__, e)
            if self._lost is None and time.monotonic() - self._confirmed > self.ttl_s - self.renew_s / 2:
                self._lose(f"it could not be renewed for {time.monotonic() - self._confirmed:.0f} s "
                           f"(fault.lease_ttl_s={self.ttl_s:g})")
            return self._lost is None

    def _lose(self, why: str) -> None:
        self._lost = f"job '{self.name}' lost its lease in {self.dir}: {why}; this driver stops"
        log.error("%s", self._lost)

    @property
    def lost(self) -> str | None:
        """One sentence when the lease is no longer ours, else None."""
        return self._lost

    def held(self) -> bool:
        """Whether the lease is still ours; checks storage when the last renewal is not recent
        (after the process was frozen, before the renewal thread woke up)."""
        if self._lost is not None:
            return False
        if time.monotonic() - self._confirmed > self.renew_s * 1.5:
            return self.renew()
        return True

    def release(self) -> None:
        """Stop renewing and delete the lease, if it is still ours."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            gen, self.generation = self.generation, None
            if gen is None or self._lost is not None:
                return
            try:
                mine = self._read(gen)
                if mine is not None and mine.get("nonce") == self.nonce:
                    self._delete(gen)
            except Exception as e:  # noqa: BLE001 - the next driver takes over a dead pid's lease
                log.warning("job '%s': could not release the lease: %s", self.name, e)

    def __enter__(self) -> JobLease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
