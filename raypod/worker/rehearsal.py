"""A spare's rehearsal: one training step on a one-rank group of its own, while it waits.

When the spare then takes a rank, its first step does not pay for the process's first
FSDP2 wrap, DTensor dispatch, autograd and optimizer kernels.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.distributed as dist

from raypod.config import JobConfig
from raypod.recipe import RankContext, Recipe
from raypod.worker import snapshot
from raypod.worker.group import GroupSession
from raypod.worker.parallel import autocast, build_mesh, parallelize, to_empty
from raypod.worker.steps import split_loss

log = logging.getLogger("raypod.worker")


def rehearse(config: JobConfig, recipe: Recipe, data: Any, device: torch.device,
             max_state_bytes: float = 4 * 2**30) -> float:
    """Run one training step on a one-rank group of this process's own, then drop it.

    The model is the recipe's own (built on the meta device, given storage after sharding,
    never initialised: only the code paths matter). Skipped when the process is in a group
    already, or when the whole model and optimizer state would take more than
    ``max_state_bytes``.

    Returns:
        Seconds spent (0 when skipped).
    """
    if dist.is_initialized():
        return 0.0
    t0 = time.perf_counter()
    ctx = RankContext(rank=0, world_size=1, device=device, config=config)
    with torch.device("meta"):
        model = recipe.build_model(ctx)
    state_bytes = sum(p.numel() * p.element_size() * 4 for p in model.parameters())
    if state_bytes > max_state_bytes or next(model.buffers(), None) is not None:
        return 0.0
    groups = GroupSession(device)
    mesh = groups.configure(dist.HashStore(), 0, 1, config.fault.pg_timeout_s,
                            lambda n: build_mesh(config.parallel, n, device))
    try:
        model = parallelize(model, recipe.shard_units(model), config.parallel, mesh, device, shard_alone=True)
        to_empty(model, device)
        optimizer = recipe.build_optimizer(model, ctx)
        batch = data.get_batch([0])
        with autocast(config.parallel, model, device):
            split_loss(recipe.loss(model, batch, device))[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        snapshot.take(model, optimizer)
    except Exception as e:  # noqa: BLE001 - a rehearsal that fails only costs the warm-up
        log.info("rehearsal step skipped: %s: %s", type(e).__name__, e)
    finally:
        groups.leave()
    return time.perf_counter() - t0
