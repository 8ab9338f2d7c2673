"""Anchor: tiny.yaml's GPT under a Ray Train V2 ``TorchTrainer``, 3 steps.

    RAY_TRAIN_V2_ENABLED=1 python raypod/bench/anchors/ray_train_v2.py \
        --mark FILE --storage DIR [--name NAME]

Starts a local Ray (``ray.init()``), runs 2 CPU workers (Ray Train sets up the gloo
process group), reports every step with ``ray.train.report``. Rank 0 writes
``time.time()`` right after step 1's ``optimizer.step()`` to FILE.
"""

from __future__ import annotations

import os
import sys

from raypod.bench.anchors.ray_fit import fit, parser, v2_enabled


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    from raypod.bench.anchors.common import train

    train(config["steps"], config["mark"],
          report=lambda step, loss: ray.train.report({"step": step, "loss": loss}))


def main() -> int:
    p = parser(__doc__, "bench-startup-ray-train", 3)
    p.add_argument("--mark", required=True, help="file for the time of the first step (rank 0)")
    args = p.parse_args()
    if not v2_enabled("ray_train_v2.py"):
        return 2
    config = {"steps": args.steps, "mark": os.path.abspath(args.mark)}
    return fit("ray_train_v2.py", train_loop_per_worker, config, args.storage, args.name, address=None)


if __name__ == "__main__":
    sys.exit(main())
