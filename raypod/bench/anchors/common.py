"""The work both anchors do, shared so that it is literally the same code.

It mirrors what a raypod rank does for ``jobs/configs/tiny.yaml``
(:class:`raypod.worker.trainer.Trainer` with :class:`raypod.recipes.gpt.GPTRecipe`):
the same GPT, FSDP2 ``fully_shard`` per block and then the root on a 1-D CPU mesh
(fp32 on CPU), AdamW with decay on matrices only, the same seeded sample order,
linear warm-up, gradient clipping, and the per-rank micro-batches. Only process-group
setup differs: the launcher (torchrun or Ray Train) has already initialised gloo.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raypod.bench.anchors.sharded import ShardedRun
from raypod.data.corpus import ByteTokenSamples
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


class Run(ShardedRun):
    """One rank's model shard, optimizer and data (the process group must exist)."""

    def __init__(self, job: TinyJob = TinyJob()) -> None:
        self.job = job
        self.device = torch.device("cpu")
        super().__init__(job.seed, lambda: GPT(GPTConfig(n_layer=job.n_layer, n_head=job.n_head,
                                                         n_embd=job.n_embd, seq_len=job.seq_len)))
        model = self.model
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": job.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=job.lr, betas=(0.9, 0.95), fused=False)
        self.data = ByteTokenSamples(job.data_path, job.seq_len)
        self.set_order(len(self.data), job.global_batch, job.seed)

    def step(self, step: int) -> float:
        """Optimizer step ``step`` (1-based); returns this rank's mean loss."""
        job = self.job
        lr = job.lr * step / job.warmup_steps if step <= job.warmup_steps else job.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return self.micro_step(step, job.global_batch, job.micro_batch, self._loss, job.grad_clip)

    def _loss(self, ids: list[int]) -> torch.Tensor:
        batch = self.data.get_batch(ids)
        x, y = batch[:, :-1], batch[:, 1:]
        logits = self.model(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


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
