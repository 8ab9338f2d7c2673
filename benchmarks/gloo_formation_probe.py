"""How long N bare processes take to form raypod's gloo groups, outside Ray.

The same formation a rank does when it joins (``raypod.worker.group.GroupSession``): the
default group, two more gloo groups (checkpoint, replica) and a 1-D device mesh, through a
``TCPStore``; then one all-reduce and one all-gather. Two rounds, each on a fresh store.
Run with ``TORCH_GLOO_LAZY_INIT=1`` to see gloo's lazy pairs (connected on first use).

    .venv/bin/python benchmarks/gloo_formation_probe.py 32
    TORCH_GLOO_LAZY_INIT=1 .venv/bin/python benchmarks/gloo_formation_probe.py 32
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh


def _rank(rank: int, n: int, port: int, q: object, rounds: int) -> None:
    torch.set_num_threads(1)
    for r in range(rounds):
        store = dist.TCPStore("127.0.0.1", port + r, n, rank == 0, timeout=timedelta(seconds=120))
        store.set(f"ready{rank}", "1")
        store.wait([f"ready{i}" for i in range(n)])  # every process is up: time the formation only
        t0 = time.perf_counter()
        dist.init_process_group("gloo", store=dist.PrefixStore("g", store), rank=rank, world_size=n)
        dist.new_group(backend="gloo")
        dist.new_group(backend="gloo")
        init_device_mesh("cpu", (n,), mesh_dim_names=("dp",))
        t1 = time.perf_counter()
        dist.all_reduce(torch.ones(1000))
        dist.all_gather([torch.empty(10) for _ in range(n)], torch.ones(10))
        q.put((r, rank, t1 - t0, time.perf_counter() - t1))  # type: ignore[attr-defined]
        dist.destroy_process_group()


def main() -> int:
    n, rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 8, 2
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    procs = [ctx.Process(target=_rank, args=(i, n, 29500 + n * 10, q, rounds)) for i in range(n)]
    for p in procs:
        p.start()
    res = [q.get() for _ in range(n * rounds)]
    for p in procs:
        p.join()
    lazy = os.environ.get("TORCH_GLOO_LAZY_INIT", "0")
    for r in range(rounds):
        rows = [x for x in res if x[0] == r]
        print(f"N={n} TORCH_GLOO_LAZY_INIT={lazy} round {r + 1}: formed in {max(x[2] for x in rows):.3f} s "
              f"(slowest rank), first all-reduce + all-gather {max(x[3] for x in rows):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
