"""Abortable collectives on the real backend: what a rank's GroupSession does, timed, without Ray.

    python -m raypod.bench.nccl_abort [--cpu] [--out nccl_abort.json]
    python -m raypod.bench.nccl_abort summary RUN/summary.json --steps 60 --failures 1 [--baseline B]

Two checks, each through :class:`raypod.worker.group.GroupSession` exactly as a rank uses
it (a master ``TCPStore`` opened first, as ``RendezvousStore.open`` does; the mesh
built by ``build_mesh``):

- **world 1** (one GPU is enough): configure a group of one on ``cuda:0`` (backend
  ``cpu:gloo,cuda:nccl``), all-reduce a CUDA tensor, :meth:`~GroupSession.abort` (a rank
  alone cannot block on a peer, so the abort comes after a collective), check
  :meth:`~GroupSession.errored`, :meth:`~GroupSession.leave`, configure again on a fresh
  store and all-reduce again, in the same process. Each phase is timed.
- **two ranks** (two GPUs, or ``--cpu``): rank 1 stops itself (SIGSTOP: its communicator
  stays, nothing answers, what a dead NCCL peer looks like) while rank 0 enters an
  all-reduce; an abort from another thread of rank 0 (what the driver's interrupt does)
  must release it within :data:`RELEASE_LIMIT_S`; rank 0 then re-forms a group of one and
  all-reduces in the same process.

``--cpu`` runs both on gloo, the CPU fallback of the same code. The JSON records the
``TORCH_NCCL_*`` settings in force (:data:`raypod.worker.group.NCCL_ENV`), torch, CUDA
and NCCL versions; the exit status is 0 only when every check passed (:func:`verdict`).
``summary`` checks a raypod job's ``summary.json`` after injected faults (used by
``benchmarks/gpu_readiness.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import torch

RELEASE_LIMIT_S = 1.0
"""How soon after ``abort()`` a rank blocked on a stopped peer must be back."""
HOLD_S = 1.0
"""How long rank 0 is left blocked before the abort (the driver needs ``fault.silent_s``)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _master_store(world: int, port: int = 0) -> Any:
    """A rendezvous store, listening before anyone joins (``RendezvousStore.open``)."""
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", port, world, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=60))


def _configure(groups: Any, store: Any, rank: int, world: int) -> float:
    """Form ``groups`` as a rank does (``build_mesh`` on the default group); seconds taken."""
    from raypod.config import ParallelConfig
    from raypod.worker.parallel import build_mesh

    t0 = time.perf_counter()
    groups.configure(store, rank, world, 60.0, lambda n: build_mesh(ParallelConfig(), n, groups.device))
    return time.perf_counter() - t0


def _all_reduce(device: torch.device, world: int) -> float:
    """All-reduce a tensor of ones on ``device`` and wait for it; fails unless the sum is ``world``."""
    import torch.distributed as dist

    t = torch.ones(1024, device=device)
    dist.all_reduce(t)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if not torch.all(t == world):
        raise RuntimeError(f"all_reduce over {world} rank(s) gave {t[0].item()}")
    return float(t[0].item())


def world_one(device: torch.device) -> dict[str, Any]:
    """Configure, collective, abort, leave, configure again on a fresh store, collective:
    one process, one rank. Returns each phase's seconds and what the session reported."""
    from raypod.worker.group import GroupSession

    groups = GroupSession(device)
    out: dict[str, Any] = {"device": str(device), "backend": groups.backend}
    out["configure_s"] = _configure(groups, _master_store(1), 0, 1)
    _all_reduce(device, 1)
    t0 = time.perf_counter()
    out["aborted"] = groups.abort("readiness check")
    out["abort_s"] = time.perf_counter() - t0
    out["errored"] = groups.errored()
    t0 = time.perf_counter()
    groups.leave()
    out["leave_s"] = time.perf_counter() - t0
    out["reconfigure_s"] = _configure(groups, _master_store(1), 0, 1)
    t0 = time.perf_counter()
    out["collective_after"] = _all_reduce(device, 1)
    out["collective_after_s"] = time.perf_counter() - t0
    groups.leave()
    return out


