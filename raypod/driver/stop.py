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
never waits for a new save, and the job's ending (summary, MLflow) is bounded by what is
left of that grace (:func:`time_left`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import Any

log = logging.getLogger("raypod.driver")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

STOP_MARGIN_S = 1.0
"""Of Ray's grace, what the driver keeps for itself after its callbacks (releasing the lease,
disconnecting from Ray, the interpreter's exit)."""

_stopped_at: float | None = None
"""``time.monotonic()`` of the first stop signal this process handled (a signal is the
process's, whichever :class:`StopSignals` recorded it)."""


def grace_s() -> float:
    """Seconds between ``ray job stop``'s SIGTERM and its SIGKILL: ``RAY_JOB_STOP_WAIT_TIME_S``
    (Ray's default, 3, when unset or not a number)."""
    try:
        return max(0.0, float(os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", "3")))
    except ValueError:
        return 3.0


def time_left() -> float | None:
    """Seconds a stopping driver may still spend on its ending (summary, tracking) before Ray's
    SIGKILL, keeping :data:`STOP_MARGIN_S` for the exit itself; None when no stop was received.

    A callback that waits at the job's end (the MLflow callback flushing its queue) bounds the
    wait by this; what it cannot send by then stays where the next run of the job finds it.
    """
    if _stopped_at is None:
        return None
    return max(0.0, _stopped_at + grace_s() - STOP_MARGIN_S - time.monotonic())


class StopRequested(KeyboardInterrupt):
    """Raised in the main thread by a stop signal outside the driver's training loop.

    A ``KeyboardInterrupt``, so that ``except Exception`` does not swallow it, and so that
    a wait inside Ray passes it on: ``ray.get`` and ``ray.wait`` run Python's signal
    handlers while they block and turn a ``KeyboardInterrupt`` into a fresh one, but
    drop any other exception a handler raises (Ray's ``check_signals``), which left a
    ``ray job stop`` during a recovery unanswered until Ray's SIGKILL. Catch
    ``KeyboardInterrupt`` and read the signal from :class:`StopSignals`.
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
        """Put back the handlers that were there before :meth:`install`; the stop, if any,
        is over (:func:`time_left` is None again for the process's next job)."""
        global _stopped_at
        _stopped_at = None
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
        global _stopped_at
        self.signum, self.received_at = signum, time.monotonic()
        if _stopped_at is None:
            _stopped_at = self.received_at
        log.info("%s received: stopping the job", signal_name(signum))
        if not self.deferred:
            raise StopRequested(signum)
