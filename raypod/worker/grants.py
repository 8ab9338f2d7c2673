"""The steps the driver lets a rank run, read from the job's rendezvous store.

With step windows (``train.step_window``) the driver makes one call per rank per window
(:meth:`raypod.worker.actor.TrainWorker.train_window`) instead of one per step: the rank
trains in a loop of its own and streams each step's result back, so no step waits for a
call to be dispatched to it. What the driver still decides per step (which steps may run,
how far ahead of the last counted one, and whether each is snapshotted) it writes once per
step to the job's store, not once per rank (:class:`raypod.driver.windows.StepWindows`):
key ``<window key>/<step>`` holds ``b"1"`` (run it and snapshot it), ``b"0"`` (run it), or
``b"end"`` (the window ends before this step).

A rank reads the key of its next step before starting it: about 0.1 ms on the store's own
connection when the driver has granted it already, which it has while it keeps up (it grants
up to :data:`raypod.driver.ledger.STEPS_IN_FLIGHT` steps ahead of the last counted one). The
connection is this reader's own, not the one the group session forms groups over: a TCP
store client holds its lock while it waits for a key, and a rank waiting for a grant must
never hold up a group forming in its background (the checkpoint group).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

log = logging.getLogger("raypod.worker")

END = b"end"
"""A window's end marker (instead of a grant)."""
SLICE_S = 2.0
"""A wait for a grant is made of waits this long, between which ``stop`` is asked. The driver
ends a window with its end marker, which ends a wait at once; ``stop`` (the rank was
interrupted) is the fallback, and the store client logs a line for every slice that ends
without the key, so the slices are not short."""


def step_key(window_key: str, step: int) -> str:
    """The store key of ``step``'s grant in the window ``window_key``."""
    return f"{window_key}/{step}"


class StepGrants:
    """A rank's reader of its grants (see the module), kept from one group to the next."""

    def __init__(self, slice_s: float = SLICE_S) -> None:
        self._client: tuple[str, Any] | None = None
        """``(host:port, connection)`` to the job's store."""
        self.slice_s = slice_s

    def _store(self, address: str) -> Any:
        import torch.distributed as dist

        if self._client is None or self._client[0] != address:
            host, port = address.rsplit(":", 1)
            self._client = (address, dist.TCPStore(host, int(port), is_master=False, wait_for_workers=False,
                                                   timeout=timedelta(seconds=self.slice_s)))
        return self._client[1]

    def wait(self, address: str, window_key: str, step: int, stop: Callable[[], bool],
             warn_after_s: float) -> bool | None:
        """Wait for ``step``'s grant: its snapshot flag, or ``None`` when the window ends before
        it (the end marker, or ``stop()`` true: the rank was interrupted).

        A wait has no limit of its own: the driver ends every window it opened, and a rank
        whose window ended unseen would leave the driver's next grants with nobody to run them.
        A wait longer than ``warn_after_s`` is logged once (the driver is busy: a slow commit)."""
        key = step_key(window_key, step)
        warn_at: float | None = time.monotonic() + warn_after_s
        while True:
            try:
                value = self._store(address).get(key)
            except Exception as e:  # noqa: BLE001 - a slice without the grant, or the connection lost
                if "timeout" not in str(e).lower() and "timed out" not in str(e).lower():
                    log.warning("reading the grant of step %d: %s (connecting anew)", step, e)
                    self._client = None
                    time.sleep(0.1)
                if stop():
                    return None
                if warn_at is not None and time.monotonic() >= warn_at:
                    log.warning("no grant for step %d for %.0f s: still waiting for the driver", step, warn_after_s)
                    warn_at = None
                continue
            return None if value == END else value == b"1"
