"""Training-health policies: which rank hangs, which one straggles, which loss is bad.

Like :mod:`raypod.policies.failures`, these only decide; the driver acts on what they
return (kills and replaces a rank in place, rolls back a step, raises an alert).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from raypod.protocol import Heartbeat


def hung_rank(heartbeats: dict[int, Heartbeat | None]) -> tuple[int | None, str]:
    """The rank the others are waiting for, from one round of heartbeats.

    A rank that does not answer its heartbeat (its process is frozen or gone) is hung.
    Otherwise the rank that is furthest behind, at a lower ``(step, phase, progress)`` than
    every other rank, is the one they wait for in a collective (``progress``: the sharded
    blocks it entered this step; peers blocked in a block's collective counted one more
    than a rank stuck computing the block before). When every rank is at the same place
    (all stuck in one collective), no rank can be blamed.

    Returns:
        ``(rank, why)``; rank is None when no single rank can be blamed.
    """
    silent = sorted(r for r, hb in heartbeats.items() if hb is None)
    if silent:
        return silent[0], "did not answer its heartbeat"
    if len(heartbeats) < 2:
        return None, "no peer to compare with"
    at = {r: (hb.step, hb.phase, hb.progress) for r, hb in heartbeats.items() if hb is not None}
    lowest = min(at.values())
    behind = [r for r, where in at.items() if where == lowest]
    if len(behind) != 1:
        return None, f"every rank is at step {lowest[0]} phase {heartbeats[behind[0]].phase_name}"
    r = behind[0]
    hb = heartbeats[r]
    assert hb is not None
    others = sorted({(h.step, h.phase_name, h.progress) for q, h in heartbeats.items() if q != r and h})
    block = f" (block {hb.progress})" if hb.progress else ""
    return r, (f"stuck at step {hb.step} in phase {hb.phase_name}{block} for {hb.in_phase_s:.1f} s while the "
               f"others wait at {', '.join(f'step {s} {p}' + (f' (block {b})' if b else '') for s, p, b in others)}")


class LossRule:
    """Bad losses: NaN or infinite, or above ``spike_factor`` x the running median.

    Args:
        spike_factor: 0 turns the spike rule off.
        window: losses the running median is taken over.
        min_history: losses needed before the spike rule applies.
    """

    def __init__(self, spike_factor: float, window: int = 20, min_history: int = 5) -> None:
        self.spike_factor = spike_factor
        self.recent: deque[float] = deque(maxlen=window)
        self.min_history = min_history

    def check(self, loss: float) -> str | None:
        """``nan`` / ``loss_spike`` for a bad loss (not recorded), else None (recorded)."""
        if not math.isfinite(loss):
            return "nan"
        if self.spike_factor and len(self.recent) >= self.min_history:
            if loss > self.spike_factor * statistics.median(self.recent):
                return "loss_spike"
        self.recent.append(loss)
        return None


def _median_without(values: list[float], skip: int) -> float:
    """The median of sorted ``values`` without the one at index ``skip`` (two or more values)."""
    n = len(values) - 1

    def at(i: int) -> float:  # index i among the values left
        return values[i if i < skip else i + 1]

    return at(n // 2) if n % 2 else (at(n // 2 - 1) + at(n // 2)) / 2


class StragglerTracker:
    """Ranks whose own compute per step is persistently ``factor`` x the others' median.

    A rank's own compute is its step time minus the time it waited for the slowest
    rank at the step's start. Each rank is compared with the median of the *other*
    ranks (with two ranks, the median of all would hide the slow one).

    Args:
        factor: 0 turns tracking off.
        steps: consecutive slow steps before a rank is reported.
        min_gap_s: ignore differences smaller than this (timer noise on tiny steps).
    """

    def __init__(self, factor: float, steps: int, min_gap_s: float = 0.05) -> None:
        self.factor, self.steps, self.min_gap_s = factor, steps, min_gap_s
        self.streak: dict[int, int] = {}
        self.reported: set[int] = set()

    def reset(self) -> None:
        """A new group (a recovery): ranks are compared afresh."""
        self.streak.clear()
        self.reported.clear()

    def update(self, own_s: dict[int, float]) -> tuple[float, list[tuple[int, float]]]:
        """Feed one step's per-rank compute seconds.

        Returns:
            The largest ratio of a rank to the others' median this step, and the
            ``(rank, ratio)`` reported as stragglers by this step (each rank once).
        """
        if not self.factor or len(own_s) < 2:
            return 1.0, []
        worst, out = 1.0, []
        # One sort per step: the others' median of each rank is read off the sorted values
        # (O(N log N); a median per rank over the others would be O(N^2 log N): 2.6 s a step
        # at 10,000 ranks, measured by the simulator).
        order = sorted(own_s, key=own_s.__getitem__)
        values = [own_s[r] for r in order]
        position = {r: i for i, r in enumerate(order)}
        for r, own in own_s.items():
            others = _median_without(values, position[r])
            ratio = own / max(others, 1e-6)
            worst = max(worst, ratio)
            slow = ratio > self.factor and own - others > self.min_gap_s
            self.streak[r] = self.streak.get(r, 0) + 1 if slow else 0
            if self.streak[r] >= self.steps and r not in self.reported:
                self.reported.add(r)
                out.append((r, ratio))
        return worst, out


class ThroughputWatch:
    """Alerts once when throughput collapses below ``ratio`` x its running median.

    Args:
        ratio: 0 turns the alert off.
        recent: steps whose median is compared.
        history: steps of the running median (after ``history`` steps it applies).
    """

    def __init__(self, ratio: float, recent: int = 5, history: int = 50) -> None:
        self.ratio = ratio
        self.recent: deque[float] = deque(maxlen=recent)
        self.history: deque[float] = deque(maxlen=history)
        self.alerting = False

    def update(self, samples_per_s: float) -> float | None:
        """Feed one step's throughput; returns the collapse ratio when an alert starts."""
        if not self.ratio:
            return None
        self.recent.append(samples_per_s)
        baseline = statistics.median(self.history) if len(self.history) >= 2 * self.recent.maxlen else None
        self.history.append(samples_per_s)
        if baseline is None or len(self.recent) < self.recent.maxlen:
            return None
        now = statistics.median(self.recent) / max(baseline, 1e-9)
        if now < self.ratio and not self.alerting:
            self.alerting = True
            return now
        if now >= self.ratio:
            self.alerting = False
        return None
