"""Where a recovery restores the state from: a policy (it decides; the driver acts).

After a failure the group can go back to the newest step that every rank holds in
memory (its own snapshots, its peers' replicas) and redo the steps since, or load the
newest committed checkpoint from storage and redo the steps since that one. With
snapshots taken every few steps and checkpoints every few others, either can be the
newer; what matters is which gets training back to where it was soonest:

* memory: ``(target - memory step) x step time`` (the peers' copies arrive in about the
  time the regroup takes anyway);
* checkpoint: ``load time + (target - checkpoint step) x step time``, plus the time a
  group takes to start when the load cannot happen in the surviving processes.

``target`` is the last step the group finished; the step time is the recent median and
the load time what the driver measured (a load, else a save) or a conservative default.
A tie goes to memory: it reads nothing from storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MEMORY = "memory"
CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class SourceCandidate:
    """A state the group could restore, with what it is estimated to cost.

    Attributes:
        kind: ``memory`` (in-memory snapshots and replicas) or ``checkpoint`` (committed).
        step: the step whose state it holds.
        est_s: estimated seconds until training is back at the target step.
        in_place: whether the surviving processes restore it (False: every rank restarts).
    """

    kind: str
    step: int
    est_s: float
    in_place: bool = True

    @property
    def label(self) -> str:
        """``memory step N`` / ``checkpoint step N``, as events name their source."""
        return f"{self.kind} step {self.step}"


@dataclass(frozen=True)
class SourceChoice:
    """The source a recovery restores from (``None``: none; the job restarts from what is
    left on storage or from scratch) and the one-sentence reason, with every candidate."""

    chosen: SourceCandidate | None
    reason: str
    candidates: tuple[SourceCandidate, ...]

    def record(self) -> dict[str, Any]:
        """The decision as recorded in the failure event (``source_choice``)."""
        out: dict[str, Any] = {"chosen": self.chosen.kind if self.chosen else None}
        for c in self.candidates:
            out[f"{c.kind}_step"] = c.step
            out[f"est_{c.kind}_s"] = round(c.est_s, 3)
        out["reason"] = self.reason
        return out


def estimate(kind: str, step: int, target: int, step_s: float, load_s: float = 0.0,
             restart_s: float = 0.0) -> SourceCandidate:
    """A candidate restoring ``step``: redo up to ``target`` at ``step_s`` a step, after a
    load of ``load_s`` (a checkpoint) and a group start of ``restart_s`` (not in place)."""
    redo = max(0, target - step) * max(0.0, step_s)
    return SourceCandidate(kind, step, redo + max(0.0, load_s) + max(0.0, restart_s),
                           in_place=restart_s <= 0.0)


def choose_source(candidates: list[SourceCandidate]) -> SourceChoice:
    """The candidate that gets training past the lost step soonest (memory on a tie)."""
    cands = tuple(sorted(candidates, key=lambda c: c.kind != MEMORY))  # memory first
    if not cands:
        return SourceChoice(None, "neither an in-memory snapshot nor a committed checkpoint "
                                  "is available", cands)
    best = min(cands, key=lambda c: c.est_s)  # the first of equals: memory
    if len(cands) == 1:
        other = "no committed checkpoint" if best.kind == MEMORY else "no usable in-memory snapshot"
        return SourceChoice(best, f"{best.label} is the only source ({other})", cands)
    rest = [c for c in cands if c is not best]
    worse = ", ".join(f"{c.label} (est. {c.est_s:.2f} s)" for c in rest)
    return SourceChoice(best, f"{best.label} gets training back soonest (est. {best.est_s:.2f} s) "
                              f"over {worse}", cands)
