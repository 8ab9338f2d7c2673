"""A whole Ray node lost mid-run (``ray.cluster_utils.Cluster``): recovery in place, from memory.

The multi-node cluster runs in a subprocess (``raypod.bench.node_loss``), since this
test process is already attached to the session cluster; that cluster runs the
fault-free reference at the same world size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support import MLP, REPO

from raypod.api import run
from raypod.config import load_config

SETTINGS = ["train.max_steps=24", "checkpoint.every_steps=10", "mlflow.enabled=false"]

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_node_removed_recovers_in_place_from_peer_memory(ray_connected, tmp_path):
    """With the node agents in zones (``fault.agent_zones_from=1``: one leader gathers the other
    node's agent's replies, as on a cluster of thousands of nodes), whichever node goes."""
    out = tmp_path / "summary.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "raypod.bench.node_loss", "--trial-out", str(out), "--after-step", "12"]
    for s in [*SETTINGS, "fault.agent_zones_from=1"]:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert proc.returncode == 0, summary.get("error") or proc.stderr[-3000:]

    removed = summary["node_loss"]
    assert removed["ranks_on_it"], "the removed node held no rank"
    assert summary["status"] == "succeeded" and summary["final_step"] == 24
    [event] = summary["events"]
    # Whichever the driver sees first names the loss: Ray's report that the actors died with
    # their raylet, or their pings unanswered for fault.silent_s (the node agent is gone too).
    assert event["kind"] in ("worker_died", "unresponsive") and event["rank"] in removed["ranks_on_it"]
    # The lost rank's shard came from its replica on the other node: nothing read from storage.
    assert event["restored_from"].startswith("memory step"), event
    assert event["lost_steps"] <= 1 and event["world_size_after"] == 2
    assert summary["samples"]["duplicated"] == 0 and summary["samples"]["skipped"] == 0
    assert summary["samples"]["consumed"] == 24 * 32

    reference = run(load_config(MLP, [f"checkpoint.storage={tmp_path / 'ref'}", "name=ref", *SETTINGS]),
                    callbacks=[])
    assert summary["final_state_sha256"] == reference["final_state_sha256"]


@pytest.mark.timeout(600)
def test_node_removed_without_replacement_shrinks_and_finishes(tmp_path):
    """No spare and no room: the job goes on with the survivor, state resharded in memory."""
    out = tmp_path / "summary.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "raypod.bench.node_loss", "--trial-out", str(out), "--after-step", "12"]
    for s in [*SETTINGS, "scaling.spares=0", "scaling.min_workers=1"]:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert proc.returncode == 0, summary.get("error") or proc.stderr[-3000:]
    assert summary["status"] == "succeeded" and summary["final_step"] == 24
    [event] = summary["events"]
    assert event["restored_from"].startswith("memory step") and event["world_size_after"] == 1, \
        (event, proc.stderr[-6000:])  # the driver's log says why memory was not used
    assert summary["resizes"][0]["kind"] == "shrink" and summary["world_sizes"][:2] == [2, 1]
    assert summary["samples"]["duplicated"] == 0 and summary["samples"]["skipped"] == 0
    assert summary["samples"]["consumed"] == 24 * 32
