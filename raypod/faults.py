"""Fault injection bookkeeping shared by the driver and the ranks.

A rank that fires an injected fault first writes a marker
``<job_dir>/faults/fired_<index>.json``; the driver reads the markers to know which
faults fired (and exactly where), so each fires once per job, across recoveries and
resubmissions, even when the rank dies before its last result reaches the driver.
"""

from __future__ import annotations

import re
import time
from typing import Any

from raypod.config import FaultInjection, JobConfig
from raypod.storage import get_fs, join_uri, read_json, write_json_atomic

_MARKER = re.compile(r"fired_(\d+)\.json$")


def _dir(job_dir: str) -> str:
    return join_uri(job_dir, "faults")


def record_fired(job_dir: str, index: int, fault: FaultInjection, attempt: int) -> None:
    """Rank side: note durably that fault ``index`` is firing now."""
    write_json_atomic(join_uri(_dir(job_dir), f"fired_{index}.json"),
                      {"index": index, **fault.model_dump(), "attempt": attempt, "time": time.time()})


def fired(job_dir: str) -> dict[int, dict[str, Any]]:
    """Driver side: the faults that fired so far, by index."""
    fs, root = get_fs(_dir(job_dir))
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return {}
    out = {}
    for name in names:
        m = _MARKER.search(name)
        if m:
            data = read_json(join_uri(_dir(job_dir), f"fired_{m.group(1)}.json"))
            if data is not None:
                out[int(m.group(1))] = data
    return dict(sorted(out.items()))  # in plan order (a listing is in name order: fired_10 < fired_9)


def pending(config: JobConfig, already: set[int] | dict[int, Any]) -> list[tuple[int, FaultInjection]]:
    """``(index, fault)`` for every configured fault that has not fired yet."""
    return [(i, f) for i, f in enumerate(config.fault.inject) if i not in already]
