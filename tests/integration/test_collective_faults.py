"""A peer lost in the middle of a collective, on 3 gloo ranks of a real local Ray cluster.

Rank 1 is frozen (SIGSTOP: its sockets stay open and nothing answers, what a dead NCCL
peer or a hung kernel looks like) mid-forward, mid-backward, before the optimizer update
and during a replica round, killed mid-backward, or hung mid-backward (it answers pings but
computes nothing: the hang rule names it from the heartbeats, as the rank that entered fewer
sharded blocks than its peers). Ranks 0 and 2 are then blocked inside
an FSDP collective (or a replica exchange) with it; the driver finds the lost rank, ends
its process and aborts the survivors' process groups (``raypod.worker.group``), so they
return at once, keep their processes and snapshots, and regroup with the spare. Each run
must end on exactly the fault-free state, with at most one step redone per fault.

The six faults ride in two jobs of three faults each (steps 4, 8 and 12, on whichever
process is rank 1 then: the spare that took over, or a new one), so each fault is met by a
group that has already recovered from the one before, and the suite starts two jobs, not six.

``RAYPOD_TEST_GPUS=1`` puts every rank and the spare on a GPU of its own (NCCL; 4 GPUs),
as ``benchmarks/gpu_readiness.sh`` runs it on a machine that has them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from support import detected_after_firing, job_pids, run_faulted, tiny_job

from raypod.api import run

pytestmark = pytest.mark.slow

STEPS = 14
AT_STEPS = (4, 8, 12)
GPU_OVERRIDES = (["scaling.use_gpu=true", "scaling.resources_per_worker={GPU: 1, CPU: 1}"]
                 if os.environ.get("RAYPOD_TEST_GPUS") else [])


def three_ranks(storage: Path, *overrides: str):  # noqa: ANN202
    return tiny_job(storage, "scaling.min_workers=3", "scaling.max_workers=3",
                    "checkpoint.memory_every_steps=1", "fault.max_failures=5", *GPU_OVERRIDES, *overrides,
                    name="collective", max_steps=STEPS)


@pytest.fixture(scope="module")
def baseline(ray_connected, tmp_path_factory):
    """The 3-rank job without faults: the digest every recovered run must reproduce."""
    return run(three_ranks(tmp_path_factory.mktemp("collective-baseline"), "scaling.spares=0"), callbacks=[])


@pytest.mark.parametrize("faults", [(("freeze", "forward"), ("freeze", "backward"), ("freeze", "optimizer")),
                                    (("freeze", "replica"), ("kill", "backward"), ("hang", "backward"))],
                         ids=["freeze-forward,backward,optimizer", "freeze-replica,kill,hang"])
def test_a_peer_lost_mid_collective_releases_the_survivors_in_place(ray_connected, baseline, tmp_path, faults):
    inject = ", ".join(f"{{step: {step}, rank: 1, kind: {kind}, at: {at}}}"
                       for step, (kind, at) in zip(AT_STEPS, faults, strict=True))
    cfg = three_ranks(tmp_path, f"fault.inject=[{inject}]")
    summary, _, pids, _ = run_faulted(cfg)
    assert summary["status"] == "succeeded" and summary["final_step"] == STEPS, summary.get("error")
    assert summary["failures"] == len(faults) == len(pids.history), summary["events"]
    for i, (kind, at) in enumerate(faults):
        ev, detected = summary["events"][i], detected_after_firing(cfg, summary, i)
        print(f"{kind} at {at} (step {AT_STEPS[i]}): detected {detected:.2f} s after it fired, resumed "
              f"{ev['resumed_s'] - ev['detected_s']:.2f} s after that; phases {ev['recovery_phases_s']}; "
              f"{ev['restored_from']}, lost {ev['lost_steps']}")
        assert ev["rank"] == 1, ev
        assert ev["restored_from"].startswith("memory step") and ev["lost_steps"] <= 1, ev
        # fault.silent_s (1 s) for a freeze, up to 1.5x the latest late answer on a host too busy
        # to answer in time (4 rank processes on 2 cores here: protocol.LATE_FACTOR); at once for
        # a kill; a hang (the rank answers pings but computes nothing) by the hang rule:
        # fault.hang_min_s (5 s), the heartbeats naming the rank that entered fewer blocks than
        # its peers, blocked in the next block's collective.
        if kind == "freeze":  # the allowance the driver applied is in its message
            allowed = float(re.search(r"allowed ([0-9.]+) s", ev["message"]).group(1)) \
                if "allowed" in ev["message"] else 1.0
            assert detected < allowed + 1.2, (kind, at, detected, ev["message"])
        else:  # the hang rule's stall (10x the median step, at least 5 s) is in its message
            stall = float(re.search(r"no step finished for ([0-9.]+) s", ev["message"]).group(1)) \
                if kind == "hang" else 0.0
            assert detected < (max(8.0, stall + 3.0) if kind == "hang" else 2.2), (kind, at, detected, ev["message"])
        assert ev["recovery_phases_s"]["drain"] < 1.0, ev  # the survivors were released, not timed out
    assert summary["final_state_sha256"] == baseline["final_state_sha256"]
    # The survivors kept their processes through every fault (and joined each of the groups
    # formed after one); rank 1 was a new process each time.
    first, after = pids.history[0], job_pids(cfg.job_dir)
    for r in (0, 2):
        assert after[r]["attempt"] == len(faults) and after[r]["pid"] == first[r]["pid"], (r, pids.history, after)
    rank1 = [p[1]["pid"] for p in pids.history] + [after[1]["pid"]]
    assert len(set(rank1)) == len(rank1), pids.history
