"""The arithmetic of one optimizer step, shared by training and evaluation (no state).

The learning-rate schedule (:func:`lr_at`), the split of a rank's share into micro-batches
that keeps every rank's collectives in step (:func:`micro_batches`), row slices of a
recipe's batch (:func:`batch_rows`), and how a recipe's loss and metrics are read
(:func:`split_loss`, :func:`accumulate`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from raypod.config import TrainConfig


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


def batch_rows(batch: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a batch (a tensor, array or list, or a dict/tuple of them)."""
    if isinstance(batch, dict):
        return {k: batch_rows(v, start, stop) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return type(batch)(batch_rows(v, start, stop) for v in batch)
    return batch[start:stop]


def split_loss(out: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """A recipe's ``loss``/``evaluate`` result as ``(loss, extra metrics)``."""
    if isinstance(out, tuple):
        loss, extra = out
        return loss, dict(extra or {})
    return out, {}


def accumulate(sums: dict[str, torch.Tensor], values: dict[str, Any], weight: float) -> None:
    """Add ``value * weight`` to ``sums[name]`` for each metric (kept on the device: no sync)."""
    for name, value in values.items():
        v = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        sums[name] = sums[name] + v * weight if name in sums else v * weight


def clip_grads(model: torch.nn.Module, grad_clip: float) -> float:
    """Clip the gradients' global norm to ``grad_clip`` (0: no clipping); returns the norm before."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm.item())
