"""What the worker group's calls give back to the driver, in plain Python (no Ray).

:class:`PollResult` (what arrived from the ranks since the last poll) and
:class:`GroupStartError` (a group that could not be placed, set up or re-formed) are
what the driver's modules handle; they live apart from :mod:`raypod.driver.worker_group`
so that the driver's decisions, and the tests' fake group, need not import Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raypod.protocol import ErrorKind, StepResult, WorkerError


@dataclass
class PollResult:
    """What arrived from the ranks since the last poll."""

    steps: list[StepResult] = field(default_factory=list)
    """Per-rank ``train_step`` results."""
    saved: list[tuple[int, list[int]]] = field(default_factory=list)
    """``(rank, [steps whose save finished])``."""
    errors: list[WorkerError] = field(default_factory=list)
    replicated: list[tuple[int, int, bool]] = field(default_factory=list)
    """``(rank, step, ok)``: the rank's snapshot of ``step`` reached its replica holder."""


class GroupStartError(RuntimeError):
    """The group could not be placed, set up or re-formed.

    ``kind`` is ``setup_failed`` (the default), ``scheduling`` (placement timed out) or the
    :class:`~raypod.protocol.ErrorKind` of the rank call that failed (equal to its string).
    """

    def __init__(self, message: str, kind: ErrorKind | str = "setup_failed", rank: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.rank = rank
