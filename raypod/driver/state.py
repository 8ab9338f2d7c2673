"""The driver's states. Each is a small value; the driver sets them in one place.

    SCHEDULING ──▶ RUNNING ──▶ FINISHING ──▶ FINISHED
        ▲             │ ▲
        └─ RECOVERING ◀┘ ├── ROLLING_BACK  (NaN or spiking loss: back one snapshot, skip the batch)
                      │  └── HANDING_OVER  (preempted, draining or straggling rank: replaced, no lost step)
                      └──▶ ERRORED        (budget spent, or unrecoverable)
    any non-terminal state ──▶ STOPPED           (a user's stop: SIGTERM / ``ray job stop``, Ctrl-C)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from raypod.policies.failures import Failure


class StateKind(enum.Enum):
    """What the driver is doing; ``is_terminal`` ends the loop."""

    SCHEDULING = "scheduling"
    RUNNING = "running"
    RECOVERING = "recovering"
    ROLLING_BACK = "rolling_back"
    HANDING_OVER = "handing_over"
    FINISHING = "finishing"
    FINISHED = "finished"
    ERRORED = "errored"
    STOPPED = "stopped"

    @property
    def is_terminal(self) -> bool:
        return self in (StateKind.FINISHED, StateKind.ERRORED, StateKind.STOPPED)


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
class RollingBackState(State):
    """Step ``step`` had a bad loss (``reason``: ``nan`` or ``loss_spike``): every rank goes
    back to its last in-memory snapshot before it and the step's batch is skipped."""

    kind: ClassVar[StateKind] = StateKind.ROLLING_BACK
    step: int
    reason: str
    loss: float
    time_s: float


@dataclass(frozen=True)
class HandingOverState(State):
    """``ranks`` must leave (``reason``: ``preempt``, ``drain`` or ``straggler``) but still
    work: let the steps in flight finish, make their replicas current, replace them."""

    kind: ClassVar[StateKind] = StateKind.HANDING_OVER
    ranks: tuple[int, ...]
    reason: str
    step: int
    time_s: float
    message: str = ""


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


@dataclass(frozen=True)
class StoppedState(State):
    """A user stopped the job (``signal``: ``SIGTERM`` or ``SIGINT``) after step ``step``;
    not a failure."""

    kind: ClassVar[StateKind] = StateKind.STOPPED
    signal: str
    step: int
