"""PeerReplicator.take_acked: the rounds that completed since the rank's last result, for the
result to carry (the driver's replica acknowledgement); never blocks, never a failed round."""

from __future__ import annotations

import threading
import time
import types
from collections import deque

import pytest
import torch

from raypod.worker.snapshot import PeerReplicator, SnapshotStore


class _Loopback:
    """Replica links (:class:`~raypod.worker.group.ReplicaLinks`) for a rank that is its own
    peer: what is sent is what the next receive gets."""

    def __init__(self) -> None:
        self.sent: deque[torch.Tensor] = deque()

    def isend(self, tensor: torch.Tensor, dst: int) -> types.SimpleNamespace:
        self.sent.append(tensor.clone())
        return types.SimpleNamespace(wait=lambda: None)

    def irecv(self, tensor: torch.Tensor, src: int) -> types.SimpleNamespace:
        tensor.copy_(self.sent.popleft())
        return types.SimpleNamespace(wait=lambda: None)


@pytest.fixture
def loopback():
    return _Loopback()


def test_completed_rounds_are_taken_once_and_a_failed_round_never(loopback):
    gate, store = threading.Event(), SnapshotStore()

    def on_round(step: int) -> None:
        if step == 3:
            raise RuntimeError("peer lost")
        if step == 4:
            gate.wait(5.0)

    rep = PeerReplicator(group=loopback, peer_to=0, peer_from=0, on_round=on_round)
    for step in (1, 2):
        rep.submit(step, [torch.full((4,), float(step))], store)
    assert rep.wait_round(2, timeout=5.0)
    assert rep.take_acked() == [1, 2] and rep.take_acked() == []
    rep.submit(3, [torch.zeros(4)], store)
    assert not rep.wait_round(3, timeout=5.0)
    rep.submit(4, [torch.zeros(4)], store)  # held in its round by the gate
    t0 = time.monotonic()
    assert rep.take_acked() == [] and time.monotonic() - t0 < 0.5  # in flight: not waited for
    gate.set()
    assert rep.wait_round(4, timeout=5.0)
    assert rep.take_acked() == [4]  # step 3's round failed: never acknowledged
    assert store.report().replicas == {0: [1, 2, 4]}
    rep.close()