def _blocked_rank(rank: int, port: int, use_cuda: bool, results: Any) -> None:
    """One of the two ranks of :func:`two_ranks` (a spawned process)."""
    import torch.distributed as dist

    from raypod.worker.group import GroupSession

    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    groups = GroupSession(device)
    store = _master_store(2, port) if rank == 0 else (
        lambda: dist.TCPStore("127.0.0.1", port, 2, is_master=False, timeout=timedelta(seconds=60)))
    out: dict[str, Any] = {"configure_s": _configure(groups, store, rank, 2)}
    for _ in range(3):  # warm: the communicators are up on both sides
        _all_reduce(device, 2)
    if rank == 1:
        results.put({"rank": 1, "pid": os.getpid()})
        results.close()
        results.join_thread()  # the report is out before the process stops
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    time.sleep(0.2)  # rank 1 has stopped: the next all-reduce has no peer
    aborted: dict[str, float] = {}

    def driver_interrupt() -> None:  # the driver's interrupt, on a thread of the rank's own
        time.sleep(HOLD_S)
        aborted["t"] = time.perf_counter()
        groups.abort("a peer was lost")

    threading.Thread(target=driver_interrupt, daemon=True).start()
    try:
        _all_reduce(device, 2)
        out["blocked_call"] = "returned"
    except Exception as e:  # noqa: BLE001 - how the aborted call ended is the finding
        out["blocked_call"] = f"raised {type(e).__name__}: {str(e)[:200]}"
    back = time.perf_counter()
    out["released_s"] = back - aborted["t"] if "t" in aborted else None  # None: it returned unaborted
    out["errored"] = groups.errored()
    try:
        t0 = time.perf_counter()
        groups.leave()
        out["leave_s"] = time.perf_counter() - t0
        out["reform_s"] = _configure(groups, _master_store(1), 0, 1)
        out["collective_after"] = _all_reduce(device, 1)
        groups.leave()
    except Exception as e:  # noqa: BLE001 - a process that cannot regroup is the finding
        out["error"] = f"after the release: {type(e).__name__}: {str(e)[:300]}"
    results.put({"rank": 0, **out})


def two_ranks(use_cuda: bool, timeout_s: float = 120.0) -> dict[str, Any]:
    """Rank 1 stopped, rank 0 blocked in an all-reduce until its abort (see the module doc).

    Both processes are this function's own and are ended here (rank 1 with SIGKILL, which
    ends a stopped process). A rank 0 that never reports within ``timeout_s`` counts as
    not released.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_blocked_rank, args=(r, port, use_cuda, results), daemon=True) for r in (0, 1)]
    for p in procs:
        p.start()
    got: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while 0 not in got and time.monotonic() < deadline:
            try:
                item = results.get(timeout=1.0)
            except queue.Empty:
                if not procs[0].is_alive():
                    break  # rank 0 ended without a report
                continue
            got[item["rank"]] = item
    finally:
        for p in procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGKILL)
            p.join(10)
    rank0 = got.get(0, {"error": f"rank 0 did not report within {timeout_s:.0f} s (exit {procs[0].exitcode})"})
    return {"backend": "nccl" if use_cuda else "gloo", "rank1_stopped": 1 in got, **rank0}


def versions() -> dict[str, Any]:
    """torch, CUDA, NCCL and the GPUs of this machine."""
    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "gpus": []}
    if torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        nccl = torch.cuda.nccl.version()
        out["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    return out


def verdict(report: dict[str, Any]) -> list[str]:
    """What failed in a report of :func:`main` (empty: every check that ran passed)."""
    bad: list[str] = []
    w1 = report.get("world_one", {})
    if "error" in w1:
        bad.append(f"world 1: {w1['error']}")
    elif not w1.get("aborted") or not w1.get("errored") or w1.get("collective_after") != 1.0:
        bad.append(f"world 1: aborted {w1.get('aborted')}, errored {w1.get('errored')!r}, "
                   f"collective after re-forming {w1.get('collective_after')}")
    two = report.get("two_ranks", {})
    if "skipped" in two:
        return bad
    if "error" in two:
        bad.append(f"two ranks: {two['error']}")
    if not two.get("rank1_stopped"):
        bad.append("two ranks: rank 1 never reported that it stopped itself")
    released = two.get("released_s")
    if released is None or released > RELEASE_LIMIT_S:
        bad.append(f"two ranks: abort released rank 0 after {released} s (limit {RELEASE_LIMIT_S} s)")
    if two.get("collective_after") != 1.0:
        bad.append("two ranks: rank 0 did not run a collective in a re-formed group")
    return bad


def check_summary(summary: dict[str, Any], steps: int, failures: int,
                  baseline: dict[str, Any] | None = None) -> list[str]:
    """What is wrong with a faulted raypod job's ``summary.json`` (empty: nothing): it must
    succeed at ``steps`` after exactly ``failures`` failures and, given the fault-free
    run's summary, end on the same state digest."""
    bad: list[str] = []
    if summary.get("status") != "succeeded" or summary.get("final_step") != steps:
        bad.append(f"status {summary.get('status')} at step {summary.get('final_step')} "
                   f"(expected succeeded at {steps}): {summary.get('error')}")
    if summary.get("failures") != failures:
        bad.append(f"{summary.get('failures')} failures, expected {failures}")
    if baseline is not None and summary.get("final_state_sha256") != baseline.get("final_state_sha256"):
        bad.append("final_state_sha256 differs from the fault-free run")
    return bad


