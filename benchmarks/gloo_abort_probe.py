"""Does gloo's own abort release a rank blocked in an FSDP2 collective with a stopped peer?

Three bare processes train two FSDP2 steps on a gloo group; rank 2 then stops itself
(SIGSTOP: its sockets stay open, nothing answers, as a dead NCCL peer or a hung kernel);
ranks 0 and 1 start the next forward (an all-gather that waits on rank 2) and, one second
later, a thread of theirs calls one of torch's own ways out on the default group:

- ``pg_abort``: ``ProcessGroup.abort()``;
- ``backend_abort``: ``abort()`` on its ``ProcessGroupGloo`` backend;
- ``shutdown``: ``shutdown()`` on that backend.

A rank released by it reports how long after the call its forward raised; the probe waits
25 s for the two answers. This is why raypod's :class:`~raypod.worker.group.GroupSession`
shuts the group's TCP connections down itself (2-6 ms), and why its gloo groups cannot
connect lazily (``TORCH_GLOO_LAZY_INIT``): a connection opened after the formation is one
the session never saw, and gloo's abort does not reach it either.

    .venv/bin/python benchmarks/gloo_abort_probe.py pg_abort|backend_abort|shutdown

Result (torch 2.13.0+cpu, 2026-12-02): none of the three released either rank within 25 s.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WAYS = ("pg_abort", "backend_abort", "shutdown")


def _rank(rank: int, port: int, how: str, out) -> None:  # noqa: ANN001 - a queue
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, 3, is_master=rank == 0, wait_for_workers=False,
                          timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=3, timeout=timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (3,))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(128, 128) for _ in range(4)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for _ in range(2):
        model(torch.randn(4, 128)).sum().backward()
    if rank == 2:
        os.kill(os.getpid(), signal.SIGSTOP)
    called: dict[str, float] = {}

    def way_out() -> None:
        time.sleep(1.0)
        called["t"] = time.monotonic()
        pg = dist.group.WORLD
        try:
            if how == "pg_abort":
                pg.abort()
            else:
                getattr(pg._get_backend(torch.device("cpu")), "abort" if how == "backend_abort" else "shutdown")()
        except Exception as e:  # noqa: BLE001 - reported
            out.put((rank, f"{how} raised {e!r}"[:120], None))

    threading.Thread(target=way_out, daemon=True).start()
    try:
        model(torch.randn(4, 128)).sum().backward()
        outcome = "returned"
    except Exception as e:  # noqa: BLE001 - the release
        outcome = f"raised {str(e)[:80]}"
    out.put((rank, outcome, round(time.monotonic() - called.get("t", 0.0), 3)))
    os._exit(0)


def main(how: str) -> int:
    if how not in WAYS:
        print(f"usage: gloo_abort_probe.py {'|'.join(WAYS)}")
        return 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, how, out)) for r in range(3)]
    for p in procs:
        p.start()
    try:
        for _ in range(2):
            print(how, *out.get(timeout=25), flush=True)
    except Exception:  # noqa: BLE001 - queue.Empty
        print(how, "no rank released within 25 s", flush=True)
    finally:
        for p in procs:
            os.kill(p.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
