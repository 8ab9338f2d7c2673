"""What went wrong in a worker group, and the policy that decides what to do about it."""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class Failure:
    """A failure seen by the driver.

    Attributes:
        kind: ``kill`` / ``exception`` / ``freeze`` / ... for injected faults, else
            ``worker_died``, ``exception``, ``hang``, ``unresponsive`` (a rank silent for
            ``fault.silent_s``), ``setup_failed``, ``scheduling`` or ``storage`` (a write to
            ``checkpoint.storage`` failed for good: full, over quota, read-only; never retried).
        rank: the rank at fault, when known.
        step: the step that was running.
        message: one line for the user.
        time_s: seconds since job start when the driver noticed.
        retryable: False for errors a restart cannot fix (bad recipe code, bad data).
    """

    kind: str
    rank: int | None
    step: int
    message: str
    time_s: float
    retryable: bool = True


class FailureDecision(enum.Enum):
    RETRY = "retry"
    RAISE = "raise"


class FailurePolicy:
    """Retry up to ``max_failures`` recoveries, then fail the job.

    A failure that is not retryable, and a storage failure (re-forming the group
    cannot make room on the storage), fails the job at once.
    """

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures

    def decide(self, failure: Failure, failures_so_far: int) -> FailureDecision:
        """``failures_so_far`` counts this one."""
        if not failure.retryable or failure.kind == "storage" or failures_so_far > self.max_failures:
            return FailureDecision.RAISE
        return FailureDecision.RETRY
