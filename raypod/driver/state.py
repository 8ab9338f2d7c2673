"""The driver's states. Each is a small value; the driver sets them in one place.

    SCHEDULING ──▶ RUNNING ──▶ FINISHING ──▶ FINISHED
        ▲             │
        └─ RECOVERING ◀┘  (failure, within the budget)
                      └──▶ ERRORED        (budget spent, or unrecoverable)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from raypod.driver.failures import Failure


class StateKind(enum.Enum):
    """What the driver is doing; ``is_terminal`` ends the loop."""

    SCHEDULING = "scheduling"
    RUNNING = "running"
    RECOVERING = "recovering"
    FINISHING = "finishing"
    FINISHED = "finished"
    ERRORED = "errored"

    @property
    def is_terminal(self) -> bool:
        return self in (StateKind.FINISHED, StateKind.ERRORED)


@dataclass(frozen=True)
class State:
    kind: ClassVar[StateKind]

    @property
    def name(self) -> str:
        return self.kind.value

    @property
    def is_terminal(self) -> bool:
        return self.kind.is_terminal


@dataclass(frozen=True)
class SchedulingState(State):
    """Place a new group (attempt ``attempt``) and restore state into it."""

    kind: ClassVar[StateKind] = StateKind.SCHEDULING
    attempt: int


@dataclass(frozen=True)
class RunningState(State):
    kind: ClassVar[StateKind] = StateKind.RUNNING


@dataclass(frozen=True)
class RecoveringState(State):
    """Tear the group down after ``failure`` and schedule the next one."""

    kind: ClassVar[StateKind] = StateKind.RECOVERING
    failure: Failure


@dataclass(frozen=True)
class FinishingState(State):
    """All steps done: wait for the last checkpoint, take the digest, close the group."""

    kind: ClassVar[StateKind] = StateKind.FINISHING


@dataclass(frozen=True)
class FinishedState(State):
    kind: ClassVar[StateKind] = StateKind.FINISHED


@dataclass(frozen=True)
class ErroredState(State):
    """The job failed; ``error`` is one sentence for the user."""

    kind: ClassVar[StateKind] = StateKind.ERRORED
    error: str
