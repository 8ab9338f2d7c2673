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