def _run_checks(cpu: bool) -> dict[str, Any]:
    from raypod.worker.group import NCCL_ENV

    use_cuda = not cpu and torch.cuda.is_available()
    report: dict[str, Any] = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
                              "versions": versions(), "nccl_env_wanted": NCCL_ENV}
    device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    try:
        report["world_one"] = world_one(device)
    except Exception as e:  # noqa: BLE001 - recorded, and verdict() fails on it
        report["world_one"] = {"device": str(device), "error": f"{type(e).__name__}: {e}"}
    report["nccl_env"] = {k: v for k, v in os.environ.items() if k.startswith("TORCH_NCCL_")}
    gpus = torch.cuda.device_count() if use_cuda else 0
    if use_cuda and gpus < 2:
        report["two_ranks"] = {"skipped": f"needs 2 GPUs, found {gpus}"}
    else:
        report["two_ranks"] = two_ranks(use_cuda)
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["summary"]:
        return _summary_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m raypod.bench.nccl_abort")
    p.add_argument("--cpu", action="store_true", help="gloo on CPU, the fallback without a GPU")
    p.add_argument("--out", default="nccl_abort.json")
    a = p.parse_args(argv)
    if not a.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu for the gloo fallback", file=sys.stderr)
        return 2
    report = _run_checks(a.cpu)
    report["failed"] = verdict(report)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(json.dumps({k: report[k] for k in ("world_one", "two_ranks", "nccl_env", "failed")}, indent=1,
                     default=str))
    return 1 if report["failed"] else 0


def _summary_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m raypod.bench.nccl_abort summary")
    p.add_argument("summary")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--failures", type=int, required=True)
    p.add_argument("--baseline", help="the fault-free run's summary.json")
    a = p.parse_args(argv)
    with open(a.summary) as f:
        summary = json.load(f)
    baseline = None
    if a.baseline:
        with open(a.baseline) as f:
            baseline = json.load(f)
    bad = check_summary(summary, a.steps, a.failures, baseline)
    events = [(e.get("kind"), e.get("step"), e.get("restored_from"), e.get("recovery_phases_s"))
              for e in summary.get("events", [])]
    print(f"{a.summary}: {summary.get('status')} at step {summary.get('final_step')}; events {events}; "
          + ("OK" if not bad else "FAILED: " + "; ".join(bad)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
