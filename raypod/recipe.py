"""The user's side of a job: a recipe supplies model, optimizer, data and loss.

raypod owns the training loop (like torchtitan or Lightning), so it can re-run a
step, snapshot state and re-form the process group. A recipe only builds things.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # torch is imported where it is used, so Ray Data tasks importing raypod stay light
    import torch
    from torch import nn

    from raypod.config import JobConfig


@dataclass(frozen=True)
class RankContext:
    """What a recipe may need to know about the rank it is building for."""

    rank: int
    world_size: int
    device: torch.device
    config: JobConfig


class SampleSource(Protocol):
    """Map-style data: a fixed number of samples, fetched by id.

    raypod decides which ids each rank consumes at each step (seeded, per epoch), so
    the data position is part of the training state and resumes exactly. A source
    that also has ``stream(rank, world_size, order, first, last)`` (a Ray Data
    dataset of rows ``{step, ids, windows}``) and ``to_batch(windows)``, such as
    :class:`raypod.data.stream.TokenWindows`, is streamed to each rank through Ray
    Data instead (see :mod:`raypod.data.stream`).
    """

    def __len__(self) -> int: ...

    def get_batch(self, ids: Sequence[int]) -> Any:
        """Return the batch made of the samples ``ids`` (on CPU), sliceable along its first axis."""
        ...


class Recipe:
    """Base class for recipes. Subclass it and point ``recipe.target`` at the subclass.

    The constructor receives ``recipe.args`` as keyword arguments.
    """

    def check_data(self, config: JobConfig) -> None:
        """Runs once on the driver before Ray starts: quick checks of ``data.path``.

        Raise :class:`raypod.config.ConfigError` with one sentence for bad data.
        """

    def prepare_data(self, config: JobConfig) -> None:
        """Runs once on the driver, Ray connected, before any worker starts: prepare the data
        (for example tokenise it with Ray Data).

        Raise :class:`raypod.config.ConfigError` with one sentence for bad data.
        """

    def build_model(self, ctx: RankContext) -> nn.Module:
        """Build the full model on CPU (same seed on every rank); raypod shards it."""
        raise NotImplementedError

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """The modules FSDP2 wraps one by one (transformer blocks). Default: ``model.blocks``."""
        blocks = getattr(model, "blocks", None)
        return list(blocks) if blocks is not None else []

    def build_optimizer(self, model: nn.Module, ctx: RankContext) -> torch.optim.Optimizer:
        """Default: AdamW with ``train.lr`` and ``train.weight_decay`` (decay on matrices only)."""
        import torch

        t = ctx.config.train
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": t.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        fused = next(model.parameters()).is_cuda  # one kernel for the whole update on GPUs
        return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.95), fused=fused)

    def build_data(self, ctx: RankContext) -> SampleSource:
        """The training samples, addressable by id."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        """Mean loss over the samples of ``batch`` (move the batch to ``device`` here)."""
        raise NotImplementedError

    def tokens_per_sample(self) -> int:
        """Tokens in one sample, for tokens/s and MFU (1 for non-language models)."""
        return 1

    def flops_per_token(self, model: nn.Module) -> float:
        """Training FLOPs per token (for MFU); 0 when unknown."""
        return 0.0
