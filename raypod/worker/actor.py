"""The Ray actor that hosts one rank: a thin remote shell around :class:`Trainer`.

The actor process imports torch as soon as it starts, so actors created early are
warm by the time the driver hands them a rank.

Health: :meth:`TrainWorker.heartbeat` runs in a concurrency group of its own, so the
driver can ask a rank where it is while its training step runs (or hangs). SIGTERM
(a preempted or drained node) does not end the process: the rank notes it, keeps
training, and says so in its results and heartbeats; the driver then hands its work
to a replacement with no lost steps and ends it. A second SIGTERM ends it at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import ray

from raypod.protocol import GroupSpec, Heartbeat, Interrupted, MemoryReport, Phase, StepResult

log = logging.getLogger("raypod.worker")


REGROUP_METHODS = ("reconfigure", "reload", "reshape")
"""The calls that re-form a rank's group; the ones :meth:`TrainWorker.join_as` runs."""


class TrainWorker:
    """One rank of the job, in its own process (see :func:`remote_worker_class`)."""

    def __init__(self, num_threads: int) -> None:
        import torch  # the expensive import happens while the driver does other work

        torch.set_num_threads(max(1, num_threads))
        # With its level, so that the driver's console shows warnings and keeps the rest in
        # driver.log (raypod.console).
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.trainer = None
        self.preempted_at: float | None = None
        self.closed = False
        self._client: tuple[str, Any] | None = None
        """``(host:port, connection)``: this actor's connection to the job's rendezvous store."""
        self._grants: Any = None
        """The reader of this rank's step grants (:class:`raypod.worker.grants.StepGrants`)."""
        self._ray_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._joined: tuple[str, dict[str, Any]] | None = None
        """``(init_method, result)`` of the last group this rank joined in a regroup: the same
        regroup's call arriving twice (through its node agent and directly, when the agent
        answered the driver late) is answered once."""

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        holds_rank = self.trainer is not None and self.trainer.rank >= 0 and not self.closed
        if (self.preempted_at is not None or not holds_rank) and callable(self._ray_sigterm):
            # The second one, or nothing to hand over (a spare, a closed rank at the end
            # of the job, when Ray shuts its workers down): leave now.
            self._ray_sigterm(signum, frame)
            return
        self.preempted_at = time.time()
        log.warning("[rank %s] SIGTERM: this rank hands its state over, then leaves "
                    "(a second SIGTERM ends it at once)",
                    self.trainer.rank if self.trainer else "-")

    @ray.method(concurrency_group="health")
    def heartbeat(self) -> Heartbeat:
        """Where this rank is (answered even while a step runs or hangs)."""
        t = self.trainer
        step, phase, since = t.where if t is not None else (0, Phase.DONE, time.monotonic())
        return Heartbeat(rank=t.rank if t is not None else -1, step=step, phase=phase,
                         in_phase_s=time.monotonic() - since, preempted=self.preempted_at is not None,
                         pid=os.getpid(), progress=t.progress if t is not None else 0)

    @ray.method(concurrency_group="health")
    def interrupt(self, attempt: int | None = None) -> Interrupted:
        """Release a step call stuck after a failure elsewhere (see ``Trainer.interrupt``)."""
        return self.trainer.interrupt(attempt) if self.trainer is not None else Interrupted(rank=-1)

    def node_info(self) -> dict[str, Any]:
        """Where this actor runs."""
        ctx = ray.get_runtime_context()
        return {
            "node_id": ctx.get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "gpu_ids": ray.get_gpu_ids(),
        }

    def _store_for(self, init_method: str, world_size: int, timeout_s: float) -> Any:
        """The store of the group at ``tcp://host:port/prefix`` (the job's rendezvous store,
        :mod:`raypod.worker.rendezvous`): this actor's connection to ``host:port``, kept from
        earlier groups or made now, under the group's ``prefix``."""
        from datetime import timedelta

        import torch.distributed as dist

        address, _, prefix = init_method.removeprefix("tcp://").partition("/")
        host, port = address.rsplit(":", 1)
        kept = self._client
        if kept is None or kept[0] != address:
            kept = (address, dist.TCPStore(host, int(port), world_size, is_master=False,
                                           timeout=timedelta(seconds=timeout_s)))
            self._client = kept  # a connection to an earlier store (its actor was lost) is dropped
        return dist.PrefixStore(f"raypod/{prefix}/", kept[1]) if prefix else kept[1]

    def _forget_store(self) -> None:
        """Drop this actor's store connection: the next group connects anew."""
        self._client = None

    def warm(self, config: Any, recipe: Any, rehearse: bool = False) -> dict[str, Any]:
        """Get ready to take a rank: load the data; a spare or joiner (``rehearse``) also
        runs one step of the model on a group of its own, so that joining is quick."""
        from raypod.worker.trainer import Trainer

        t0 = time.perf_counter()
        if self.trainer is None:
            self.trainer = Trainer(config, recipe)
        rehearsal = self.trainer.rehearse() if rehearse else 0.0
        return {"warm_s": time.perf_counter() - t0, "rehearsal_s": rehearsal,
                "node_id": ray.get_runtime_context().get_node_id()}

    def _join(self, spec: GroupSpec, initialize: bool = True) -> None:
        """Join the group ``spec`` describes (this actor is warm: :meth:`warm`)."""
        # Connected inside the rank's group session, so that an abort during the rendezvous
        # (a peer frozen before it joined) reaches the store's socket too.
        def store() -> Any:
            if self.trainer.groups.store_lost:  # an abort shut it (the checkpoint group was forming)
                self._forget_store()
            return self._store_for(spec.init_method, spec.world_size, spec.config.fault.pg_timeout_s)

        try:
            self.trainer.join(spec.rank, spec.world_size, store, spec.injections, spec.attempt, *spec.peers,
                              initialize=initialize, link_first=spec.link_first)
        except BaseException:
            # Aborted while forming (the store connection was shut) or timed out in it (a reply
            # may still come on that connection): the next group connects anew.
            self._forget_store()
            raise

    def setup(self, spec: GroupSpec, restore: tuple[str, int, str | None] | None) -> dict[str, Any]:
        """Join the process group, build the model shard, restore a checkpoint when asked
        (``restore``: path, step and the manifest's digest of its ``.metadata``)."""
        t0 = time.perf_counter()
        self.warm(spec.config, spec.recipe)
        self._join(spec)
        doctor = None
        if spec.config.doctor.enabled:  # the pre-job health checks, in the group just joined
            from raypod.doctor import rank_preflight

            doctor = rank_preflight(spec.config)
        load_s = None
        if restore is not None:
            t1 = time.perf_counter()
            self.trainer.load(*restore)
            load_s = time.perf_counter() - t1
        # The stream starts after the first step, which the rank assembles itself: that step
        # does not share the rank's CPU with importing and starting Ray Data.
        self.trainer.feed.seek(spec.rank, spec.world_size, self.trainer.step + 1, start=False)
        return {"rank": spec.rank, "setup_s": time.perf_counter() - t0, "load_s": load_s,
                "num_samples": len(self.trainer.data), "doctor": doctor}

    def _rejoin(self, spec: GroupSpec, restore: Callable[[], int], initialize: bool = False) -> dict[str, Any]:
        """Leave the old group, join the new one (model built for a restore, or initialised as
        at the job's start with ``initialize``), then ``restore()`` the state; returns the
        timings of the three phases and the bytes received."""
        if self._joined is not None and self._joined[0] == spec.init_method:
            return self._joined[1]  # this regroup's call came twice: it ran already
        t, cpu = [time.perf_counter()], time.process_time()
        self.warm(spec.config, spec.recipe)
        self.trainer.leave()
        t.append(time.perf_counter())
        arrived = time.time()  # wall clock: the driver compares when the ranks reached the rendezvous
        self._join(spec, initialize=initialize)
        t.append(time.perf_counter())
        received = restore()
        t.append(time.perf_counter())
        # The process's CPU through it: on a cluster, where each rank has cores of its own, the
        # slowest rank's CPU (not the wall time of N ranks sharing a test box) is the rebuild.
        result = {"rank": spec.rank, "reconfigure_s": t[-1] - t[0], "received_bytes": received, "arrived": arrived,
                "cpu_s": time.process_time() - cpu,
                "phases_s": {"leave": t[1] - t[0], "join": t[2] - t[1], "restore": t[3] - t[2],
                             **{f"join_{k}": v for k, v in self.trainer.join_phases.items()}}}
        self._joined = (spec.init_method, result)
        return result

    def reconfigure(self, spec: GroupSpec, restore_step: int, moves: list[tuple[int, int, int]]) -> dict[str, Any]:
        """Leave the broken group, join the new one and restore ``restore_step`` from memory."""
        return self._rejoin(spec, lambda: self.trainer.restore_memory(restore_step, moves))

    def reload(self, spec: GroupSpec, path: str | None, step: int, metadata_sha256: str | None = None) -> dict[str, Any]:
        """Leave the broken group, join the new one and load the committed checkpoint ``path``
        (of ``step``) from storage: an in-place recovery that restores no in-memory copy.
        ``metadata_sha256`` is the manifest's digest of ``.metadata``, checked as it is read.
        ``path`` None: the job has no checkpoint and no snapshot yet, so the group starts
        afresh in place (the model initialised from the seed, as at the job's start)."""
        if path is None:
            # Looked up once _rejoin has warmed the actor: a new actor in a lost rank's slot
            # has no trainer before that.
            return self._rejoin(spec, lambda: self.trainer.restore_initial(), initialize=True)
        return self._rejoin(spec, lambda: self.trainer.restore_checkpoint(path, step, metadata_sha256))

    def join_as(self, method: str, shared: GroupSpec, rank: int, peers: tuple[int | None, int | None],
                link_first: int | None, *args: Any) -> dict[str, Any]:
        """A regroup's call (``reconfigure``, ``reload`` or ``reshape``: ``method(spec, *args)``)
        sent by this node's agent: ``shared`` is the spec every rank of the new group shares,
        put in the object store once by the driver, made this rank's by ``rank``, ``peers`` and
        ``link_first`` (see :meth:`raypod.driver.worker_group.WorkerGroup._submit_regroup`)."""
        if method not in REGROUP_METHODS:
            raise ValueError(f"join_as: {method!r} is not a regroup call ({', '.join(REGROUP_METHODS)})")
        spec = dataclasses.replace(shared, rank=rank, peers=peers, link_first=link_first)
        return getattr(self, method)(spec, *args)

    def export_reshard(self, step: int, sources: list[int], old_world: int,
                       new_world: int) -> dict[int, list[Any]]:
        """Put the pieces of ``sources``' state for each new rank in the object store.

        Returns ``{source: [ObjectRef for new rank 0, 1, ...]}``; the new ranks fetch
        them straight from this node's object store.
        """
        bufs = self.trainer.export_reshard(step, sources, old_world, new_world)
        return {src: [ray.put(b.numpy()) for b in per_rank] for src, per_rank in bufs.items()}

    def reshape(self, spec: GroupSpec, restore_step: int, old_world: int,
                piece_refs: list[Any]) -> dict[str, Any]:
        """Join a group of another size and assemble this rank's shard from the old ranks' pieces."""

        def restore() -> int:
            import warnings

            import torch

            arrays = ray.get(list(piece_refs))
            with warnings.catch_warnings():  # object-store arrays are read-only; they are only read
                warnings.simplefilter("ignore", UserWarning)
                bufs = [torch.from_numpy(a) for a in arrays]
            return self.trainer.restore_reshard(restore_step, old_world, bufs)

        return self._rejoin(spec, restore)

    def memory_report(self) -> MemoryReport:
        """Steps of the snapshots this rank holds, its own and its peers' replicas."""
        return self.trainer.snapshots.report() if self.trainer else MemoryReport()

    def train_step(self, step: int, snapshot: bool = True) -> StepResult:
        out = self.trainer.train_step(step, snapshot)
        out.preempted = self.preempted_at is not None
        return out

    @ray.method(num_returns="streaming")
    def train_window(self, address: str, window_key: str, first: int) -> Iterator[StepResult]:
        """Train steps ``first``, ``first + 1``, ... as the driver grants them, one result per
        step streamed back as it is done; ends before the first step whose grant is the
        window's end (see :mod:`raypod.worker.grants`), or when the rank is interrupted while
        it waits for one. A step that fails ends the window with its error."""
        from raypod.worker.grants import StepGrants

        if self._grants is None:
            self._grants = StepGrants()
        trainer, step = self.trainer, first
        while True:
            snapshot = self._grants.wait(address, window_key, step, lambda: trainer.broken,
                                         trainer.cfg.fault.hang_timeout_s)
            if snapshot is None:
                return
            yield self.train_step(step, snapshot)
            step += 1

    def rollback(self, step: int) -> list[int]:
        """Back to this rank's snapshot of ``step`` (a bad loss); see ``Trainer.rollback``."""
        return self.trainer.rollback(step)

    def flush_replicas(self, latest: bool = False) -> MemoryReport:
        """Finish the replica exchange in flight (first snapshotting the last step, with
        ``latest``), then report what is held in memory."""
        self.trainer.flush_replicas(latest)
        return self.trainer.snapshots.report()

    # These run on threads of their own, so they answer while a step runs. The ping has
    # its own group so that replica waits (which may block) can never hold it up.
    @ray.method(concurrency_group="ping")
    def ping(self) -> int:
        """Liveness: answers at once, even while the rank is inside a collective."""
        return os.getpid()

    @ray.method(concurrency_group="ping")
    def kill_pid(self, pid: int) -> None:
        """SIGKILL a lost sibling rank's process on this node
        (:func:`raypod.worker.node_agent.kill_pid`)."""
        from raypod.worker.node_agent import kill_pid

        kill_pid(pid)

    @ray.method(concurrency_group="ping")
    def cpu_ticks(self, pid: int) -> int | None:
        """A sibling rank's process as ``/proc`` shows it on this node (see
        :func:`raypod.worker.node_agent.cpu_ticks`): is a silent sibling working or frozen?"""
        from raypod.worker.node_agent import cpu_ticks

        return cpu_ticks(pid)

    @ray.method(concurrency_group="replica")
    def wait_replicated(self, step: int, timeout: float) -> tuple[int, bool]:
        """``(step, ok)`` once step ``step``'s snapshot reached this rank's replica holder."""
        trainer = self.trainer
        return step, (trainer.wait_replicated(step, timeout) if trainer is not None else False)

    def save(self, step: int, path: str) -> list[int]:
        return self.trainer.save(step, path)

    def finish_saves(self) -> list[int]:
        return self.trainer.finish_saves()

    def state_digest(self, export_path: str | None = None, pretrained_dir: str | None = None) -> str | None:
        return self.trainer.state_digest(export_path, pretrained_dir)

    def close(self) -> None:
        self.closed = True
        if self.trainer is not None:
            self.trainer.close()


def remote_worker_class() -> Any:
    """``TrainWorker`` as a Ray actor class (made lazily so importing raypod stays cheap)."""
    return ray.remote(max_restarts=0, max_task_retries=0,
                      concurrency_groups={"ping": 1, "replica": 4, "health": 1})(TrainWorker)
