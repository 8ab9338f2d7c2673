"""The part of a raypod rank's work every anchor repeats: FSDP2 on a CPU mesh and a micro-batched step.

:class:`ShardedRun` shards a model's ``blocks`` and then the root with ``fully_shard`` on
a 1-D CPU mesh in fp32, as :mod:`raypod.worker.parallel` does for a CPU job, and
:meth:`ShardedRun.micro_step` is the rank's step: its share of the global batch (the
same seeded :class:`~raypod.data.order.SampleOrder`), cut into micro-batches with the
gradient sync on the last only, each loss weighted by its samples, the global gradient
norm, ``optimizer.step()``. The GPT (:mod:`.common`) and MLP (:mod:`.mlp_common`) anchors
differ only in the model, the loss of a micro-batch, the learning rate and the clip.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from raypod.data.order import SampleOrder


class ShardedRun:
    """One rank's FSDP2-sharded model (the gloo process group must exist)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    order: SampleOrder

    def __init__(self, seed: int, build: Callable[[], nn.Module]) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        mesh = init_device_mesh("cpu", (self.world_size,), mesh_dim_names=("dp",))
        torch.manual_seed(seed)
        model = build()
        mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        self.model = model

    def micro_step(self, step: int, global_batch: int, micro_batch: int,
                   loss_of: Callable[[list[int]], torch.Tensor], clip: float) -> float:
        """Optimizer step ``step`` (1-based) with ``loss_of(sample ids)`` per micro-batch; returns
        this rank's mean loss."""
        ids = SampleOrder.rank_share(self.order.ids(step), self.rank, self.world_size)
        n_micro = max(1, math.ceil(self.per_rank_max / micro_batch))
        micros = [ids[i * micro_batch:(i + 1) * micro_batch] for i in range(n_micro)]
        scale = self.world_size / global_batch
        loss_sum, seen = 0.0, 0
        for i, chunk in enumerate(micros):
            weight = float(len(chunk))
            if len(chunk) == 0:
                chunk, weight = self.order.ids(step)[:1], 0.0
            self.model.set_requires_gradient_sync(i == len(micros) - 1)
            loss = loss_of(chunk.tolist())
            (loss * (weight * scale)).backward()
            loss_sum += float(loss.detach()) * weight
            seen += int(weight)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if hasattr(norm, "full_tensor"):
            norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / max(1, seen)

    def set_order(self, num_samples: int, global_batch: int, seed: int) -> None:
        """The seeded sample order over ``num_samples`` and this rank's largest share of a batch."""
        self.order = SampleOrder(num_samples, global_batch, seed)
        self.per_rank_max = math.ceil(global_batch / self.world_size)
