"""Elastic training on Ray's fake multi-node autoscaler (``jobs/clusters/fake_multinode.yaml``).

The cluster and the job run in a subprocess (``raypod.bench.elastic``), since this test
process is attached to the session cluster: the job starts on the one worker node that
exists, grows as the autoscaler adds nodes, shrinks in place when one is terminated,
and finishes with every sample seen exactly once. The subprocess has a user's environment:
no RAY_AUTH_MODE, only the token file ``ray start --head`` leaves in ``~/.ray`` (the fake
cluster's head runs with token authentication on, as every ``ray start --head`` here).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import REPO, user_env

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_grows_with_the_autoscaler_and_shrinks_when_a_node_goes(tmp_path):
    out = tmp_path / "summary.json"
    env = user_env()
    steps = 120  # grows by ~step 65, loses a node 10 steps later, then ends
    proc = subprocess.run([sys.executable, "-m", "raypod.bench.elastic", "--trial-out", str(out),
                           "--set", f"train.max_steps={steps}", "--set", "checkpoint.every_steps=50"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=840)
    (tmp_path / "elastic.log").write_text(proc.stdout + proc.stderr)  # the driver's log, kept
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert proc.returncode == 0, summary.get("error") or proc.stderr[-3000:]
    assert summary["status"] == "succeeded" and summary["final_step"] == steps

    sizes = summary["world_sizes"]
    assert sizes[0] == 1, sizes  # started with the one node there was
    assert max(sizes) == 3, sizes  # grew as the autoscaler added nodes
    grows = [r for r in summary["resizes"] if r["kind"] == "grow"]
    assert grows and grows[0]["from"] == 1
    # The terminated node's rank was lost; the job went on in place with fewer ranks.
    terminated = summary["elastic"]["terminated"]
    [ev] = [e for e in summary["events"] if e["detected_s"] >= terminated["at_s"]][:1]
    # Whatever the survivors were blocked in (an FSDP collective mid-step included), the
    # driver's abort released them: the shrink is in place, from memory.
    assert ev["restored_from"].startswith("memory step"), ev
    assert ev["world_size_after"] < 3 or any(r["kind"] == "shrink" for r in summary["resizes"])
    assert summary["samples"] == {"consumed": steps * 16, "duplicated": 0, "skipped": 0}
