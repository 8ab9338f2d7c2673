"""A user's stop: SIGTERM (``ray job stop``) or SIGINT (Ctrl-C) to the driver.

A stop is a first-class ending, not a failure: the driver abandons the steps in
flight, commits a persistent save that every rank already finished, writes
``summary.json`` with ``"status": "stopped"`` and a ``stop`` event, ends the MLflow
run as ``KILLED`` and exits with ``128 + signal`` (143 for SIGTERM, 130 for SIGINT).

The handler only records the signal. While the driver is in its training loop
(:attr:`StopSignals.deferred`), the loop sees the request at its next iteration
(it polls every 50 ms); elsewhere (placing workers, recovering, before the driver
starts) the handler raises :class:`StopRequested` in the main thread, like Ctrl-C
raises ``KeyboardInterrupt``. ``ray job stop`` sends SIGKILL
``RAY_JOB_STOP_WAIT_TIME_S`` (3 by default) seconds after SIGTERM, so the stop path
never waits for a new save.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

log = logging.getLogger("raypod.driver")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(BaseException):
    """Raised in the main thread by a stop signal outside the driver's training loop.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that ``except Exception`` does
    not swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal_name(signum)}")
        self.signum = signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code(signum: int) -> int:
    """The conventional exit status of a process ended by ``signum``: ``128 + signum``."""
    return 128 + int(signum)


class StopSignals:
    """Records a stop signal for the driver; install in the main thread.

    Attributes:
        signum: the first stop signal received, or None.
        deferred: True while the driver's loop checks :attr:`requested` itself; the
            handler then only records the signal.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.received_at: float | None = None
        self.deferred = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal_name(self.signum) if self.signum is not None else ""

    def install(self) -> StopSignals:
        """Handle SIGTERM and SIGINT from now on (no-op outside the main thread).

        Call it after ``ray.init``, which sets a SIGTERM handler of its own.
        """
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in STOP_SIGNALS:
            old = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, old)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, old in self._previous.items():
            try:
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
            except (TypeError, ValueError):
                pass
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT and not self.deferred:
                raise KeyboardInterrupt  # a second Ctrl-C while stopping: the user insists
            log.warning("%s received again; the driver is already stopping", signal_name(signum))
            return
        self.signum, self.received_at = signum, time.monotonic()
        log.info("%s received: stopping the job", signal_name(signum))
        if not self.deferred:
            raise StopRequested(signum)
