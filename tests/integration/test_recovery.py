"""In-place recovery paths beyond the plain FSDP kill (see test_jobs.py for that one)."""

from __future__ import annotations

from functools import partial

import pytest
from support import tiny_job

from raypod.api import run

pytestmark = pytest.mark.slow


tiny = partial(tiny_job, max_steps=14)


def test_hsdp_twin_supplies_the_lost_shard(ray_connected, tmp_path):
    """With HSDP the lost rank's state is its twin's own snapshot: no replication, 0 lost steps."""
    hsdp = ["parallel.strategy=hsdp", "parallel.replicas=2"]
    reference = run(tiny(tmp_path, *hsdp, name="ref"), callbacks=[])
    summary = run(tiny(tmp_path, *hsdp, "fault.inject=[{step: 9, rank: 1, kind: kill}]", name="kill"),
                  callbacks=[])
    assert summary["status"] == "succeeded" and summary["final_step"] == 14
    [ev] = summary["events"]
    # Step 8 finished everywhere before the kill, and the twin holds it: nothing is redone.
    assert ev["restored_from"] == "memory step 8" and ev["lost_steps"] == 0
    assert summary["samples"] == {"consumed": 14 * 16, "duplicated": 0, "skipped": 0}
    assert summary["final_state_sha256"] == reference["final_state_sha256"]
