"""In-place recovery paths beyond the plain FSDP kill (see test_jobs.py for that one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raypod.api import run
from raypod.config import load_config

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "jobs" / "configs" / "tiny.yaml"

pytestmark = pytest.mark.slow


def tiny(storage: Path, name: str, *overrides: str):
    base = [f"checkpoint.storage={storage}", f"name={name}", "train.max_steps=14",
            "checkpoint.every_steps=5", "mlflow.enabled=false", "fault.hang_timeout_s=60"]
    return load_config(TINY, base + list(overrides))


def test_hsdp_twin_supplies_the_lost_shard(ray_connected, tmp_path):
    """With HSDP the lost rank's state is its twin's own snapshot: no replication, 0 lost steps."""
    hsdp = ["parallel.strategy=hsdp", "parallel.replicas=2"]
    reference = run(tiny(tmp_path, "ref", *hsdp), callbacks=[])
    summary = run(tiny(tmp_path, "kill", *hsdp, "fault.inject=[{step: 9, rank: 1, kind: kill}]"),
                  callbacks=[])
    assert summary["status"] == "succeeded" and summary["final_step"] == 14
    [ev] = summary["events"]
    # Step 8 finished everywhere before the kill, and the twin holds it: nothing is redone.
    assert ev["restored_from"] == "memory step 8" and ev["lost_steps"] == 0
    assert summary["samples"] == {"consumed": 14 * 16, "duplicated": 0, "skipped": 0}
    assert summary["final_state_sha256"] == reference["final_state_sha256"]
