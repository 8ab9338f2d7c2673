"""The training step of one rank, independent of Ray: build, step, snapshot, restore.

:class:`Trainer` is what each worker actor hosts. It owns the model shard, the
optimizer shard and the data source; the data position is the step number (see
:mod:`raypod.data.order`). It leans on:

- :mod:`raypod.worker.steps`: the learning-rate schedule, micro-batches, a recipe's loss;
- :mod:`raypod.worker.group`: the rank's process groups, which the driver can abort mid-collective;
- :mod:`raypod.worker.injector`: configured faults (``fault.inject``), fired before a step;
- :mod:`raypod.worker.evaluation`: the eval on eval steps;
- :mod:`raypod.worker.checkpointing`: persistent saves in the background;
- :mod:`raypod.worker.restore`: the state back from memory (own snapshot, replica, reshard);
- :mod:`raypod.worker.export`: the final digest and exports.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raypod.checkpoint import dcp as ckpt
from raypod.config import FaultInjection, JobConfig
from raypod.data.order import SampleOrder
from raypod.data.stream import StepFeed
from raypod.protocol import PHASES, Interrupted, Phase, StepResult
from raypod.recipe import RankContext, Recipe
from raypod.worker import export, restore, snapshot
from raypod.worker.checkpointing import SaveQueue
from raypod.worker.evaluation import eval_due, evaluate
from raypod.worker.group import GroupSession
from raypod.worker.injector import FaultInjector, InjectedFault
from raypod.worker.parallel import autocast, build_mesh, grad_sync, parallelize, to_empty, track_progress
from raypod.worker.rehearsal import rehearse
from raypod.worker.snapshot import PeerReplicator, SnapshotStore
from raypod.worker.steps import accumulate, batch_rows, clip_grads, lr_at, micro_batches, split_loss

__all__ = ["PHASES", "InjectedFault", "Trainer", "lr_at", "micro_batches"]  # importers of the old names

log = logging.getLogger("raypod.worker")


class Trainer:
    """One rank of a job.

    The process outlives process groups: :meth:`join` builds the model shard for a
    group, :meth:`leave` drops it, and the data, the device and the in-memory
    snapshots stay, so a recovery re-forms the group without a new process.

    Args:
        config: the job config.
        recipe: the user's recipe instance.
        attempt: which group this is (for log lines).
    """

    where: tuple[int, Phase, float] = (0, Phase.DONE, 0.0)
    """``(step, phase, time.monotonic() on entering it)``: what heartbeats report."""
    progress: int = 0
    """Sharded blocks entered in this step's forward and backward (heartbeats report it)."""

    def __init__(self, config: JobConfig, recipe: Recipe, attempt: int = 0) -> None:
        self.cfg, self.recipe, self.attempt = config, recipe, attempt
        use_gpu = config.scaling.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        if use_gpu:
            torch.cuda.set_device(self.device)
        self.rank, self.world_size = -1, 0
        self.groups = GroupSession(self.device)
        """The rank's process groups (training, checkpoint, replica): formed, aborted, dropped."""
        self.faults = FaultInjector(config.job_dir, config.fault.inject)
        ctx = RankContext(rank=0, world_size=1, device=self.device, config=config)
        self.data = recipe.build_data(ctx)
        t = config.train
        self.eval_data = recipe.build_eval_data(ctx) if t.eval_every_steps else None
        """The recipe's eval samples (``train.eval_every_steps``), fetched in this process."""
        if t.eval_every_steps and self.eval_data is None:
            log.warning("train.eval_every_steps is %d but %s.build_eval_data gives no eval data: no eval",
                        t.eval_every_steps, type(recipe).__name__)
        self.order = SampleOrder(len(self.data), t.global_batch, t.seed)
        self.feed = StepFeed(self.data, self.order, t.max_steps)
        self.saves = SaveQueue(config)
        self.step = 0
        self.model = self.optimizer = None
        self.snapshots = SnapshotStore()
        self.last_snapshot: snapshot.Snapshot | None = None
        self.replicator: PeerReplicator | None = None
        self.broken = False
        self.join_phases: dict[str, float] = {}

    # ---- groups --------------------------------------------------------------------
    def join(self, rank: int, world_size: int, store: Any,
             injections: list[tuple[int, FaultInjection]], attempt: int,
             peer_to: int | None = None, peer_from: int | None = None,
             initialize: bool = True, link_first: int | None = None) -> None:
        """Join a process group as ``rank`` of ``world_size`` and build the model shard.

        With ``initialize=False`` (the state is about to be restored from memory) the
        model is built on the meta device, sharded, and only then given uninitialised
        storage for this rank's shard: no full-size tensors, no random init.
        """
        self.rank, self.world_size, self.attempt = rank, world_size, attempt
        log.info("[rank %d] joining a group of %d (attempt %d, pid %d)", rank, world_size, attempt,
                 os.getpid())
        self.faults.arm(injections, rank, attempt)
        self.faults.fire(self.step + 1, "join")
        marks = [time.perf_counter()]
        # Checkpoint writes and replica exchange run on gloo groups of their own, so they
        # never interleave with the training collectives; the checkpoint group forms in the
        # background once the rank has trained a step here (off the recovery path).
        self.mesh = self.groups.configure(store, rank, world_size, self.cfg.fault.pg_timeout_s,
                                          lambda n: build_mesh(self.cfg.parallel, n, self.device),
                                          peers=(peer_to, peer_from), link_first=link_first)
        marks.append(time.perf_counter())
        self._build(RankContext(rank=rank, world_size=world_size, device=self.device, config=self.cfg),
                    initialize)
        marks.append(time.perf_counter())
        self.join_phases = {"rendezvous": marks[1] - marks[0], "build": marks[2] - marks[1],
                            **{f"rendezvous_{k}": v for k, v in self.groups.phases.items()}}
        log.info("[rank %d] joined in %.2f s (rendezvous %s, build %.2f s)", rank, marks[2] - marks[0],
                 ", ".join(f"{k} {v:.3f}" for k, v in self.groups.phases.items()), marks[2] - marks[1])
        self.per_rank_max = math.ceil(self.cfg.train.global_batch / world_size)
        self.broken = False
        self.replicator = PeerReplicator(self.groups.replica, peer_to, peer_from,
                                         on_round=lambda s: self.faults.fire(s, "replica"))

    def _build(self, ctx: RankContext, initialize: bool) -> None:
        """The model shard and its optimizer; uninitialised (built on the meta device, then
        given storage) unless ``initialize`` or the model has buffers."""
        model = None
        if not initialize:
            with torch.device("meta"):
                model = self.recipe.build_model(ctx)
            if next(model.buffers(), None) is not None:
                model = None  # buffers are not part of snapshots: build them for real
        if model is None:
            initialize = True
            torch.manual_seed(self.cfg.train.seed)
            model = self.recipe.build_model(ctx).to(self.device)
        units = self.recipe.shard_units(model)
        self.model = parallelize(model, units, self.cfg.parallel, self.mesh, self.device)
        self.faults.hook(units, lambda: self.where[0])
        track_progress(units, self._advance)  # after the fault hooks: a fault fires before the count
        if not initialize:
            to_empty(self.model, self.device)
        self.optimizer = self.recipe.build_optimizer(self.model, ctx)

    def rehearse(self, max_state_bytes: float = 4 * 2**30) -> float:
        """A spare's warm-up step on a group of its own (see :func:`raypod.worker.rehearsal.rehearse`),
        with its data warm (a spare's first batches come from the page cache, its stream starts
        with Ray Data imported)."""
        if hasattr(self.data, "warm"):
            self.data.warm()
        return rehearse(self.cfg, self.recipe, self.data, self.device, max_state_bytes)

    def interrupt(self, attempt: int | None = None) -> Interrupted:
        """Make a call that is blocked in a collective with a lost peer fail now (anywhere: an
        FSDP collective mid-step, the optimizer, the start-of-step sync, a replica round, a
        checkpoint write), by aborting this rank's groups, so that the driver sees this rank
        alive, with its copies, and can regroup it. The rank takes no further step until it
        rejoins a group. Returns where it was."""
        step, phase, since = self.where
        if attempt is not None and attempt != self.attempt:
            # Sent during an earlier attempt's drain, arriving after this rank rejoined.
            return Interrupted(rank=self.rank, step=step, phase=None, in_phase_s=0.0)
        self.broken = True
        if self.replicator is not None:
            self.replicator.abort()
        self.groups.abort("a peer was lost")
        return Interrupted(rank=self.rank, step=step, phase=phase,
                           in_phase_s=round(time.monotonic() - since, 3))

    def leave(self) -> None:
        """Drop the process group and the model shard (snapshots and replicas stay)."""
        if self.replicator is not None:
            self.replicator.close()
            self.replicator = None
        self.saves.clear()
        self.model = self.optimizer = None
        self.groups.leave()

    # ---- training ----------------------------------------------------------------
    def _mark(self, step: int, phase: Phase) -> None:
        self.where = (step, phase, time.monotonic())
        if phase is Phase.START:
            self.progress = 0

    def _advance(self) -> None:
        self.progress += 1

    def train_step(self, step: int, take_snapshot: bool = True) -> StepResult:
        """Run optimizer step ``step`` (1-based) and return this rank's figures.

        With ``take_snapshot`` (the driver's cadence decides; every rank of a step gets the
        same), the state after the step is snapshotted and sent to the peer.

        If the step raises, this rank aborts its groups (its peers blocked in a collective
        with it are released at once) and the driver replaces or regroups it. Once a step
        failed, the steps queued after it fail at once: run against the peers' next
        collectives they would mix two steps' gradients. A step whose groups were aborted
        while it ran (NCCL returns from an aborted collective) never reports a result.
        """
        if self.broken:
            raise RuntimeError(f"rank {self.rank} stopped after a failed step; waiting for recovery")
        self._mark(step, Phase.START)
        try:
            out = self._train_step(step)
            if self.groups.errored():
                raise RuntimeError(f"rank {self.rank}: step {step} ran while its process groups were "
                                   f"aborted ({self.groups.errored()})")
        except BaseException as e:
            self.broken = True
            if self.replicator is not None:
                self.replicator.abort()
            self.groups.abort(f"step {step} failed: {type(e).__name__}")
            raise
        self._mark(step, Phase.SNAPSHOT)
        out.update(self._snapshot(step, take_snapshot))  # after it: this round waited for the last one
        out.replicated = self.replicator.take_acked() if self.replicator else []
        out.memory = self.snapshots.report()
        self._mark(step, Phase.DONE)
        self.groups.start_checkpoint_group()  # once per group: it forms while the ranks train
        return out

    def wait_replicated(self, step: int, timeout: float) -> bool:
        """True once step ``step``'s snapshot is held by its peer (or needs none): the driver's fallback."""
        rep = self.replicator
        if rep is None or not rep.enabled:  # the driver asks only for steps that snapshot
            return True
        return rep.wait_round(step, timeout)

    def _wait_for_peers(self) -> float:
        """Seconds spent waiting for the slowest rank to reach this step (straggler split)."""
        if not self.cfg.fault.straggler_factor or self.world_size < 2:
            return 0.0
        t0 = time.perf_counter()
        # A CPU tensor: gloo, also beside NCCL. A peer lost meanwhile: the driver's abort
        # (``interrupt``) releases it.
        dist.all_reduce(torch.zeros(1))
        return time.perf_counter() - t0

    def _snapshot(self, step: int, take: bool) -> dict[str, float]:
        """Snapshot (and replicate) the state after ``step`` when ``take``; what it cost."""
        # An exchange runs beside the next steps; on CPU ranks it takes the training's
        # cores, so its time is part of what a snapshot costs (the driver's cadence).
        spent = self.replicator.exchange_s() if self.replicator and self.device.type == "cpu" else 0.0
        if not take:
            return {"snapshot_s": 0.0, "exchange_s": spent}
        t0 = time.perf_counter()
        snap = snapshot.take(self.model, self.optimizer)
        self.last_snapshot = snap
        self.snapshots.add_own(step, snap)
        waited = self.replicator.submit(step, snap, self.snapshots) if self.replicator else 0.0
        alloc = snapshot.pop_alloc_s()  # the pool's first buffers: paid once, not every snapshot
        return {"snapshot_s": time.perf_counter() - t0 - waited - alloc, "replica_wait_s": waited,
                "exchange_s": spent, "snapshot_alloc_s": alloc}

    def _train_step(self, step: int) -> StepResult:
        if step <= self.step:  # later steps may be skipped (a bad batch), never repeated here
            raise RuntimeError(f"rank {self.rank} got step {step} after step {self.step}")
        self.faults.fire(step)
        t0 = time.perf_counter()
        self.faults.delay()
        self._mark(step, Phase.SYNC)
        wait_s = self._wait_for_peers()
        self._mark(step, Phase.FORWARD_BACKWARD)
        td = time.perf_counter()
        ids, batch = self.feed.take(step, self.rank, self.world_size)
        data_s = time.perf_counter() - td  # the wait on the data stream
        lr = lr_at(step, self.cfg.train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum, extra_sums = self._forward_backward(step, ids, batch)
        self._mark(step, Phase.OPTIMIZER)
        loss_sum = self.faults.poison_step(loss_sum, self.model)
        grad_norm = clip_grads(self.model, self.cfg.train.grad_clip)
        # A snapshot still copying reads these tensors: the update waits for it (on the GPU).
        stall = snapshot.before_update(self.last_snapshot)
        self.faults.fire(step, "optimizer")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        compute_s = time.perf_counter() - t0
        evaluated = (evaluate(self.model, self.recipe, self.eval_data, self.cfg, self.device, self.rank,
                              self.world_size) if eval_due(self.cfg, self.eval_data, step) else {})
        out = StepResult(
            step=step, rank=self.rank,
            loss_sum=float(loss_sum.item()),  # waits for the step's kernels
            samples=int(len(ids)), ids=np.asarray(ids, dtype=np.int64), epoch=self.order.epoch_of(step),
            lr=lr, grad_norm=grad_norm, compute_s=compute_s, wait_s=wait_s, data_s=data_s,
            metrics_sum={k: float(v.item()) for k, v in extra_sums.items()},
            snapshot_stall_s=snapshot.stall_s(stall), saved=self.saves.reap(), save_s=self.saves.save_s,
        )
        out.save_digests = self.saves.take_digests()
        out.update(evaluated)
        return out

    def _forward_backward(self, step: int, ids: Any, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward over this rank's micro-batches (as many as on every rank);
        returns the loss and the recipe's extra metrics, summed over the samples."""
        t = self.cfg.train
        micros = micro_batches(np.arange(len(ids)), self.per_rank_max, t.micro_batch)
        scale = self.world_size / t.global_batch  # gradients average to the global mean
        loss_sum = torch.zeros((), device=self.device)
        extra_sums: dict[str, torch.Tensor] = {}
        for i, chunk in enumerate(micros):
            weight = float(len(chunk))
            if len(chunk):
                part = batch_rows(batch, int(chunk[0]), int(chunk[-1]) + 1)
            elif len(ids):  # keep the collectives in step with the other ranks
                part, weight = batch_rows(batch, 0, 1), 0.0
            else:
                part, weight = self.data.get_batch(self.order.ids(step)[:1].tolist()), 0.0
            with grad_sync(self.model, i == len(micros) - 1), autocast(
                self.cfg.parallel, self.model, self.device
            ):
                loss, extra = split_loss(self.recipe.loss(self.model, part, self.device))
                (loss * (weight * scale)).backward()
            loss_sum += loss.detach() * weight
            accumulate(extra_sums, extra, weight)
        return loss_sum, extra_sums

    # ---- checkpoints -------------------------------------------------------------
    def save(self, step: int, path: str) -> list[int]:
        """Start saving the state after ``step``; returns saves finished meanwhile."""
        return self.saves.save(self.model, self.optimizer, self.groups.checkpoint_group(), step, path)

    def finish_saves(self) -> list[int]:
        """Wait for every save in flight; returns their steps."""
        return self.saves.reap(wait=True)

    def load(self, path: str, step: int, metadata_sha256: str | None = None) -> None:
        """Restore model and optimizer from a committed checkpoint (the driver verified its files;
        ``metadata_sha256`` is the manifest's digest of ``.metadata``, checked again as it is read)."""
        ckpt.load(self.model, self.optimizer, path, metadata_sha256)
        self.step = step
        self.feed.seek(self.rank, self.world_size, step + 1)

    def restore_checkpoint(self, path: str, step: int, metadata_sha256: str | None = None) -> int:
        """Load a committed checkpoint in a group just joined (an in-place recovery).

        Every rank of the group loads its shard of ``path`` (a collective); snapshots of
        later steps and the old group's replicas are dropped, as after a memory restore.

        Returns:
            The bytes received from peers (none: everything comes from storage).
        """
        snapshot.init_state(self.optimizer)
        self.load(path, step, metadata_sha256)
        restore.drop_after(self.snapshots, step)
        self.snapshots.clear_replicas()
        return 0

    def restore_initial(self) -> int:
        """Start afresh in a group just joined with ``initialize`` (an in-place recovery before
        any step was snapshotted or saved): the state is the initialised model and a new
        optimizer, as at the job's start; every snapshot and replica is dropped.

        Returns:
            The bytes received from peers (none).
        """
        restore.drop_after(self.snapshots, 0)
        self.snapshots.clear_replicas()
        self.step = 0
        self.feed.seek(self.rank, self.world_size, 1)
        return 0

    # ---- in-memory recovery ------------------------------------------------------
    def restore_memory(self, step: int, moves: list[tuple[int, int, int]]) -> int:
        """Restore the state after ``step`` from memory, in a group just joined.

        Args:
            step: the step every rank restores to.
            moves: ``(holder, target, source)``: rank ``holder`` sends the replica it
                holds of old rank ``source`` to the new rank ``target`` (a replacement).

        Returns:
            The bytes this rank received from a peer.
        """
        snapshot.init_state(self.optimizer)
        received = restore.exchange_moves(self.model, self.optimizer, self.snapshots, self.rank, step, moves)
        restore.drop_after(self.snapshots, step)  # steps after the restore point are being redone
        self.snapshots.clear_replicas()
        self.step = step
        self.feed.seek(self.rank, self.world_size, step + 1)  # recent batches serve the rewind
        return received

    def export_reshard(self, step: int, sources: list[int], old_world: int,
                       new_world: int) -> dict[int, list[torch.Tensor]]:
        """Cut the state after ``step`` of each old rank in ``sources`` into ``new_world`` pieces
        (see :func:`raypod.worker.restore.export_pieces`)."""
        if step not in self.snapshots.own and self.step == step:
            self.snapshots.add_own(step, snapshot.take(self.model, self.optimizer))
        return restore.export_pieces(self.model, self.optimizer, self.snapshots, self.rank, step, sources,
                                     old_world, new_world)

    def restore_reshard(self, step: int, old_world: int, bufs: list[torch.Tensor]) -> int:
        """Restore the state after ``step`` from the pieces of every old rank (old rank order).

        Returns the bytes received.
        """
        snapshot.init_state(self.optimizer)
        snap = restore.assemble_pieces(self.model, self.optimizer, self.rank, self.world_size, old_world, bufs)
        self.snapshots.own.clear()  # earlier snapshots have the old group's layout
        self.snapshots.add_own(step, snap)
        self.snapshots.clear_replicas()
        self.step = step
        self.feed.seek(self.rank, self.world_size, step + 1)  # a new share: the stream restarts
        return sum(b.numel() for b in bufs)

    def rollback(self, step: int) -> list[int]:
        """Go back to this rank's own snapshot of ``step``, in the same group (a bad loss).

        Every rank rolls back to the same step and no collective runs, so the group
        stays as it is. Snapshots, replicas and checkpoint saves of later steps are
        dropped (their state is being thrown away).

        Returns:
            The steps ``<= step`` whose saves finished meanwhile (still valid).
        """
        if step not in self.snapshots.own:
            raise RuntimeError(f"rank {self.rank} has no snapshot of step {step}")
        self.flush_replicas()
        if self.replicator is not None:
            self.replicator.take_acked()  # rounds of the steps thrown away must not count their redo
        done = [s for s in self.saves.reap(wait=True) if s <= step]
        snapshot.restore(self.model, self.optimizer, self.snapshots.own[step])
        restore.drop_after(self.snapshots, step, replicas=True)
        self.step, self.broken = step, False
        self._mark(step, Phase.DONE)
        self.feed.seek(self.rank, self.world_size, step + 1)  # recent batches serve the rewind
        return done

    def flush_replicas(self, latest: bool = False) -> None:
        """Wait until the replica exchange in flight is done (the peers hold the latest step).

        With ``latest``, the state of the last step is snapshotted and replicated first
        when the cadence skipped it (every rank of the group must be at that step).
        """
        if latest and self.model is not None and not self.broken and self.step not in self.snapshots.own:
            self._snapshot(self.step, True)
        last = getattr(self.replicator, "_last", None) if self.replicator else None
        if last is not None:
            try:
                last.result()
            except Exception as e:  # noqa: BLE001 - a broken group shows up in training too
                log.warning("[rank %d] replica exchange failed: %s", self.rank, e)

    # ---- the end -----------------------------------------------------------------
    def state_digest(self, export_path: str | None = None, pretrained_dir: str | None = None) -> str | None:
        """SHA-256 of the full model and optimizer state (rank 0), independent of world size;
        rank 0 also writes the exports asked for (see :func:`raypod.worker.export.state_digest`)."""
        return export.state_digest(self.model, self.optimizer, self.rank, self.recipe,
                                   self.cfg.checkpoint.storage, export_path, pretrained_dir)

    def close(self) -> None:
        """Finish writes and leave the process group."""
        try:
            log.info("[rank %d] data: %s", self.rank, self.feed.stats)
            self.feed.close()
            self.saves.reap(wait=True)
        finally:
            self.groups.leave()
