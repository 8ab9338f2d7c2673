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


def mlp_options(p: argparse.ArgumentParser, who: str) -> None:
    """The MLP anchors' options: ``--workdir``, ``--deadline``, ``--no-kill``, ``--fault`` (what
    ``who``, the faulting rank or worker, does after step 25) and ``--max-failures``."""
    p.add_argument("--workdir", required=True, help="step logs, attempt counters, kill marker, final digest")
    p.add_argument("--deadline", type=float, default=None, help="stop at this unix time (goodput suite)")
    p.add_argument("--no-kill", action="store_true", help="no built-in fault after step 25")
    p.add_argument("--fault", choices=("kill", "freeze"), default="kill",  # mlp_common.FAULTS (no torch here)
                   help=f"what {who} does after step 25: kill (os._exit) or freeze (SIGSTOP)")
    p.add_argument("--max-failures", type=int, default=2, help="FailureConfig.max_failures (-1: no limit)")


def mlp_config(args: argparse.Namespace) -> dict[str, Any]:
    """The train loop's config from :func:`mlp_options`' arguments (the work folder created)."""
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    return {"steps": args.steps, "workdir": workdir, "deadline": args.deadline, "no_kill": args.no_kill,
            "fault": args.fault}


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
