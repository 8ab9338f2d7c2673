"""The training step of one rank, independent of Ray: build, step, save, load, digest.

:class:`Trainer` is what each worker actor hosts. It owns the model shard, the
optimizer shard and the data source; the data position is the step number (see
:mod:`raypod.data.order`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import signal
import time
from concurrent.futures import Future
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from raypod import faults
from raypod.checkpoint import dcp as ckpt
from raypod.config import FaultInjection, JobConfig, TrainConfig
from raypod.data.order import SampleOrder
from raypod.data.stream import StepFeed
from raypod.recipe import RankContext, Recipe
from raypod.worker import reshard, snapshot
from raypod.worker.parallel import autocast, build_mesh, grad_sync, parallelize, to_empty
from raypod.worker.snapshot import PeerReplicator, SnapshotStore

log = logging.getLogger("raypod.worker")


def export_model(state_dict: dict[str, Any], path: str) -> None:
    """Write a consolidated state dict so that it appears whole or not at all."""
    import io

    from raypod.checkpoint.fs import get_fs

    buf = io.BytesIO()
    torch.save(state_dict, buf)
    fs, p = get_fs(path)
    tmp = f"{p}.tmp-{os.getpid()}"
    fs.makedirs(os.path.dirname(p), exist_ok=True)
    try:
        fs.pipe_file(tmp, buf.getvalue())
        fs.mv(tmp, p)
    except BaseException:
        try:  # nothing half-written stays behind
            fs.rm(tmp)
        except (OSError, FileNotFoundError):
            pass
        raise


def export_pretrained(recipe: Recipe, state_dict: dict[str, Any], dest: str) -> bool:
    """Have ``recipe`` write its own format of the final model into a local folder and publish
    it at ``dest`` (a local path or URI) whole: written aside, then moved into place."""
    import shutil
    import tempfile

    from raypod.checkpoint.fs import get_fs

    with tempfile.TemporaryDirectory(prefix="raypod-export-") as tmp:
        if not recipe.export_pretrained(state_dict, tmp):
            return False
        fs, p = get_fs(dest)
        aside = f"{p.rstrip('/')}.tmp-{os.getpid()}"
        if fs.exists(aside):
            fs.rm(aside, recursive=True)
        fs.makedirs(os.path.dirname(p.rstrip("/")), exist_ok=True)
        if "://" not in dest or dest.startswith("file://"):
            shutil.copytree(tmp, aside)
            if os.path.exists(p):
                shutil.rmtree(p)
            os.replace(aside, p)
        else:
            fs.put(tmp.rstrip("/") + "/", p.rstrip("/") + "/", recursive=True)
    log.info("[rank 0] %s wrote %s", type(recipe).__name__, dest)
    return True


class InjectedFault(RuntimeError):
    """Raised by an injected ``exception`` fault."""


_SYNC_SLICE = timedelta(seconds=0.25)
"""How often a rank waiting for its peers at the start of a step checks for an interrupt."""

# Where a rank is inside a step, in order: a rank that is stuck at a lower
# ``(step, phase)`` than its peers is the one they are waiting for.
PHASES = ("start", "sync", "forward_backward", "optimizer", "snapshot", "done")


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warm-up then cosine decay to ``lr * min_lr_ratio``, by global step."""
    if t.warmup_steps and step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    span = max(1, t.max_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    floor = t.lr * t.min_lr_ratio
    return floor + (t.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def micro_batches(ids: np.ndarray, per_rank_max: int, micro: int) -> list[np.ndarray]:
    """Split a rank's ids into the same number of micro-batches on every rank.

    Every rank must run as many forward/backward passes as the others (each one has
    collectives), so the count is set by the largest share, ``per_rank_max``.
    """
    n = max(1, math.ceil(per_rank_max / micro))
    return [ids[i * micro : (i + 1) * micro] for i in range(n)]


def _rows(batch: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a batch (a tensor, array or list, or a dict/tuple of them)."""
    if isinstance(batch, dict):
        return {k: _rows(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return type(batch)(_rows(v, start, stop) for v in batch)
    return batch[start:stop]


def split_loss(out: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """A recipe's ``loss``/``evaluate`` result as ``(loss, extra metrics)``."""
    if isinstance(out, tuple):
        loss, extra = out
        return loss, dict(extra or {})
    return out, {}


def _accumulate(sums: dict[str, torch.Tensor], values: dict[str, Any], weight: float) -> None:
    """Add ``value * weight`` to ``sums[name]`` for each metric (kept on the device: no sync)."""
    for name, value in values.items():
        v = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        sums[name] = sums[name] + v * weight if name in sums else v * weight


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

    slow_s: float = 0.0
    """Injected ``slow`` fault: seconds added to every step (stays with the process)."""
    poison: bool = False
    """Injected ``nan`` fault: this step's loss and gradients become NaN."""
    where: tuple[int, int, float] = (0, len(PHASES) - 1, 0.0)
    """``(step, index in PHASES, time.monotonic() on entering it)``: what heartbeats report."""

    def __init__(self, config: JobConfig, recipe: Recipe, attempt: int = 0) -> None:
        self.cfg, self.recipe, self.attempt = config, recipe, attempt
        use_gpu = config.scaling.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        if use_gpu:
            torch.cuda.set_device(self.device)
        self.rank, self.world_size = -1, 0
        self.injections: list[tuple[int, FaultInjection]] = []
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
        if hasattr(self.data, "warm"):
            self.data.warm()  # a spare's first batches come from the page cache
        self.pending_saves: dict[int, Future] = {}
        self.save_started: dict[int, float] = {}
        self.save_s: float | None = None
        """Seconds the last persistent save took (reported with steps: the driver's load estimate)."""
        self.step = 0
        self.model = self.optimizer = None
        self.snapshots = SnapshotStore(keep=3)
        self.last_snapshot: snapshot.Snapshot | None = None
        self.replicator: PeerReplicator | None = None
        self.broken = False
        self.join_phases: dict[str, float] = {}

    def join(self, rank: int, world_size: int, store: Any,
             injections: list[tuple[int, FaultInjection]], attempt: int,
             peer_to: int | None = None, peer_from: int | None = None,
             initialize: bool = True) -> None:
        """Join a process group as ``rank`` of ``world_size`` and build the model shard.

        With ``initialize=False`` (the state is about to be restored from memory) the
        model is built on the meta device, sharded, and only then given uninitialised
        storage for this rank's shard: no full-size tensors, no random init.
        """
        self.rank, self.world_size, self.attempt = rank, world_size, attempt
        log.info("[rank %d] joining a group of %d (attempt %d, pid %d)", rank, world_size, attempt,
                 os.getpid())
        self.injections = [(i, f) for i, f in injections if f.rank == rank]
        backend = "cpu:gloo,cuda:nccl" if self.device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=self.cfg.fault.pg_timeout_s)
        marks = [time.perf_counter()]
        dist.init_process_group(backend, store=store, rank=rank,
                                world_size=world_size, timeout=timeout)
        # Checkpoint writes and replica exchange run on their own gloo groups so they
        # never interleave with the training collectives.
        self.ckpt_group = dist.new_group(backend="gloo", timeout=timeout)
        replica_group = dist.new_group(backend="gloo", timeout=timeout)
        marks.append(time.perf_counter())
        self.mesh = build_mesh(self.cfg.parallel, world_size, self.device)
        ctx = RankContext(rank=rank, world_size=world_size, device=self.device, config=self.cfg)
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
        self.model = parallelize(model, self.recipe.shard_units(model), self.cfg.parallel, self.mesh,
                                 self.device)
        if not initialize:
            to_empty(self.model, self.device)
        self.optimizer = self.recipe.build_optimizer(self.model, ctx)
        marks.append(time.perf_counter())
        self.join_phases = {"rendezvous": marks[1] - marks[0], "build": marks[2] - marks[1]}
        self.per_rank_max = math.ceil(self.cfg.train.global_batch / world_size)
        self.broken = False
        self.replicator = PeerReplicator(replica_group, peer_to, peer_from)

    def rehearse(self, max_state_bytes: float = 4 * 2**30) -> float:
        """Run one training step on a one-rank group of this process's own, then drop it.

        A spare does this while it waits, so that when it takes a rank its first step does
        not pay for the process's first FSDP2 wrap, DTensor dispatch, autograd and optimizer
        kernels. The model is the recipe's own (built on the meta device, given storage after
        sharding, never initialised: only the code paths matter). Skipped when the whole
        model and optimizer state would take more than ``max_state_bytes``.

        Returns:
            Seconds spent (0 when skipped).
        """
        if dist.is_initialized():
            return 0.0
        t0 = time.perf_counter()
        ctx = RankContext(rank=0, world_size=1, device=self.device, config=self.cfg)
        with torch.device("meta"):
            model = self.recipe.build_model(ctx)
        state_bytes = sum(p.numel() * p.element_size() * 4 for p in model.parameters())
        if state_bytes > max_state_bytes or next(model.buffers(), None) is not None:
            return 0.0
        backend = "cpu:gloo,cuda:nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timedelta(seconds=self.cfg.fault.pg_timeout_s))
        try:
            mesh = build_mesh(self.cfg.parallel, 1, self.device)
            model = parallelize(model, self.recipe.shard_units(model), self.cfg.parallel, mesh, self.device,
                                shard_alone=True)
            to_empty(model, self.device)
            optimizer = self.recipe.build_optimizer(model, ctx)
            batch = self.data.get_batch([0])
            with autocast(self.cfg.parallel, model, self.device):
                split_loss(self.recipe.loss(model, batch, self.device))[0].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            snapshot.take(model, optimizer)
        except Exception as e:  # noqa: BLE001 - a rehearsal that fails only costs the warm-up
            log.info("rehearsal step skipped: %s: %s", type(e).__name__, e)
        finally:
            dist.destroy_process_group()
        return time.perf_counter() - t0

    def interrupt(self, attempt: int | None = None) -> dict[str, Any]:
        """Make a step call that is stuck waiting (for its peers at the start of the step,
        or on a replica round with a lost peer) fail now, so that the driver sees this rank
        alive, with its copies, and can regroup it. The rank takes no further step until it
        rejoins a group. Returns where it was."""
        step, phase, since = self.where
        if attempt is not None and attempt != self.attempt:
            # Sent during an earlier attempt's drain, arriving after this rank rejoined.
            return {"rank": self.rank, "step": step, "phase": "rejoined", "in_phase_s": 0.0}
        self.broken = True
        if self.replicator is not None:
            self.replicator.abort()
        return {"rank": self.rank, "step": step, "phase": PHASES[phase],
                "in_phase_s": round(time.monotonic() - since, 3)}

    def leave(self) -> None:
        """Drop the process group and the model shard (snapshots and replicas stay)."""
        if self.replicator is not None:
            self.replicator.close()
            self.replicator = None
        self.pending_saves.clear()
        self.save_started.clear()
        self.model = self.optimizer = None
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as e:  # noqa: BLE001 - a broken group is why we leave
                log.info("[rank %d] leaving a broken process group: %s", self.rank, e)

    # ---- training ----------------------------------------------------------------
    def _mark(self, step: int, phase: str) -> None:
        self.where = (step, PHASES.index(phase), time.monotonic())

    def _fire_faults(self, step: int) -> None:
        for i, f in self.injections:
            if f.step == step:
                faults.record_fired(self.cfg.job_dir, i, f, self.attempt)
                log.info("[rank %d attempt %d] injecting %s at step %d", self.rank,  # the driver reports it
                         self.attempt, f.kind, step)
                if f.kind == "kill":
                    os._exit(137)
                if f.kind == "hang":
                    while True:  # no progress, as a rank stuck in a kernel or a deadlock
                        time.sleep(1.0)
                if f.kind == "slow":
                    self.slow_s = f.delay_s
                elif f.kind == "nan":
                    self.poison = True
                elif f.kind == "preempt":
                    os.kill(os.getpid(), signal.SIGTERM)  # what the node's shutdown sends
                else:
                    raise InjectedFault(f"injected exception at step {step} on rank {self.rank}")

    def train_step(self, step: int, take_snapshot: bool = True) -> dict[str, Any]:
        """Run optimizer step ``step`` (1-based) and return this rank's figures.

        With ``take_snapshot`` (the driver's cadence decides; every rank of a step gets the
        same), the state after the step is snapshotted and sent to the peer.

        If the step raises, the driver replaces this rank (its peers are blocked in a
        collective with it, and only its process going away releases them at once).
        Once a step failed, the steps queued after it fail at once: run against the
        peers' next collectives they would mix two steps' gradients.
        """
        if self.broken:
            raise RuntimeError(f"rank {self.rank} stopped after a failed step; waiting for recovery")
        self._mark(step, "start")
        try:
            out = self._train_step(step)
        except BaseException:
            self.broken = True
            if self.replicator is not None:
                self.replicator.abort()
            raise
        self._mark(step, "snapshot")
        out.update(self._snapshot(step, take_snapshot))
        self._mark(step, "done")
        return out

    def wait_replicated(self, step: int, timeout: float) -> bool:
        """True once step ``step``'s snapshot is held by this rank's peer (or needs no peer)."""
        rep = self.replicator
        if rep is None or not rep.enabled:  # the driver asks only for steps that snapshot
            return True
        return rep.wait_round(step, timeout)

    def _wait_for_peers(self) -> float:
        """Seconds spent waiting for the slowest rank to reach this step (straggler split)."""
        if not self.cfg.fault.straggler_factor or self.world_size < 2:
            return 0.0
        t0 = time.perf_counter()
        work = dist.all_reduce(torch.zeros(1), async_op=True)  # a CPU tensor: gloo, also beside NCCL
        # Waited for in slices, so that the driver can release this rank (``interrupt``)
        # when a peer failed: a rank whose peer abandoned the collective (its own broke
        # on a third, lost rank) would otherwise wait here for the group's whole timeout.
        while True:
            try:
                work.wait(_SYNC_SLICE)
                break
            except RuntimeError as e:
                if "timed out" not in str(e):
                    raise
                if self.broken:
                    raise RuntimeError(f"rank {self.rank} was waiting for its peers when one of "
                                       "them failed; released by the driver") from None
        return time.perf_counter() - t0

    def _snapshot(self, step: int, take: bool) -> dict[str, Any]:
        # An exchange runs beside the next steps; on CPU ranks it takes the training's
        # cores, so its time is part of what a snapshot costs (the driver's cadence).
        spent = self.replicator.exchange_s() if self.replicator and self.device.type == "cpu" else 0.0
        if not take:
            return {"snapshot_s": 0.0, "exchange_s": spent, "memory": self.snapshots.report()}
        t0 = time.perf_counter()
        snap = snapshot.take(self.model, self.optimizer)
        self.last_snapshot = snap
        self.snapshots.add_own(step, snap)
        waited = self.replicator.submit(step, snap, self.snapshots) if self.replicator else 0.0
        alloc = snapshot.pop_alloc_s()  # the pool's first buffers: paid once, not every snapshot
        return {"snapshot_s": time.perf_counter() - t0 - waited - alloc, "replica_wait_s": waited,
                "exchange_s": spent, "snapshot_alloc_s": alloc, "memory": self.snapshots.report()}

    def _train_step(self, step: int) -> dict[str, Any]:
        if step <= self.step:  # later steps may be skipped (a bad batch), never repeated here
            raise RuntimeError(f"rank {self.rank} got step {step} after step {self.step}")
        self._fire_faults(step)
        t0 = time.perf_counter()
        if self.slow_s:
            time.sleep(self.slow_s)
        self._mark(step, "sync")
        wait_s = self._wait_for_peers()
        self._mark(step, "forward_backward")
        t = self.cfg.train
        td = time.perf_counter()
        ids, batch = self.feed.take(step, self.rank, self.world_size)
        data_s = time.perf_counter() - td  # the wait on the data stream
        micros = micro_batches(np.arange(len(ids)), self.per_rank_max, t.micro_batch)
        scale = self.world_size / t.global_batch  # gradients average to the global mean
        lr = lr_at(step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        extra_sums: dict[str, torch.Tensor] = {}
        for i, chunk in enumerate(micros):
            weight = float(len(chunk))
            if len(chunk):
                part = _rows(batch, int(chunk[0]), int(chunk[-1]) + 1)
            elif len(ids):  # keep the collectives in step with the other ranks
                part, weight = _rows(batch, 0, 1), 0.0
            else:
                part, weight = self.data.get_batch(self.order.ids(step)[:1].tolist()), 0.0
            with grad_sync(self.model, i == len(micros) - 1), autocast(
                self.cfg.parallel, self.model, self.device
            ):
                loss, extra = split_loss(self.recipe.loss(self.model, part, self.device))
                (loss * (weight * scale)).backward()
            loss_sum += loss.detach() * weight
            _accumulate(extra_sums, extra, weight)
        self._mark(step, "optimizer")
        if self.poison:
            self.poison = False
            loss_sum = loss_sum * float("nan")
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(float("nan"))
        grad_norm = self._clip()
        # A snapshot still copying reads these tensors: the update waits for it (on the GPU).
        stall = snapshot.before_update(self.last_snapshot)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        compute_s = time.perf_counter() - t0
        evaluated = self._evaluate() if self._eval_due(step) else {}
        return {
            **evaluated,
            "metrics_sum": {k: float(v.item()) for k, v in extra_sums.items()},
            "step": step,
            "rank": self.rank,
            "loss_sum": float(loss_sum.item()),  # waits for the step's kernels
            "snapshot_stall_s": snapshot.stall_s(stall),
            "samples": int(len(ids)),
            "grad_norm": grad_norm,
            "lr": lr,
            "compute_s": compute_s,
            "wait_s": wait_s,
            "data_s": data_s,
            "epoch": self.order.epoch_of(step),
            "ids": np.asarray(ids, dtype=np.int64),
            "saved": self._reap_saves(),
            "save_s": self.save_s,
        }

    def _eval_due(self, step: int) -> bool:
        every = self.cfg.train.eval_every_steps
        return bool(every and self.eval_data is not None and len(self.eval_data)
                    and (step % every == 0 or step == self.cfg.train.max_steps))

    def _evaluate(self) -> dict[str, Any]:
        """Evaluate the model after this step on the first ``train.eval_samples`` eval samples.

        Each rank takes its strided share in micro-batches (as many on every rank: FSDP2's
        forward has collectives), under ``torch.no_grad`` in eval mode; the RNG state and the
        module's mode are put back, so the training state is the same as without it.

        Returns:
            ``eval_sums`` (``loss`` and the recipe's eval metrics, summed over this rank's
            samples), ``eval_samples`` and ``eval_s``.
        """
        t0 = time.perf_counter()
        t = self.cfg.train
        n = min(len(self.eval_data), t.eval_samples)
        ids = SampleOrder.rank_share(np.arange(n, dtype=np.int64), self.rank, self.world_size)
        micros = micro_batches(np.arange(len(ids)), math.ceil(n / self.world_size), t.micro_batch)
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state() if self.device.type == "cuda" else None
        training = self.model.training
        sums: dict[str, torch.Tensor] = {}
        self.model.eval()
        try:
            with torch.no_grad():
                for chunk in micros:
                    weight = float(len(chunk))
                    part = ids[chunk] if len(chunk) else np.zeros(1, dtype=np.int64)  # weight 0: in step
                    batch = self.eval_data.get_batch(part)
                    with autocast(self.cfg.parallel, self.model, self.device):
                        loss, extra = split_loss(self.recipe.evaluate(self.model, batch, self.device))
                    _accumulate(sums, {"loss": loss, **extra}, weight)
        finally:
            self.model.train(training)
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng)
        return {"eval_sums": {k: float(v.item()) for k, v in sums.items()}, "eval_samples": int(len(ids)),
                "eval_s": time.perf_counter() - t0}

    def _clip(self) -> float:
        max_norm = self.cfg.train.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm.item())

    # ---- checkpoints -------------------------------------------------------------
    def _reap_saves(self, wait: bool = False) -> list[int]:
        done = []
        for step, fut in list(self.pending_saves.items()):
            if wait or fut.done():
                try:
                    fut.result()  # re-raises a failed write
                except BaseException as e:  # DCP's CheckpointException is a BaseException
                    self._storage_failure(e, step)
                    raise
                done.append(step)
                del self.pending_saves[step]
                started = self.save_started.pop(step, None)
                if started is not None:  # at most a step late: an upper bound of the write
                    self.save_s = time.perf_counter() - started
        return done

    def save(self, step: int, path: str) -> list[int]:
        """Start saving the state after ``step``; returns saves finished meanwhile."""
        done = self._reap_saves(wait=True)  # one write in flight at a time
        t0 = time.perf_counter()
        try:
            fut = ckpt.save(self.model, self.optimizer, path, async_save=self.cfg.checkpoint.async_save,
                            process_group=self.ckpt_group)
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            self._storage_failure(e, step)
            raise
        if fut is None:
            done.append(step)
            self.save_s = time.perf_counter() - t0
        else:
            self.pending_saves[step] = fut
            self.save_started[step] = t0
        return done

    def _storage_failure(self, e: BaseException, step: int) -> None:
        """Raise a full, read-only or forbidden storage as one :class:`StorageError` sentence."""
        from raypod.checkpoint.fs import probe_storage, storage_error

        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            return
        doing = f"writing checkpoint step {step}"
        err = (storage_error(e, self.cfg.checkpoint.storage, doing)
               or probe_storage(self.cfg.job_dir, self.cfg.checkpoint.storage, doing))
        if err is not None:
            raise err from None

    def finish_saves(self) -> list[int]:
        """Wait for every save in flight; returns their steps."""
        return self._reap_saves(wait=True)

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
        with self.snapshots.lock:
            for s in [s for s in self.snapshots.own if s > step]:
                del self.snapshots.own[s]  # steps after the restore point are being redone
        self.snapshots.clear_replicas()
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
        received = 0
        targets = {t for _, t, _ in moves}
        sending: list[tuple[Any, torch.Tensor]] = []
        for holder, target, source in moves:
            if self.rank == holder:
                # The replica held for ``source``, or (HSDP twin) this rank's identical own state.
                buf = self.snapshots.replicas.get(source, {}).get(step)
                if buf is None:
                    buf = snapshot.to_bytes(self.snapshots.own[step])
                size = torch.tensor([buf.numel()], dtype=torch.int64)
                # Sent in the background: this rank restores its own state meanwhile.
                sending += [(dist.isend(size, dst=target), size), (dist.isend(buf, dst=target), buf)]
            elif self.rank == target:
                n = torch.zeros(1, dtype=torch.int64)
                dist.recv(n, src=holder)
                buf = torch.empty(int(n.item()), dtype=torch.uint8)
                dist.recv(buf, src=holder)
                received += buf.numel()
                like = snapshot.state_tensors(self.model, self.optimizer)
                snap = snapshot.from_bytes(buf, like)
                snapshot.restore(self.model, self.optimizer, snap)
                self.snapshots.add_own(step, snap)
        if self.rank not in targets:
            if step not in self.snapshots.own:
                raise RuntimeError(f"rank {self.rank} has no snapshot of step {step}")
            snapshot.restore(self.model, self.optimizer, self.snapshots.own[step])
        for work, _ in sending:
            work.wait()
        for s in [s for s in self.snapshots.own if s > step]:
            del self.snapshots.own[s]  # steps after the restore point are being redone
        self.snapshots.clear_replicas()
        self.step = step
        self.feed.seek(self.rank, self.world_size, step + 1)  # recent batches serve the rewind
        return received

    # ---- in-memory resharding (resize) -------------------------------------------
    def export_reshard(self, step: int, sources: list[int], old_world: int,
                       new_world: int) -> dict[int, list[torch.Tensor]]:
        """Cut the state after ``step`` of each old rank in ``sources`` into ``new_world`` pieces.

        ``sources`` are this rank (its own snapshot) and lost ranks whose replica it holds.
        Returns ``{source: [bytes for new rank 0, 1, ...]}``.
        """
        if step not in self.snapshots.own and self.step == step:
            self.snapshots.add_own(step, snapshot.take(self.model, self.optimizer))
        lay = reshard.layout(self.model, self.optimizer)
        out = {}
        for src in sources:
            if src == self.rank:
                snap = self.snapshots.own[step]
            else:
                snap = snapshot.from_bytes(self.snapshots.replicas[src][step],
                                           reshard.local_like(lay, old_world, src))
            out[src] = [snapshot.to_bytes(p) for p in reshard.split(snap, lay, old_world, src, new_world)]
        return out

    def restore_reshard(self, step: int, old_world: int, bufs: list[torch.Tensor]) -> int:
        """Restore the state after ``step`` from the pieces of every old rank (old rank order).

        Returns the bytes received.
        """
        snapshot.init_state(self.optimizer)
        lay = reshard.layout(self.model, self.optimizer)
        pieces = []
        for i, buf in enumerate(bufs):
            like = reshard.piece_like(lay, old_world, i, self.world_size, self.rank)
            pieces.append(snapshot.from_bytes(buf, like))
        snap = reshard.assemble(pieces, lay, self.world_size, self.rank)
        snapshot.restore(self.model, self.optimizer, snap)
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
        done = [s for s in self._reap_saves(wait=True) if s <= step]
        snapshot.restore(self.model, self.optimizer, self.snapshots.own[step])
        with self.snapshots.lock:
            for s in [s for s in self.snapshots.own if s > step]:
                del self.snapshots.own[s]
            for held in self.snapshots.replicas.values():
                for s in [s for s in held if s > step]:
                    del held[s]
        self.step, self.broken = step, False
        self._mark(step, "done")
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

    # ---- inspection --------------------------------------------------------------
    def state_digest(self, export_path: str | None = None, pretrained_dir: str | None = None) -> str | None:
        """SHA-256 of the full model and optimizer state (rank 0), independent of world size.

        With ``export_path``, rank 0 also writes the consolidated model state dict there
        (plain ``torch.save``; loads without raypod). With ``pretrained_dir``, rank 0 also
        has the recipe write its own format there (:meth:`Recipe.export_pretrained`).
        """
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd, osd = get_state_dict(self.model, self.optimizer, options=opts)
        if self.rank != 0:
            return None
        if export_path:
            try:
                export_model(msd, export_path)
            except OSError as e:
                from raypod.checkpoint.fs import storage_error

                err = storage_error(e, self.cfg.checkpoint.storage, f"writing {export_path}")
                if err is not None:
                    raise err from None
                raise
        if pretrained_dir:
            export_pretrained(self.recipe, msd, pretrained_dir)
        h = hashlib.sha256()

        def feed(key: str, value: Any) -> None:
            h.update(key.encode())
            if isinstance(value, torch.Tensor):
                v = value.detach().cpu().contiguous()
                h.update(f"{v.dtype}{tuple(v.shape)}".encode())
                h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
            else:
                h.update(repr(value).encode())

        for k in sorted(msd):
            feed(f"model.{k}", msd[k])
        for fqn in sorted(osd.get("state", {})):
            for k in sorted(osd["state"][fqn]):
                feed(f"optim.{fqn}.{k}", osd["state"][fqn][k])
        for i, g in enumerate(osd.get("param_groups", [])):
            for k in sorted(g):
                feed(f"group{i}.{k}", g[k])
        return h.hexdigest()

    def close(self) -> None:
        """Finish writes and leave the process group."""
        try:
            log.info("[rank %d] data: %s", self.rank, self.feed.stats)
            self.feed.close()
            self._reap_saves(wait=True)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
