"""Anchor: tiny.yaml's GPT under ``torchrun`` (gloo), 3 steps.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        raypod/bench/anchors/torchrun_gpt.py --mark FILE

Rank 0 writes ``time.time()`` right after step 1's ``optimizer.step()`` to FILE.
"""

from __future__ import annotations

import argparse

import torch.distributed as dist

from raypod.bench.anchors.common import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mark", required=True, help="file for the time of the first step (rank 0)")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    dist.init_process_group("gloo")
    try:
        train(args.steps, args.mark)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
