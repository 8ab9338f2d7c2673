"""A peer lost in the middle of a collective, on 3 gloo ranks of a real local Ray cluster.

Rank 1 is frozen (SIGSTOP: its sockets stay open and nothing answers, what a dead NCCL
peer or a hung kernel looks like) mid-forward, mid-backward, before the optimizer update
and during a replica round, killed mid-backward, or hung mid-backward (it answers pings but
computes nothing: the hang rule names it from the heartbeats, as the rank that entered fewer
sharded blocks than its peers). Ranks 0 and 2 are then blocked inside
an FSDP collective (or a replica exchange) with it; the driver finds the lost rank, ends
its process and aborts the survivors' process groups (``raypod.worker.group``), so they
return at once, keep their processes and snapshots, and regroup with the spare. Each run
must end on exactly the fault-free state, with at most one step redone.

``RAYPOD_TEST_GPUS=1`` puts every rank and the spare on a GPU of its own (NCCL; 4 GPUs),
as ``benchmarks/gpu_readiness.sh`` runs it on a machine that has them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import job_pids, run_faulted, tiny_job

from raypod.api import run

pytestmark = pytest.mark.slow

STEPS = 8
GPU_OVERRIDES = (["scaling.use_gpu=true", "scaling.resources_per_worker={GPU: 1, CPU: 1}"]
                 if os.environ.get("RAYPOD_TEST_GPUS") else [])


def three_ranks(storage: Path, *overrides: str):  # noqa: ANN202
    return tiny_job(storage, "scaling.min_workers=3", "scaling.max_workers=3",
                    "checkpoint.memory_every_steps=1", *GPU_OVERRIDES, *overrides, name="collective", max_steps=STEPS)


@pytest.fixture(scope="module")
def baseline(ray_connected, tmp_path_factory):
    """The 3-rank job without faults: the digest every recovered run must reproduce."""
    return run(three_ranks(tmp_path_factory.mktemp("collective-baseline")), callbacks=[])


@pytest.mark.parametrize(("kind", "at"), [("freeze", "forward"), ("freeze", "backward"),
                                          ("freeze", "optimizer"), ("freeze", "replica"),
                                          ("kill", "backward"), ("hang", "backward")])
def test_a_peer_lost_mid_collective_releases_the_survivors_in_place(ray_connected, baseline, tmp_path,
                                                                     kind, at):
    cfg = three_ranks(tmp_path, f"fault.inject=[{{step: 5, rank: 1, kind: {kind}, at: {at}}}]")
    summary, ev, pids, detected = run_faulted(cfg)
    assert summary["status"] == "succeeded" and summary["final_step"] == STEPS, summary.get("error")
    print(f"{kind} at {at}: detected {detected:.2f} s after it fired, resumed "
          f"{ev['resumed_s'] - ev['detected_s']:.2f} s after that; phases {ev['recovery_phases_s']}; "
          f"{ev['restored_from']}, lost {ev['lost_steps']}")
    assert summary["failures"] == 1 and ev["rank"] == 1
    assert ev["restored_from"].startswith("memory step") and ev["lost_steps"] <= 1, ev
    # fault.silent_s (1 s) for a freeze, up to 1.5x the latest late answer on a host too busy to
    # answer in time (4 rank processes on 2 cores here: protocol.LATE_FACTOR); at once for a kill;
    # a hang (the rank answers pings but computes nothing) by the hang rule: fault.hang_min_s
    # (5 s), the heartbeats naming the rank that entered fewer blocks than its peers, blocked in
    # the next block's collective.
    assert detected < (8.0 if kind == "hang" else 2.2), detected
    assert ev["recovery_phases_s"]["drain"] < 1.0  # the survivors were released, not timed out
    assert summary["final_state_sha256"] == baseline["final_state_sha256"]
    # The survivors kept their processes and re-joined; rank 1 is the spare's now.
    after = job_pids(cfg.job_dir)
    for r in (0, 2):
        assert after[r]["attempt"] == 1 and after[r]["pid"] == pids.pids[r]["pid"], (r, pids.pids, after)
    assert after[1]["pid"] != pids.pids[1]["pid"]
