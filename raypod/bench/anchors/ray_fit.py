"""How every Ray Train V2 anchor starts: check V2 is on, fit a ``TorchTrainer`` on 2 CPU workers.

Shared by :mod:`ray_train_v2`, :mod:`mlp_ray_train` and :mod:`mlp_ray_train_steps`, so
that the three launch Ray Train the same way and differ only in their training loop,
their ``train_loop_config`` and their ``RunConfig`` extras (failure and checkpoint
policies).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any


def parser(description: str, name: str, steps: int) -> argparse.ArgumentParser:
    """An anchor's parser with the options every Ray Train anchor has: ``--storage``, ``--name``,
    ``--steps``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--storage", required=True, help="RunConfig.storage_path")
    p.add_argument("--name", default=name)
    p.add_argument("--steps", type=int, default=steps)
    return p


def v2_enabled(prog: str) -> bool:
    """Whether ``RAY_TRAIN_V2_ENABLED=1`` is set (else say so on stderr)."""
    if os.environ.get("RAY_TRAIN_V2_ENABLED") != "1":
        print(f"{prog}: set RAY_TRAIN_V2_ENABLED=1", file=sys.stderr)
        return False
    return True


def fit(prog: str, loop: Callable[[dict], None], config: dict[str, Any], storage: str, name: str,
        address: str | None = "local", **run_config: Any) -> int:
    """Run ``loop`` on 2 CPU workers under a ``TorchTrainer``; exit code 0 when it finished.

    Args:
        prog: the script's name, for its messages.
        config: the ``train_loop_config``.
        storage: ``RunConfig.storage_path``.
        name: ``RunConfig.name``.
        address: ``ray.init``'s (``"local"``: a private local Ray, never some other cluster on
            the machine; None: Ray's default).
        run_config: more ``RunConfig`` arguments (``failure_config``, ``checkpoint_config``).
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(address=address)
    try:
        trainer = TorchTrainer(
            loop,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
            run_config=RunConfig(storage_path=os.path.abspath(storage), name=name, **run_config),
        )
        result = trainer.fit()
        if getattr(result, "error", None) is not None:
            print(f"{prog}: training failed: {result.error}", file=sys.stderr)
            return 1
        print(f"{prog}: done")
    finally:
        ray.shutdown()
    return 0
