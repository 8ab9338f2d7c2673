"""The recovery benchmark's work, shared by both MLP anchors so it is literally the same code.

It mirrors what a raypod rank does for ``jobs/configs/mlp.yaml``
(:class:`raypod.worker.trainer.Trainer` with :class:`raypod.recipes.mlp.MLPRecipe`):
the same 4-block MLP (built by the recipe's own classes after
``torch.manual_seed(seed)``), FSDP2 ``fully_shard`` per block and then the root on a
1-D CPU mesh in fp32, plain AdamW at a constant lr 1e-3, the same seeded sample order
(global batch 32, rank ``r`` takes ids ``r::2``, one micro-batch of 16), loss = mean
of the squared output, and the global gradient norm raypod computes every step
(``grad_clip: 0`` → no clipping). Only process-group setup and checkpointing differ:
the launcher (torchrun or Ray Train) has already initialised gloo, and each anchor
saves ``torch.distributed.checkpoint`` (DCP) shards every 10 steps its own way.

The fault and the record are the same for both anchors:

* rank 1 calls ``os._exit(1)`` right after completing step ``kill_after`` (25), once
  per run: it first creates ``marker`` exclusively, so a restarted group never fires;
* rank 0 appends ``step,unix_time,attempt`` to the step log after each completed
  step (after ``optimizer.step()``), so the harness reads the recovery gap and the
  replayed steps from it (:func:`raypod.bench.recovery.read_step_log`).

The goodput suite (:mod:`raypod.bench.goodput`) runs the same anchors until an
absolute deadline with the built-in kill off (``kill_after=0``): every rank writes
its pid to ``<workdir>/pids/rank<r>`` (:func:`record_pid`) so the harness can
SIGKILL a rank from outside, and the ranks agree on stopping at the deadline
(:func:`past_deadline`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from raypod.bench.anchors.sharded import ShardedRun
from raypod.recipes.mlp import MLP, GaussianSamples, mlp_loss


@dataclass(frozen=True)
class MLPJob:
    """``jobs/configs/mlp.yaml``, as the anchors need it."""

    n_blocks: int = 4
    dim: int = 512
    hidden: int = 2048
    num_samples: int = 32768
    global_batch: int = 32
    micro_batch: int = 16
    lr: float = 1e-3
    seed: int = 0
    max_steps: int = 60
    checkpoint_every: int = 10
    kill_after: int = 25
    """0: never kill (the goodput suite kills from outside)."""


class AppState(Stateful):
    """Model + optimizer as one DCP item (the pattern of torch's and Ray Train's FSDP2 guides)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        msd, osd = get_state_dict(self.model, self.optimizer)
        return {"model": msd, "optim": osd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict["optim"])


class MLPRun(ShardedRun):
    """One rank's model shard, optimizer and data (the gloo process group must exist)."""

    def __init__(self, job: MLPJob = MLPJob()) -> None:
        self.job = job
        super().__init__(job.seed, lambda: MLP(job.n_blocks, job.dim, job.hidden))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=job.lr)
        self.data = GaussianSamples(job.num_samples, job.dim, job.seed)
        self.set_order(len(self.data), job.global_batch, job.seed)

    def step(self, step: int) -> float:
        """Optimizer step ``step`` (1-based); returns this rank's mean loss."""
        job = self.job
        return self.micro_step(step, job.global_batch, job.micro_batch, self._loss, float("inf"))

    def _loss(self, ids: list[int]) -> torch.Tensor:
        return mlp_loss(self.model, self.data.get_batch(ids), torch.device("cpu"))

    # ---- checkpoints (collective: every rank calls them) ---------------------------------
    def save(self, path: str) -> None:
        """DCP-save this rank's shards of model and optimizer under ``path``."""
        dcp.save({"app": AppState(self.model, self.optimizer)}, checkpoint_id=path)

    def load(self, path: str) -> None:
        """Restore model and optimizer from a DCP checkpoint at ``path``."""
        dcp.load({"app": AppState(self.model, self.optimizer)}, checkpoint_id=path)


class StepLog:
    """Rank 0's record of completed steps: ``step,unix_time,attempt`` lines (other ranks: no-op)."""

    def __init__(self, path: str, rank: int, attempt: int) -> None:
        self.path, self.rank, self.attempt = path, rank, attempt

    def completed(self, step: int) -> None:
        if self.rank != 0:
            return
        t = time.time()
        with open(self.path, "a") as f:
            f.write(f"{step},{t:.6f},{self.attempt}\n")
            f.flush()


def maybe_kill(step: int, rank: int, job: MLPJob, marker: str) -> None:
    """Rank 1 exits hard right after step ``job.kill_after``, the first time only."""
    if rank != 1 or job.kill_after <= 0 or step != job.kill_after:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"killed after step {step} at {time.time():.6f}\n".encode())
    os.close(fd)
    os._exit(1)


def next_attempt(path: str) -> int:
    """Count this start in ``path`` (rank 0 only) and return its 0-based number."""
    with open(path, "a+") as f:
        f.seek(0)
        n = len(f.read().splitlines())
        f.write(f"{time.time():.6f}\n")
    return n


def record_pid(workdir: str, rank: int) -> None:
    """Write this process's pid to ``<workdir>/pids/rank<rank>`` (atomically) for the harness."""
    d = os.path.join(workdir, "pids")
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".rank{rank}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, os.path.join(d, f"rank{rank}"))


def past_deadline(deadline: float | None, step: int, first_step: int, every: int = 10) -> bool:
    """Whether every rank should stop before ``step`` because ``deadline`` (unix time) passed.

    Collective: checked on the first step of an attempt and every ``every`` steps after
    it, as a MAX all-reduce of each rank's verdict, so that all ranks stop at the same
    step (a rank that stopped alone would leave the other in a collective).
    """
    if deadline is None or (step - first_step) % every:
        return False
    flag = torch.tensor([1.0 if time.time() >= deadline else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def prune_checkpoints(ckpt: str, keep: int, prefix: str = "step_") -> None:
    """Delete all but the ``keep`` newest ``<prefix>N`` folders of ``ckpt`` (``keep`` 0: keep all)."""
    if keep <= 0:
        return
    import shutil

    steps = sorted(int(n[len(prefix):]) for n in os.listdir(ckpt)
                   if n.startswith(prefix) and n[len(prefix):].isdigit())
    for s in steps[:-keep]:
        shutil.rmtree(os.path.join(ckpt, f"{prefix}{s}"), ignore_errors=True)
