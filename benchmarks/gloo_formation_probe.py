"""How long N bare processes take to form raypod's gloo groups, outside Ray.

The same formation a rank does when it joins (``raypod.worker.group.GroupSession``): the
default group, the checkpoint group, the replica exchange's groups and a 1-D device mesh,
through a ``TCPStore``; then one all-reduce and one all-gather. Two rounds, each on a fresh
store. The replica exchange is formed as ``links`` (raypod's
:class:`~raypod.worker.group.ReplicaLinks`: a two-rank group with each ring peer) or as
``group`` (a world-wide gloo group: raypod's layout before the links). Run with
``TORCH_GLOO_LAZY_INIT=1`` to see gloo's lazy pairs (connected on first use).

    .venv/bin/python benchmarks/gloo_formation_probe.py 32 [links|group]
    TORCH_GLOO_LAZY_INIT=1 .venv/bin/python benchmarks/gloo_formation_probe.py 32 group

Per round: the slowest rank's formation (wall, ``N`` processes sharing this machine's cores),
the most and the median CPU one rank's process spent forming (on a cluster each rank has
cores of its own), and the sockets one rank opened (median).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh


def _rank(rank: int, n: int, port: int, q: object, rounds: int, layout: str) -> None:
    from raypod.driver.topology import link_first
    from raypod.worker.group import ReplicaLinks, _sockets

    torch.set_num_threads(1)
    timeout = timedelta(seconds=120)
    for r in range(rounds):
        store = dist.TCPStore("127.0.0.1", port + r, n, rank == 0, timeout=timeout)
        store.set(f"ready{rank}", "1")
        store.wait([f"ready{i}" for i in range(n)])  # every process is up: time the formation only
        before = set(_sockets())
        t0, c0 = time.perf_counter(), time.process_time()
        dist.init_process_group("gloo", store=dist.PrefixStore("g", store), rank=rank, world_size=n)
        dist.new_group(backend="gloo")
        links = None  # kept until the round ends: a pair dropped at once closes under its peer's formation
        if layout == "group":
            dist.new_group(backend="gloo")
        else:
            links = ReplicaLinks(dist.PrefixStore("links", store), rank, ((rank + 1) % n, (rank - 1) % n),
                                 timeout, link_first([(i + 1) % n for i in range(n)])[rank])
        init_device_mesh("cpu", (n,), mesh_dim_names=("dp",))
        t1, cpu = time.perf_counter(), time.process_time() - c0
        opened = len(set(_sockets()) - before)
        dist.all_reduce(torch.ones(1000))
        dist.all_gather([torch.empty(10) for _ in range(n)], torch.ones(10))
        q.put((r, rank, t1 - t0, time.perf_counter() - t1, cpu, opened))  # type: ignore[attr-defined]
        dist.barrier()
        dist.destroy_process_group()
        del links


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    layout = sys.argv[2] if len(sys.argv) > 2 else "links"
    if layout not in ("links", "group"):
        raise SystemExit(f"layout {layout!r}: use links or group")
    rounds = 2
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    procs = [ctx.Process(target=_rank, args=(i, n, 29500 + n * 10, q, rounds, layout)) for i in range(n)]
    for p in procs:
        p.start()
    res = [q.get() for _ in range(n * rounds)]
    for p in procs:
        p.join()
    lazy = os.environ.get("TORCH_GLOO_LAZY_INIT", "0")
    for r in range(rounds):
        rows = [x for x in res if x[0] == r]
        cpu = [x[4] for x in rows]
        print(f"N={n} replica={layout} TORCH_GLOO_LAZY_INIT={lazy} round {r + 1}: formed in "
              f"{max(x[2] for x in rows):.3f} s (slowest rank), rank CPU max {max(cpu) * 1e3:.0f} ms "
              f"median {statistics.median(cpu) * 1e3:.0f} ms, sockets per rank "
              f"{statistics.median(x[5] for x in rows):.0f}; first all-reduce + all-gather "
              f"{max(x[3] for x in rows):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
