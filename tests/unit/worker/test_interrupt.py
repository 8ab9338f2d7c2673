"""PeerReplicator: a step waiting on a replica round that can no longer finish (its peer
is gone) is released by ``abort`` (the driver's interrupt), instead of blocking forever."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest
import torch

from raypod.worker.snapshot import PeerReplicator, SnapshotStore


def test_submit_raises_once_aborted_while_the_previous_round_hangs():
    rep = PeerReplicator(group=None, peer_to=1, peer_from=1)
    rep._last = Future()  # a round stuck on a dead peer: never finishes
    threading.Timer(0.3, rep.abort).start()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="abandoned"):
        rep.submit(7, [torch.zeros(4)], SnapshotStore())
    assert 0.25 < time.monotonic() - t0 < 2.0
    rep.close()


def test_submit_goes_on_after_a_failed_round():
    rep = PeerReplicator(group=None, peer_to=1, peer_from=1)
    failed: Future = Future()
    failed.set_exception(RuntimeError("Connection closed by peer"))
    rep._last = failed
    rep._exchange = lambda step, snap, store: None  # no group here: only the wait is tested
    assert rep.submit(3, [torch.zeros(4)], SnapshotStore()) < 0.5
    assert rep.wait_round(3, timeout=2.0)
    rep.close()


def _sync_rank(rank: int, port: int, out) -> None:  # noqa: ANN001 - a multiprocessing queue
    """Rank 2 dies, rank 1 stays alive but never joins the step's sync (its own collective
    broke on rank 2), rank 0 waits in the sync until the driver's interrupt releases it."""
    import os
    from datetime import timedelta
    from types import SimpleNamespace

    import torch.distributed as dist

    from raypod.worker.trainer import Trainer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3,
                            timeout=timedelta(seconds=60))
    dist.all_reduce(torch.zeros(1))  # every pair connected
    if rank == 2:
        os._exit(0)
    if rank == 1:
        time.sleep(8)
        os._exit(0)
    t = Trainer.__new__(Trainer)  # only what _wait_for_peers reads
    t.cfg = SimpleNamespace(fault=SimpleNamespace(straggler_factor=2.0))
    t.world_size, t.rank, t.broken = 3, 0, False
    threading.Timer(1.0, lambda: setattr(t, "broken", True)).start()  # the driver's interrupt
    t0 = time.monotonic()
    try:
        t._wait_for_peers()
        out.put(("returned", time.monotonic() - t0))
    except RuntimeError as e:
        out.put((str(e), time.monotonic() - t0))
    out.close()
    out.join_thread()  # the queue's feeder thread, before the hard exit
    os._exit(0)


def test_a_rank_waiting_for_a_peer_that_gave_up_is_released_by_the_interrupt():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_sync_rank, args=(r, port, out)) for r in range(3)]
    for p in procs:
        p.start()
    try:
        msg, took = out.get(timeout=60)
    finally:
        for p in procs:
            p.join(timeout=15)
            if p.is_alive():
                p.kill()
    assert "released by the driver" in msg, msg
    assert 0.9 < took < 3.0, took  # the interrupt at 1 s, not the group's 60 s timeout
