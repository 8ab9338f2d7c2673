"""Elastic anchor: tiny.yaml's GPT under Ray Train V2's elastic mode on Ray's fake autoscaler.

    RAY_TRAIN_V2_ENABLED=1 python -m raypod.bench.anchors.elastic_ray_train --trial-out FILE \
        [--steps 200] [--steps-at-max 10] [--monitor-interval-s 60] [--checkpoint-every 20]

The same scenario as :mod:`raypod.bench.elastic`: a fresh
:class:`raypod.bench.fake_cluster.FakeAutoscalingCluster` (CPU-less head, 1-CPU worker
nodes, one at the start, up to three), and a ``TorchTrainer`` with
``ScalingConfig(num_workers=(1, 3), resources_per_worker={"CPU": 1})`` (Ray Train asks
the autoscaler for room for three workers itself), ``FailureConfig(max_failures=3)``
and ``elastic_resize_monitor_interval_s`` at Ray's default, 60 s, unless
``--monitor-interval-s`` says otherwise. Ray Train resizes a running group by stopping
every worker and starting a group of the new size, which resumes from the last
reported checkpoint; a lost node fails the group, which restarts at the size the
cluster now has.

Each worker runs :class:`raypod.bench.anchors.common.Run` (the GPT, FSDP2 on gloo, the
same seeded sample order, global batch 16 split across the ranks whatever their number,
the LR schedule on the global step). Every ``--checkpoint-every`` steps (tiny.yaml's
``checkpoint.every_steps``) and at the end, each rank DCP-saves its shards and reports
them with ``ray.train.report(..., checkpoint=...)``; a restarted group restores from
``ray.train.get_checkpoint()`` (DCP reshards to the new world size). At the start of
every attempt rank 0 records the node id of every rank (``groups.jsonl``) and after
every step appends ``step,unix_time,world_size,attempt`` to ``steps.log``.

The harness (this process) watches the cluster: it records the unix time each worker
node is first seen alive, and once ``--steps-at-max`` steps ran at three workers it
terminates the node of the highest rank (raylet and every process on it). Until then,
like raypod's harness, rank 0 sleeps 0.25 s after each of the last 50 steps, so that a
slow machine cannot end the job before the scenario happened; and since Ray Train only
considers a resize ``elastic_resize_monitor_interval_s`` after a group started (a
1-rank group finishes 200 steps here in well under 60 s), every rank also waits before
the final step's checkpoint until the node was terminated (``--hold-max-s``, 300 s at
most). Neither wait changes when Ray Train resizes or how long a restart takes.

Figures (:func:`anchor_figures`, all on the unix clock of this one machine):

* **node to step**: for each worker node that appeared after the start, from its first
  seen time to the first step-log line of an attempt whose group has a rank on it;
* **shrink gap**: from the last step-log line before the termination to the first one
  after it;
* **steps replayed**: step numbers completed more than once (resizes and the shrink
  restart from the last checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

MAX_WORKERS = 3
HOLD_LAST = 50
HOLD_S = 0.25


# ---- the training function (runs in every Ray Train worker) --------------------------
def train_loop_per_worker(config: dict) -> None:
    import ray
    import ray.train
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from raypod.bench.anchors.common import Run
    from raypod.bench.anchors.mlp_common import AppState, next_attempt

    workdir = config["workdir"]
    steps = int(config["steps"])
    every = int(config["checkpoint_every"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    attempt = next_attempt(os.path.join(workdir, "attempts")) if rank == 0 else -1
    run = Run()
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if rank == 0:
        with open(os.path.join(workdir, "groups.jsonl"), "a") as f:
            f.write(json.dumps({"attempt": attempt, "world_size": world, "nodes": nodes,
                                "t": time.time()}) + "\n")
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            dcp.load({"app": AppState(run.model, run.optimizer)}, checkpoint_id=ckpt_dir)
            with open(os.path.join(ckpt_dir, "step.txt")) as f:
                start = int(f.read())
    terminated = os.path.join(workdir, "terminated")
    for step in range(start + 1, steps + 1):
        loss = run.step(step)
        if rank == 0:
            with open(os.path.join(workdir, "steps.log"), "a") as f:
                f.write(f"{step},{time.time():.6f},{world},{attempt}\n")
            if step > steps - HOLD_LAST and not os.path.exists(terminated):
                time.sleep(HOLD_S)
        if step == steps and not os.path.exists(terminated):
            _wait_for(terminated, float(config["hold_max_s"]))  # before the last checkpoint
        if step % every == 0 or step == steps:
            with tempfile.TemporaryDirectory() as tmp:
                dcp.save({"app": AppState(run.model, run.optimizer)}, checkpoint_id=tmp)
                if rank == 0:
                    with open(os.path.join(tmp, "step.txt"), "w") as f:
                        f.write(str(step))
                ray.train.report({"step": step, "loss": loss, "world_size": world},
                                 checkpoint=ray.train.Checkpoint.from_directory(tmp))
    dist.barrier()


def _wait_for(path: str, limit_s: float) -> None:
    """Every rank waits (up to ``limit_s``) until ``path`` exists: the last step is held until
    the harness terminated the node, so that the job cannot end before the scenario did."""
    deadline = time.monotonic() + limit_s
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.2)


# ---- reading what the workers wrote ----------------------------------------------------
def read_step_log(path: str | os.PathLike) -> list[tuple[int, float, int, int]]:
    """``(step, unix_time, world_size, attempt)`` per line of ``steps.log``, in file order."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    for line in p.read_text().splitlines():
        parts = line.strip().split(",")
        if len(parts) == 4:
            rows.append((int(parts[0]), float(parts[1]), int(parts[2]), int(parts[3])))
    return rows


