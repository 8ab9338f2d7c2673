"""Evaluation on a training step (``train.eval_every_steps``), leaving the training state alone."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from raypod.config import JobConfig
from raypod.data.order import SampleOrder
from raypod.recipe import Recipe
from raypod.worker.parallel import autocast
from raypod.worker.steps import accumulate, micro_batches, split_loss


def eval_due(config: JobConfig, eval_data: Any, step: int) -> bool:
    """Whether step ``step`` is followed by an evaluation (every ``train.eval_every_steps``
    and the last step, when the recipe gives eval data)."""
    every = config.train.eval_every_steps
    return bool(every and eval_data is not None and len(eval_data)
                and (step % every == 0 or step == config.train.max_steps))


def evaluate(model: Any, recipe: Recipe, eval_data: Any, config: JobConfig, device: torch.device,
             rank: int, world_size: int) -> dict[str, Any]:
    """Evaluate the model after this step on the first ``train.eval_samples`` eval samples.

    Each rank takes its strided share in micro-batches (as many on every rank: FSDP2's
    forward has collectives), under ``torch.no_grad`` in eval mode; the RNG state and the
    module's mode are put back, so the training state is the same as without it.

    Returns:
        ``eval_sums`` (``loss`` and the recipe's eval metrics, summed over this rank's
        samples), ``eval_samples`` and ``eval_s``.
    """
    t0 = time.perf_counter()
    t = config.train
    n = min(len(eval_data), t.eval_samples)
    ids = SampleOrder.rank_share(np.arange(n, dtype=np.int64), rank, world_size)
    micros = micro_batches(np.arange(len(ids)), math.ceil(n / world_size), t.micro_batch)
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state() if device.type == "cuda" else None
    training = model.training
    sums: dict[str, torch.Tensor] = {}
    model.eval()
    try:
        with torch.no_grad():
            for chunk in micros:
                weight = float(len(chunk))
                part = ids[chunk] if len(chunk) else np.zeros(1, dtype=np.int64)  # weight 0: in step
                batch = eval_data.get_batch(part)
                with autocast(config.parallel, model, device):
                    loss, extra = split_loss(recipe.evaluate(model, batch, device))
                accumulate(sums, {"loss": loss, **extra}, weight)
    finally:
        model.train(training)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng)
    return {"eval_sums": {k: float(v.item()) for k, v in sums.items()}, "eval_samples": int(len(ids)),
            "eval_s": time.perf_counter() - t0}
