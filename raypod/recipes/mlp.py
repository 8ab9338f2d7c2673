"""The recovery benchmark's workload: a 4-block MLP on random normal inputs.

Exactly the work of issue 5's measurements, so raypod is timed on the same job as
the anchors (``raypod/bench/anchors/mlp_*.py`` build their model and data from this
module): 4 blocks of ``Linear(512→2048) → GELU → Linear(2048→512)`` applied in
sequence, loss = mean of the squared output, plain AdamW. Sample ``i`` is row ``i``
of an ``num_samples × dim`` standard-normal tensor drawn from one generator seeded
by the job's seed, so every rank (and every restart) sees the same sample for an id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from raypod.recipe import RankContext, Recipe


class MLPBlock(nn.Module):
    """``Linear(dim→hidden) → GELU → Linear(hidden→dim)``."""

    def __init__(self, dim: int = 512, hidden: int = 2048) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MLP(nn.Module):
    """``n_blocks`` :class:`MLPBlock` applied one after the other (``model.blocks``)."""

    def __init__(self, n_blocks: int = 4, dim: int = 512, hidden: int = 2048) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MLPBlock(dim, hidden) for _ in range(n_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class GaussianSamples:
    """``num_samples`` standard-normal vectors of size ``dim``; sample ``i`` is fixed by ``(seed, i)``.

    The whole table is drawn once, vectorised, from one generator seeded with ``seed``.
    """

    def __init__(self, num_samples: int, dim: int, seed: int) -> None:
        g = torch.Generator().manual_seed(int(seed))
        self.table = torch.randn(num_samples, dim, generator=g)

    def __len__(self) -> int:
        return self.table.shape[0]

    def get_batch(self, ids: Sequence[int]) -> torch.Tensor:
        return self.table[torch.as_tensor(list(ids), dtype=torch.long)]


def mlp_loss(model: nn.Module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Mean of the squared output."""
    return model(batch.to(device, non_blocking=True)).float().pow(2).mean()


class MLPRecipe(Recipe):
    """Issue 5's benchmark workload.

    Args:
        n_blocks, dim, hidden: the model's shape (defaults: 4, 512, 2048).
        num_samples: synthetic samples in the dataset.
    """

    def __init__(self, n_blocks: int = 4, dim: int = 512, hidden: int = 2048,
                 num_samples: int = 32768) -> None:
        self.n_blocks, self.dim, self.hidden = n_blocks, dim, hidden
        self.num_samples = num_samples

    def build_model(self, ctx: RankContext) -> nn.Module:
        return MLP(self.n_blocks, self.dim, self.hidden)

    def build_optimizer(self, model: nn.Module, ctx: RankContext) -> torch.optim.Optimizer:
        """Plain AdamW over every parameter (no weight-decay groups)."""
        return torch.optim.AdamW(model.parameters(), lr=ctx.config.train.lr)

    def build_data(self, ctx: RankContext) -> GaussianSamples:
        return GaussianSamples(self.num_samples, self.dim, ctx.config.train.seed)

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        return mlp_loss(model, batch, device)

    def tokens_per_sample(self) -> int:
        return 1

    def flops_per_token(self, model: nn.Module) -> float:
        """6 × the matmul parameters (forward + backward)."""
        return 6.0 * self.n_blocks * 2 * self.dim * self.hidden
