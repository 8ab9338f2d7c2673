"""The scaling policy: how many ranks the next group gets, from what the cluster has."""

from __future__ import annotations

from dataclasses import dataclass

from raypod.config import ScalingConfig


@dataclass(frozen=True)
class ResizeDecision:
    """Start a group of ``num_workers`` ranks."""

    num_workers: int


@dataclass(frozen=True)
class WaitDecision:
    """Not enough resources yet for ``min_workers``: wait and ask again."""

    reason: str


def worker_bundle(cfg: ScalingConfig) -> dict[str, float]:
    """The Ray resources one rank reserves."""
    bundle = {k: float(v) for k, v in cfg.resources_per_worker.items() if v}
    if cfg.use_gpu:
        bundle["GPU"] = max(1.0, bundle.get("GPU", 0.0))
    return bundle


class ScalingPolicy:
    """Use as many ranks as fit, between ``min_workers`` and ``max_workers``."""

    def __init__(self, cfg: ScalingConfig, replicas: int = 1) -> None:
        self.cfg = cfg
        self.replicas = replicas
        self.bundle = worker_bundle(cfg)

    def fits(self, available: dict[str, float]) -> int:
        """How many bundles the free resources hold (by total; placement may still fail)."""
        counts = [int(available.get(k, 0.0) // v) for k, v in self.bundle.items() if v > 0]
        return min(counts) if counts else self.cfg.max_workers

    def decide(self, available: dict[str, float]) -> ResizeDecision | WaitDecision:
        n = min(self.cfg.max_workers, self.fits(available))
        n -= n % self.replicas  # HSDP needs whole replica groups
        if n < self.cfg.min_workers:
            return WaitDecision(
                f"the cluster has room for {max(n, 0)} ranks of {self.bundle}, "
                f"scaling.min_workers is {self.cfg.min_workers}"
            )
        return ResizeDecision(n)

    # ---- elastic decisions while running ----------------------------------------------
    def shrink_to(self, world_size: int, lost: int, spares: int) -> int | None:
        """The world size to continue at in place when ``lost`` ranks go and only ``spares``
        warm actors can replace them; ``None`` when the job must not shrink (below
        ``min_workers``, or HSDP, whose 2-D mesh resizes through the persistent checkpoint)."""
        n = world_size - lost + spares
        if self.replicas > 1 or n < self.cfg.min_workers or n < 1:
            return None
        return n

    def joiners_wanted(self, world_size: int, joining: int, available: dict[str, float]) -> int:
        """How many new actors to start now so the job can grow towards ``max_workers``."""
        if self.replicas > 1:
            return 0
        room = self.cfg.max_workers - world_size - joining
        return max(0, min(room, self.fits(available)))

