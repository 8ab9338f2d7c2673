"""The cost model's calibration: per-operation costs measured on real Ray, read by the simulator.

``raypod bench scale`` measures them (:mod:`raypod.bench.scale`) and writes
``<out>/scale_calibration.json``; ``raypod bench sim`` (:mod:`raypod.bench.sim`) reads them
to cost what its simulated worker group does. Every figure is a linear fit
``base_s + per_rank_s * N`` over the rank counts measured, with the points it came from,
so that a reader can see how far the simulator extrapolates.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Fit:
    """``seconds(N) = base_s + per_rank_s * N``, fitted to ``points`` (``[N, seconds]``)."""

    base_s: float
    per_rank_s: float
    points: list[list[float]] = field(default_factory=list)

    def at(self, n: int) -> float:
        return max(0.0, self.base_s + self.per_rank_s * n)

    @classmethod
    def least_squares(cls, points: list[tuple[int, float]]) -> Fit:
        """The least-squares line through ``points`` (a flat line through one point)."""
        if not points:
            raise ValueError("no points to fit")
        xs, ys = [float(p[0]) for p in points], [float(p[1]) for p in points]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
        return cls(base_s=my - slope * mx, per_rank_s=slope, points=[[x, y] for x, y in zip(xs, ys, strict=True)])


@dataclass(frozen=True)
class Calibration:
    """Per-operation costs of the driver's work, measured on real Ray.

    Attributes:
        actor_call: driver CPU seconds to submit one actor call and collect its result, by N
            calls submitted together (``per_rank_s`` is the per-call cost).
        wait: driver CPU seconds of one ``ray.wait`` over N refs.
        ping: seconds until every one of N ranks answered a ping (wall).
        regroup: seconds to re-form a group of N ranks in place after a kill (wall; the
            recovery's rebuild phase).
        step_s: the light rank's step time with no driver in the loop, by N (wall).
        regroup_cpu: the most CPU one rank's process spent rejoining in that recovery, by N:
            the rebuild on a cluster, where each rank forms its groups on cores of its own
            (``regroup`` is the wall time of N ranks sharing this machine's cores); None in a
            calibration measured before it was recorded.
        stream_item: driver CPU seconds to collect one streamed step result from each of N
            window calls (``train.step_window``: a step's results), by N; None in a
            calibration measured before step windows.
        machine: where it was measured; ``command``: how to measure it again.
    """

    actor_call: Fit
    wait: Fit
    ping: Fit
    regroup: Fit
    step_s: Fit
    regroup_cpu: Fit | None = None
    stream_item: Fit | None = None
    machine: dict[str, Any] = field(default_factory=dict)
    date: str = ""
    command: str = "raypod bench scale"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        fits = {k: Fit(**data[k]) for k in ("actor_call", "wait", "ping", "regroup", "step_s")}
        for name in ("regroup_cpu", "stream_item"):
            if data.get(name):
                fits[name] = Fit(**data[name])
        return cls(**fits, machine=data.get("machine", {}), date=data.get("date", ""),
                   command=data.get("command", "raypod bench scale"))


FILE = "scale_calibration.json"


def save(cal: Calibration, out: str | os.PathLike) -> str:
    """Write ``<out>/scale_calibration.json``; returns its path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, FILE)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(cal.to_json(), f, indent=2)
    os.replace(tmp, path)
    return path


def load(folder: str | os.PathLike) -> Calibration:
    """Read ``<folder>/scale_calibration.json``.

    Raises:
        FileNotFoundError: with the command that writes it.
    """
    path = os.path.join(folder, FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: run `raypod bench scale` first (it measures "
                                "the costs the simulator is calibrated with)")
    with open(path) as f:
        return Calibration.from_json(json.load(f))
