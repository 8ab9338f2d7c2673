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
from raypod.recipe import RankContext, Recipe
from raypod.worker.parallel import autocast, build_mesh, grad_sync, parallelize

log = logging.getLogger("raypod.worker")


class InjectedFault(RuntimeError):
    """Raised by an injected ``exception`` fault."""


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


class Trainer:
    """One rank of a job.

    Args:
        config: the job config.
        recipe: the user's recipe instance.
        rank, world_size: this rank's place in the group.
        init_method: ``tcp://host:port`` of the rendezvous.
        injections: ``(index, fault)`` still to fire (each fires once per job).
        attempt: which group this is (for log lines).
    """

    def __init__(self, config: JobConfig, recipe: Recipe, rank: int, world_size: int,
                 init_method: str, injections: list[tuple[int, FaultInjection]], attempt: int) -> None:
        self.cfg, self.recipe = config, recipe
        self.rank, self.world_size, self.attempt = rank, world_size, attempt
        self.injections = [(i, f) for i, f in injections if f.rank == rank]
        use_gpu = config.scaling.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        if use_gpu:
            torch.cuda.set_device(self.device)
        backend = "cpu:gloo,cuda:nccl" if use_gpu else "gloo"
        timeout = timedelta(seconds=config.fault.pg_timeout_s)
        dist.init_process_group(backend, init_method=init_method, rank=rank,
                                world_size=world_size, timeout=timeout)
        # Checkpoint writes coordinate on their own gloo group so they never interleave
        # with the training collectives.
        self.ckpt_group = dist.new_group(backend="gloo", timeout=timeout)
        self.mesh = build_mesh(config.parallel, world_size, self.device)
        ctx = RankContext(rank=rank, world_size=world_size, device=self.device, config=config)
        torch.manual_seed(config.train.seed)
        model = recipe.build_model(ctx).to(self.device)
        self.model = parallelize(model, recipe.shard_units(model), config.parallel, self.mesh,
                                 self.device)
        self.optimizer = recipe.build_optimizer(self.model, ctx)
        self.data = recipe.build_data(ctx)
        t = config.train
        self.order = SampleOrder(len(self.data), t.global_batch, t.seed)
        self.per_rank_max = math.ceil(t.global_batch / world_size)
        self.pending_saves: dict[int, Future] = {}
        self.step = 0

    # ---- training ----------------------------------------------------------------
    def _fire_faults(self, step: int) -> None:
        for i, f in self.injections:
            if f.step == step:
                faults.record_fired(self.cfg.job_dir, i, f, self.attempt)
                log.warning("[rank %d attempt %d] injecting %s at step %d", self.rank,
                            self.attempt, f.kind, step)
                if f.kind == "kill":
                    os._exit(137)
                raise InjectedFault(f"injected exception at step {step} on rank {self.rank}")

    def train_step(self, step: int) -> dict[str, Any]:
        """Run optimizer step ``step`` (1-based) and return this rank's figures."""
        self._fire_faults(step)
        t0 = time.perf_counter()
        t = self.cfg.train
        ids = SampleOrder.rank_share(self.order.ids(step), self.rank, self.world_size)
        micros = micro_batches(ids, self.per_rank_max, t.micro_batch)
        scale = self.world_size / t.global_batch  # gradients average to the global mean
        lr = lr_at(step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        data_s = 0.0
        for i, chunk in enumerate(micros):
            weight = float(len(chunk))
            if len(chunk) == 0:  # keep the collectives in step with the other ranks
                chunk, weight = ids[:1] if len(ids) else self.order.ids(step)[:1], 0.0
            td = time.perf_counter()
            batch = self.data.get_batch(chunk.tolist())
            data_s += time.perf_counter() - td
            with grad_sync(self.model, i == len(micros) - 1), autocast(
                self.cfg.parallel, self.model, self.device
            ):
                loss = self.recipe.loss(self.model, batch, self.device)
                (loss * (weight * scale)).backward()
            loss_sum += loss.detach() * weight
        grad_norm = self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        return {
            "step": step,
            "rank": self.rank,
            "loss_sum": float(loss_sum.item()),
            "samples": int(len(ids)),
            "grad_norm": grad_norm,
            "lr": lr,
            "compute_s": time.perf_counter() - t0,
            "data_s": data_s,
            "epoch": self.order.epoch_of(step),
            "ids": ids.astype(np.int64),
            "saved": self._reap_saves(),
        }

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
                fut.result()  # re-raises a failed write
                done.append(step)
                del self.pending_saves[step]
        return done

    def save(self, step: int, path: str) -> list[int]:
        """Start saving the state after ``step``; returns saves finished meanwhile."""
        done = self._reap_saves(wait=True)  # one write in flight at a time
        fut = ckpt.save(self.model, self.optimizer, path, async_save=self.cfg.checkpoint.async_save,
                        process_group=self.ckpt_group)
        if fut is None:
            done.append(step)
        else:
            self.pending_saves[step] = fut
        return done

    def finish_saves(self) -> list[int]:
        """Wait for every save in flight; returns their steps."""
        return self._reap_saves(wait=True)

    def load(self, path: str, step: int) -> None:
        """Restore model and optimizer from a committed checkpoint."""
        ckpt.load(self.model, self.optimizer, path)
        self.step = step

    # ---- inspection --------------------------------------------------------------
    def state_digest(self) -> str | None:
        """SHA-256 of the full model and optimizer state (rank 0), independent of world size."""
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd, osd = get_state_dict(self.model, self.optimizer, options=opts)
        if self.rank != 0:
            return None
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
            self._reap_saves(wait=True)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
