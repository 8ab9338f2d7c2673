"""Anchor: tiny.yaml's GPT under a Ray Train V2 ``TorchTrainer``, 3 steps.

    RAY_TRAIN_V2_ENABLED=1 python raypod/bench/anchors/ray_train_v2.py \
        --mark FILE --storage DIR [--name NAME]

Starts a local Ray (``ray.init()``), runs 2 CPU workers (Ray Train sets up the gloo
process group), reports every step with ``ray.train.report``. Rank 0 writes
``time.time()`` right after step 1's ``optimizer.step()`` to FILE.
"""

from __future__ import annotations

import argparse
import os
import sys


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    from raypod.bench.anchors.common import train

    train(config["steps"], config["mark"],
          report=lambda step, loss: ray.train.report({"step": step, "loss": loss}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mark", required=True, help="file for the time of the first step (rank 0)")
    p.add_argument("--storage", required=True, help="RunConfig.storage_path")
    p.add_argument("--name", default="bench-startup-ray-train")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    if os.environ.get("RAY_TRAIN_V2_ENABLED") != "1":
        print("ray_train_v2.py: set RAY_TRAIN_V2_ENABLED=1", file=sys.stderr)
        return 2

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init()
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"steps": args.steps, "mark": os.path.abspath(args.mark)},
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
            run_config=RunConfig(storage_path=os.path.abspath(args.storage), name=args.name),
        )
        result = trainer.fit()
        if getattr(result, "error", None) is not None:
            print(f"ray_train_v2.py: training failed: {result.error}", file=sys.stderr)
            return 1
        print("ray_train_v2.py: done")
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
