"""The work both anchors do, shared so that it is literally the same code.

It mirrors what a raypod rank does for ``jobs/configs/tiny.yaml``
(:class:`raypod.worker.trainer.Trainer` with :class:`raypod.recipes.gpt.GPTRecipe`):
the same GPT, FSDP2 ``fully_shard`` per block and then the root on a 1-D CPU mesh
(fp32 on CPU), AdamW with decay on matrices only, the same seeded sample order,
linear warm-up, gradient clipping, and the per-rank micro-batches. Only process-group
setup differs: the launcher (torchrun or Ray Train) has already initialised gloo.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from raypod.data.corpus import ByteTokenSamples
from raypod.data.order import SampleOrder
from raypod.models.gpt import GPT, GPTConfig

CORPUS = "~/.cache/raypod/data/stdlib_corpus.parquet"


@dataclass(frozen=True)
class TinyJob:
    """``jobs/configs/tiny.yaml``, as the anchors need it."""

    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    seq_len: int = 128
    global_batch: int = 16
    micro_batch: int = 8
    lr: float = 3e-3
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    data_path: str = CORPUS


class Run:
    """One rank's model shard, optimizer and data (the process group must exist)."""

    def __init__(self, job: TinyJob = TinyJob()) -> None:
        self.job = job
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cpu")
        mesh = init_device_mesh("cpu", (self.world_size,), mesh_dim_names=("dp",))
        torch.manual_seed(job.seed)
        model = GPT(GPTConfig(n_layer=job.n_layer, n_head=job.n_head, n_embd=job.n_embd,
                              seq_len=job.seq_len))
        mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        self.model: nn.Module = model
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": job.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=job.lr, betas=(0.9, 0.95), fused=False)
        self.data = ByteTokenSamples(job.data_path, job.seq_len)
        self.order = SampleOrder(len(self.data), job.global_batch, job.seed)
        self.per_rank_max = math.ceil(job.global_batch / self.world_size)

    def step(self, step: int) -> float:
        """Optimizer step ``step`` (1-based); returns this rank's mean loss."""
        job = self.job
        ids = SampleOrder.rank_share(self.order.ids(step), self.rank, self.world_size)
        n_micro = max(1, math.ceil(self.per_rank_max / job.micro_batch))
        micros = [ids[i * job.micro_batch:(i + 1) * job.micro_batch] for i in range(n_micro)]
        scale = self.world_size / job.global_batch
        lr = job.lr * step / job.warmup_steps if step <= job.warmup_steps else job.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum, seen = 0.0, 0
        for i, chunk in enumerate(micros):
            weight = float(len(chunk))
            if len(chunk) == 0:
                chunk, weight = self.order.ids(step)[:1], 0.0
            self.model.set_requires_gradient_sync(i == len(micros) - 1)
            batch = self.data.get_batch(chunk.tolist())
            x, y = batch[:, :-1], batch[:, 1:]
            logits = self.model(x)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
            (loss * (weight * scale)).backward()
            loss_sum += float(loss.detach()) * weight
            seen += int(weight)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), job.grad_clip)
        if hasattr(norm, "full_tensor"):
            norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / max(1, seen)


def write_mark(path: str, t: float) -> None:
    """Write ``t`` (unix seconds) to ``path`` atomically."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(repr(t))
    os.replace(tmp, path)


def train(steps: int, mark: str | None, report=None) -> None:  # noqa: ANN001
    """Build, then run ``steps`` steps; rank 0 writes the time of step 1's ``optimizer.step()``.

    ``report(step, loss)`` is called after every step on every rank when given.
    """
    run = Run()
    for s in range(1, steps + 1):
        loss = run.step(s)
        if s == 1 and run.rank == 0 and mark:
            write_mark(mark, time.time())
        if report is not None:
            report(s, loss)