def read_groups(path: str | os.PathLike) -> dict[int, list[str]]:
    """attempt -> node id of each rank (rank order), from ``groups.jsonl``."""
    out: dict[int, list[str]] = {}
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        if line.strip():
            g = json.loads(line)
            out[int(g["attempt"])] = list(g["nodes"])
    return out


# ---- figures -------------------------------------------------------------------------
def anchor_figures(rows: list[tuple[int, float, int, int]], groups: dict[int, list[str]],
                   nodes_seen: dict[str, float], initial_nodes: list[str],
                   terminated: dict[str, Any] | None) -> dict[str, Any]:
    """Node-to-step seconds per node that appeared after the start, the shrink gap and steps replayed.

    Args:
        rows: the step log, ``(step, unix_time, world_size, attempt)``.
        groups: attempt -> node id per rank.
        nodes_seen: node id -> unix time it was first seen alive.
        initial_nodes: the nodes already there when training started (not "new").
        terminated: ``{"node_id", "at"}`` (unix time) of the terminated node, or None.
    """
    node_to_step: list[float] = []
    never_used: list[str] = []
    for node, seen in sorted(nodes_seen.items(), key=lambda kv: kv[1]):
        if node in initial_nodes:
            continue
        first = next((t for _, t, _, a in rows if t >= seen and node in groups.get(a, [])), None)
        if first is None:
            never_used.append(node)
        else:
            node_to_step.append(round(first - seen, 3))
    gaps: list[float] = []
    shrink: dict[str, Any] = {}
    if terminated is not None:
        at = float(terminated["at"])
        before = [r for r in rows if r[1] <= at]
        after = [r for r in rows if r[1] > at]
        if before and after:
            gaps.append(round(after[0][1] - before[-1][1], 3))
            shrink = {"last_step_before": before[-1][0], "first_step_after": after[0][0],
                      "world_size_after": after[0][2],
                      "replayed": max(0, before[-1][0] - after[0][0] + 1)}
    counts = Counter(r[0] for r in rows)
    sizes: list[int] = []
    for r in rows:
        if not sizes or sizes[-1] != r[2]:
            sizes.append(r[2])
    resizes = [("grow" if b > a else "shrink", a, b) for a, b in zip(sizes, sizes[1:], strict=False)]
    return {"node_to_step_s": node_to_step, "nodes_never_used": never_used, "shrink_gap_s": gaps,
            "shrink": shrink, "replayed": sum(c - 1 for c in counts.values()),
            "attempts": len({r[3] for r in rows}), "world_sizes": sizes, "resizes": resizes,
            "final_step": max(counts) if counts else None, "samples_per_step": 16}


# ---- one trial -----------------------------------------------------------------------
def _watch(cluster: Any, workdir: Path, steps_at_max: int, log: dict[str, Any], stop: threading.Event) -> None:
    """Record when nodes appear; terminate the highest rank's node after ``steps_at_max`` steps at max."""
    seen: dict[str, float] = log.setdefault("nodes_seen", {})
    while not stop.is_set():
        try:
            for n in cluster.alive_workers():
                seen.setdefault(n["NodeID"], round(time.time(), 3))
        except Exception as e:  # noqa: BLE001 - a GCS hiccup must not end the watcher
            log.setdefault("watch_errors", []).append(repr(e)[:200])
        if "terminated" not in log:
            rows = read_step_log(workdir / "steps.log")
            if rows:
                attempt = rows[-1][3]
                at_max = [r for r in rows if r[3] == attempt and r[2] == MAX_WORKERS]
                group = read_groups(workdir / "groups.jsonl").get(attempt)
                if len(at_max) >= steps_at_max and group and len(group) == MAX_WORKERS:
                    node = group[-1]
                    log["terminated"] = {"node_id": node, "at": round(time.time(), 6),
                                         "after_step": rows[-1][0], "attempt": attempt}
                    cluster.terminate_node(node)
                    (workdir / "terminated").write_text(json.dumps(log["terminated"]))
        time.sleep(0.1)


