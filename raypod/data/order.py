"""The seeded global sample order: which sample ids make up each step's batch.

Step ``s`` (1-based) of a job always consumes the same ``global_batch`` ids for a
given seed, whatever the world size, so the data position is just the step number
and resumes exactly after failures and resizes. Each epoch is a fresh permutation
seeded by ``(seed, epoch)``; the tail that does not fill a batch is dropped.
"""

from __future__ import annotations

import numpy as np


class SampleOrder:
    """Global sample ids per step.

    Args:
        num_samples: samples in the dataset.
        global_batch: samples per optimizer step.
        seed: the job's seed.
    """

    def __init__(self, num_samples: int, global_batch: int, seed: int) -> None:
        if num_samples < global_batch:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than train.global_batch ({global_batch})"
            )
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.seed = seed
        self.steps_per_epoch = num_samples // global_batch
        self._cache: tuple[int, np.ndarray] | None = None

    def _perm(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._cache = (epoch, rng.permutation(self.num_samples))
        return self._cache[1]

    def epoch_of(self, step: int) -> int:
        return (step - 1) // self.steps_per_epoch

    def ids(self, step: int) -> np.ndarray:
        """The ``global_batch`` sample ids of step ``step`` (1-based)."""
        epoch, pos = divmod(step - 1, self.steps_per_epoch)
        start = pos * self.global_batch
        return self._perm(epoch)[start : start + self.global_batch]

    @staticmethod
    def rank_share(ids: np.ndarray, rank: int, world_size: int) -> np.ndarray:
        """The ids that ``rank`` processes (strided, so shares differ by at most one)."""
        return ids[rank::world_size]
