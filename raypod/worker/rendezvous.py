"""The job's rendezvous store, hosted by the driver's process.

Every group a job forms (its start, each in-place recovery, each resize) meets through one
TCP store. Its master lives in the driver, apart from the ranks: a rank's death, the common
failure, never takes the store with it, so the ranks that stay keep their connections to it
from one group to the next (each group works under a key prefix of its own,
:meth:`raypod.worker.actor.TrainWorker._store_for`) and a re-formation opens no store
connection on them, at any rank count. This is torchelastic's layout: the store in the agent
(here the driver, which already owns membership), not in a worker.

The store's server is torch's own (``TCPStore``, libuv), which serves from a thread of its
own without Python's lock, so a busy driver loop never delays a rendezvous. Hosting it in the
driver costs nothing at the job's start: the driver has torch imported already (the recipe's
pre-flight checks), where an actor of its own would import torch (about a second of CPU) on
the start's path, between the ranks' actors coming up and their rendezvous.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any


class RendezvousStore:
    """The master of the job's TCP store (see the module)."""

    def __init__(self) -> None:
        self._store: Any = None

    def open(self, world_size: int, timeout_s: float) -> tuple[str, int]:
        """Start the store on the first call; ``(node IP, port)`` it listens on.

        It listens before any rank tries to join, so no rank waits in the TCP client's
        connect-retry back-off."""
        import ray
        import torch.distributed as dist

        if self._store is None:
            self._store = dist.TCPStore("0.0.0.0", 0, world_size, is_master=True, wait_for_workers=False,
                                        timeout=timedelta(seconds=timeout_s))
        return ray.util.get_node_ip_address(), self._store.port

    @property
    def address(self) -> str:
        """``host:port`` the ranks reach the store at (once open)."""
        import ray

        return f"{ray.util.get_node_ip_address()}:{self._store.port}"

    def set(self, key: str, value: bytes) -> None:
        """Write ``key`` (from this process: the store's own client)."""
        self._store.set(key, value)

    def delete(self, key: str) -> None:
        self._store.delete_key(key)

    def close(self) -> None:
        """Stop listening (the server ends with the last reference to it); idempotent."""
        self._store = None