def run_trial(steps: int = 200, steps_at_max: int = 10, monitor_interval_s: float = 60.0,
              checkpoint_every: int = 20, hold_max_s: float = 300.0,
              name: str = "elastic-ray-train") -> dict[str, Any]:
    """One trial on a fresh fake autoscaling cluster; returns the raw record and its figures."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raypod.bench.fake_cluster import REPO, FakeAutoscalingCluster

    work = Path(tempfile.mkdtemp(prefix="rpe-", dir="/tmp"))
    workdir, storage = work / "work", work / "storage"
    workdir.mkdir()
    storage.mkdir()
    log: dict[str, Any] = {}
    rec: dict[str, Any] = {"system": "ray_train_v2", "steps": steps, "steps_at_max": steps_at_max,
                           "elastic_resize_monitor_interval_s": monitor_interval_s,
                           "checkpoint_every": checkpoint_every, "hold_max_s": hold_max_s, "error": None}
    cluster = FakeAutoscalingCluster(worker_min=1, worker_max=MAX_WORKERS)
    cluster.start()
    stop = threading.Event()
    try:
        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        # RAY_ADDRESS: Ray Train's helper actors (PlacementGroupCleaner) otherwise look the
        # cluster up themselves and fail when other Ray instances run on the machine.
        os.environ["RAY_ADDRESS"] = cluster.address
        ray.init(address=cluster.address, log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "RAY_TRAIN_V2_ENABLED": "1",
                                           "RAY_ADDRESS": cluster.address}})
        cluster.wait_for_workers(1)
        rec["initial_nodes"] = [n["NodeID"] for n in cluster.alive_workers()]
        watcher = threading.Thread(target=_watch, args=(cluster, workdir, steps_at_max, log, stop), daemon=True)
        watcher.start()
        rec["fit_started"] = time.time()
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"steps": steps, "workdir": str(workdir), "checkpoint_every": checkpoint_every,
                               "hold_max_s": hold_max_s},
            scaling_config=ScalingConfig(num_workers=(1, MAX_WORKERS), resources_per_worker={"CPU": 1},
                                         use_gpu=False, elastic_resize_monitor_interval_s=monitor_interval_s),
            run_config=RunConfig(storage_path=str(storage), name=name,
                                 failure_config=FailureConfig(max_failures=3)),
        )
        try:
            result = trainer.fit()
            if getattr(result, "error", None) is not None:
                rec["error"] = f"{type(result.error).__name__}: {result.error}"[:2000]
        except BaseException as e:  # noqa: BLE001 - the anchor's failure (or a SIGTERM) is its result
            rec["error"] = f"{type(e).__name__}: {e}"[:2000]
        rec["fit_ended"] = time.time()
    finally:
        stop.set()
        ray.shutdown()
        cluster.stop()
    rows = read_step_log(workdir / "steps.log")
    groups = read_groups(workdir / "groups.jsonl")
    rec.update(nodes_seen=log.get("nodes_seen", {}), terminated=log.get("terminated"),
               watch_errors=log.get("watch_errors", [])[:5], groups=groups, step_log=rows)
    rec["figures"] = anchor_figures(rows, groups, rec["nodes_seen"], rec.get("initial_nodes", []),
                                    rec["terminated"])
    rec["succeeded"] = rec["error"] is None and rec["figures"]["final_step"] == steps
    shutil.rmtree(work, ignore_errors=True)
    return rec


def _terminated(signum: int, frame: Any) -> None:  # noqa: ARG001
    raise SystemExit(f"terminated by signal {signum} (SIGTERM from outside the trial)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Ray Train V2 elastic mode: grow and shrink on Ray's fake autoscaler")
    p.add_argument("--trial-out", required=True, help="write the trial record (JSON) here")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--steps-at-max", type=int, default=10)
    p.add_argument("--monitor-interval-s", type=float, default=60.0,
                   help="ScalingConfig.elastic_resize_monitor_interval_s (Ray's default: 60)")
    p.add_argument("--checkpoint-every", type=int, default=20)
    p.add_argument("--hold-max-s", type=float, default=300.0,
                   help="longest the last step waits for the node termination")
    a = p.parse_args(argv)
    if os.environ.get("RAY_TRAIN_V2_ENABLED") != "1":
        print("elastic_ray_train: set RAY_TRAIN_V2_ENABLED=1", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminated)
    rec = run_trial(a.steps, a.steps_at_max, a.monitor_interval_s, a.checkpoint_every, a.hold_max_s)
    Path(a.trial_out).write_text(json.dumps(rec, indent=2, default=str))
    print(json.dumps({"error": rec["error"], **rec["figures"]}))
    return 0 if rec["succeeded"] else 1


if __name__ == "__main__":
    sys.exit(main())
