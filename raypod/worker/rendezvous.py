"""The job's rendezvous store, in a small actor of its own.

Every group a job forms (its start, each in-place recovery, each resize) meets through one
TCP store. It lives in :class:`RendezvousStore`, an actor that reserves no CPU and runs next
to the driver, apart from the ranks: a rank's death, the common failure, never takes the
store with it, so the ranks that stay keep their connections to it from one group to the
next (each group works under a key prefix of its own,
:meth:`raypod.worker.actor.TrainWorker._store_for`) and a re-formation opens no store
connection on them, at any rank count. This is torchelastic's layout (the store in the
agent, not in a worker). When the store's actor is lost (its node went), the driver starts
another one and every rank connects to it once.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import ray


class RendezvousStore:
    """The master of the job's TCP store (see the module)."""

    def __init__(self) -> None:
        self._store: Any = None

    def open(self, world_size: int, timeout_s: float) -> tuple[str, int]:
        """Start the store on the first call; ``(node IP, port)`` it listens on.

        It listens before any rank tries to join, so no rank waits in the TCP client's
        connect-retry back-off."""
        import torch.distributed as dist

        if self._store is None:
            self._store = dist.TCPStore("0.0.0.0", 0, world_size, is_master=True, wait_for_workers=False,
                                        timeout=timedelta(seconds=timeout_s))
        return ray.util.get_node_ip_address(), self._store.port


def remote_rendezvous_store(node_id: str | None) -> Any:
    """:class:`RendezvousStore` as an actor class: no CPU (it must start while the ranks hold
    every CPU), on node ``node_id`` (the driver's) and nowhere else.

    The affinity is hard: a soft one lets Ray place the store on any node when the driver's
    raylet is slow to take it (a loaded host), and a store on a rank's node is lost with that
    node, together with the re-formation that needed it (and a new one may land on the node
    that just failed, before Ray has marked it dead). The driver's node needs no free CPU for
    it, and losing that node ends the job anyway."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    strategy = NodeAffinitySchedulingStrategy(node_id, soft=False) if node_id else "DEFAULT"
    return ray.remote(max_restarts=0, max_task_retries=0)(RendezvousStore).options(
        num_cpus=0, scheduling_strategy=strategy)
