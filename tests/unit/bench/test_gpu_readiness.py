"""The GPU readiness checks where no GPU is needed: their CPU fallback (gloo, the same
GroupSession code) run for real, the verdict on a report, the check of a faulted job's
summary, and the script's syntax (``benchmarks/gpu_readiness.sh`` itself needs GPUs)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import REPO

from raypod.bench.nccl_abort import RELEASE_LIMIT_S, check_summary, verdict

pytestmark = pytest.mark.timeout(180)


def _passing() -> dict:
    return {"world_one": {"aborted": True, "errored": "readiness check", "collective_after": 1.0},
            "two_ranks": {"rank1_stopped": True, "released_s": RELEASE_LIMIT_S / 100, "collective_after": 1.0}}


def test_the_cpu_fallback_aborts_releases_and_regroups_in_the_same_process(tmp_path):
    out = tmp_path / "nccl_abort.json"
    proc = subprocess.run([sys.executable, "-m", "raypod.bench.nccl_abort", "--cpu", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=170)
    report = json.loads(out.read_text())
    assert proc.returncode == 0, (report.get("failed"), proc.stderr[-2000:])
    w1, two = report["world_one"], report["two_ranks"]
    assert w1["backend"] == "gloo" and w1["errored"] == "readiness check" and w1["collective_after"] == 1.0
    assert all(w1[k] >= 0 for k in ("configure_s", "abort_s", "leave_s", "reconfigure_s"))
    assert two["rank1_stopped"] and two["blocked_call"].startswith("raised")  # released by the abort, not a peer
    assert 0 <= two["released_s"] < RELEASE_LIMIT_S and two["errored"] == "a peer was lost"
    assert two["collective_after"] == 1.0 and report["versions"]["torch"]


def test_verdict_names_each_check_that_failed():
    assert verdict(_passing()) == []
    slow = _passing()
    slow["two_ranks"]["released_s"] = RELEASE_LIMIT_S * 2
    assert ["two ranks: abort released rank 0 after"] == [b[:38] for b in verdict(slow)]
    never = _passing()
    never["two_ranks"] = {"error": "rank 0 did not report within 120 s (exit None)", "rank1_stopped": True}
    assert len(verdict(never)) == 3  # the error, no release time, no collective after
    broken = _passing()
    broken["world_one"] = {"device": "cuda:0", "error": "RuntimeError: NCCL error"}
    broken["two_ranks"] = {"skipped": "needs 2 GPUs, found 1"}
    assert verdict(broken) == ["world 1: RuntimeError: NCCL error"]
    not_aborted = _passing()
    not_aborted["world_one"]["errored"] = None
    assert verdict(not_aborted)[0].startswith("world 1: aborted True, errored None")


def test_check_summary_wants_success_the_failures_and_the_fault_free_digest():
    ok = {"status": "succeeded", "final_step": 12, "failures": 1, "final_state_sha256": "a"}
    assert check_summary(ok, 12, 1) == [] and check_summary(ok, 12, 1, {"final_state_sha256": "a"}) == []
    assert check_summary(ok, 12, 1, {"final_state_sha256": "b"}) == [
        "final_state_sha256 differs from the fault-free run"]
    failed = {"status": "failed", "final_step": 6, "failures": 2, "error": "out of budget"}
    assert len(check_summary(failed, 12, 1)) == 2


def test_the_readiness_script_parses():
    proc = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_readiness.sh")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
