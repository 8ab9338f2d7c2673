"""Elastic training on a real local Ray: shrink in place when a rank is lost with no spare,
grow back at a step boundary once a new actor is warm; state resharded in memory."""

from __future__ import annotations

import math
import time

import pytest
from support import TINY

from raypod.api import run
from raypod.callbacks import Callback, StepReport
from raypod.config import load_config

pytestmark = pytest.mark.slow


class Steps(Callback):
    """Records the steps; while the job runs shrunk, holds each step back a little (at most
    60 s in all) so that a slow machine cannot end the job before the new actor is warm."""

    def __init__(self) -> None:
        self.reports: list[StepReport] = []
        self.held = 0.0

    def after_step(self, report: StepReport) -> None:
        self.reports.append(report)
        if report.metrics["world_size"] == 1 and self.held < 60:
            time.sleep(0.1)
            self.held += 0.1


def test_shrink_without_spare_then_grow_back(ray_connected, tmp_path):
    cfg = load_config(TINY, [f"checkpoint.storage={tmp_path}", "name=elastic", "train.max_steps=60",
                             "checkpoint.every_steps=10", "mlflow.enabled=false", "scaling.min_workers=1",
                             "scaling.max_workers=2", "scaling.spares=0",
                             "fault.inject=[{step: 8, rank: 1, kind: kill}]"])
    steps = Steps()
    summary = run(cfg, callbacks=[steps])
    assert summary["status"] == "succeeded" and summary["final_step"] == 60
    [ev] = summary["events"]
    # The job went on at once with the survivor, its state resharded from memory (no storage).
    assert ev["restored_from"].startswith("memory step") and ev["world_size_after"] == 1
    assert ev["lost_steps"] <= 1
    kinds = [r["kind"] for r in summary["resizes"]]
    assert kinds == ["shrink", "grow"], summary["resizes"]
    assert summary["world_sizes"] == [2, 1, 2]
    # Every sample of every step exactly once, whatever the world size that ran it.
    assert summary["samples"] == {"consumed": 60 * 16, "duplicated": 0, "skipped": 0}
    sizes = {int(r.metrics["world_size"]) for r in steps.reports}
    assert sizes == {1, 2}
    losses = [r.metrics["loss"] for r in steps.reports]
    assert all(math.isfinite(x) for x in losses) and sum(losses[-5:]) / 5 < losses[0] - 1.0
