"""Driver-side hooks, named ``before_*`` / ``after_*`` by where they fire.

Progress printing, MLflow tracking and the job summary are callbacks; the driver
calls them and never depends on what they do. A callback that raises is logged and
dropped, so a broken hook never stops training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raypod.config import JobConfig


@dataclass
class JobInfo:
    """What callbacks know about the job when it starts."""

    config: JobConfig
    job_dir: str
    """``<checkpoint.storage>/<name>`` (local path or URI)."""
    start_time: float
    """``time.time()`` at driver start; event times are seconds since this."""
    start_step: int = 0
    """The step the job resumes after (0 for a fresh job)."""


@dataclass
class StepReport:
    """One completed optimizer step, aggregated over the ranks."""

    step: int
    metrics: dict[str, float]
    """``loss``, ``lr``, ``grad_norm``, ``step_time_s``, ``samples_per_s``,
    ``tokens_per_s``, ``world_size``, ``goodput``, ..."""
    time_s: float
    """Seconds since job start when the driver saw the step complete."""
    replayed: bool = False
    """True when this step number was completed before and is being redone."""
    ranks: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Per rank: ``compute_s`` (its own work), ``wait_s`` (for its slowest peer), ``data_s``
    (for its batch) and ``node_id`` (the Ray node it runs on)."""


@dataclass
class FailureEvent:
    """A failure and the recovery it caused (the rows of ``summary.json``'s events)."""

    kind: str
    """Injected kind (``kill``, ``exception``) or ``worker_died`` / ``error``."""
    step: int
    """The step that was running when the failure happened."""
    rank: int | None
    detected_s: float
    message: str = ""
    resumed_s: float | None = None
    lost_steps: int | None = None
    world_size_after: int | None = None
    restored_from: str | None = None
    """``checkpoint step N`` (persistent), ``memory step N`` (in-memory snapshot) or ``scratch``."""
    last_step_s: float | None = None
    """Seconds since job start when the last step before the failure completed."""
    extra: dict[str, Any] = field(default_factory=dict)
    """More JSON fields for the summary row: ``recovery_phases_s`` (where a recovery's time
    went), ``alert: true`` for an event that interrupted nothing, a straggler's ``ratio``, ..."""

    def to_summary(self) -> dict[str, Any]:
        return {
            **self.extra,
            "kind": self.kind,
            "step": self.step,
            "rank": self.rank,
            "detected_s": round(self.detected_s, 3),
            "resumed_s": None if self.resumed_s is None else round(self.resumed_s, 3),
            "lost_steps": self.lost_steps,
            "world_size_after": self.world_size_after,
            "restored_from": self.restored_from,
            "last_step_s": None if self.last_step_s is None else round(self.last_step_s, 3),
            "message": self.message[:500],
            **self.extra,
        }


class Callback:
    """Base class: override the hooks you need."""

    def before_job(self, job: JobInfo) -> None:
        """Before any worker starts."""

    def after_state_change(self, previous: str, new: str, time_s: float) -> None:
        """After the driver's state machine moved from ``previous`` to ``new``."""

    def after_step(self, report: StepReport) -> None:
        """After every rank finished a step. Must return quickly (no blocking I/O)."""

    def after_failure(self, event: FailureEvent) -> None:
        """After a failure was detected (the event is not yet resolved)."""

    def after_recovery(self, event: FailureEvent) -> None:
        """After the first step following a failure completed (``resumed_s`` set)."""

    def after_resize(self, resize: dict[str, Any]) -> None:
        """After the world size changed in place (``kind`` grow or shrink, ``from``, ``to``, ``step``)."""

    def after_checkpoint(self, step: int, path: str) -> None:
        """After a persistent checkpoint was committed."""

    def before_summary(self, summary: dict[str, Any]) -> None:
        """Before ``summary.json`` is written: a callback may fill in its fields
        (the MLflow callback sets ``mlflow_run_id``)."""

    def after_job(self, summary: dict[str, Any], summary_path: str) -> None:
        """After the job ended and ``summary.json`` was written (success or failure)."""
