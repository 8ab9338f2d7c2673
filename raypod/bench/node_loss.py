"""Node loss: a whole raylet of a multi-node Ray cluster removed while a job trains.

One trial starts a :class:`ray.cluster_utils.Cluster` in this process: a head node
with no CPUs (it hosts only the driver, so it is never the one lost) and two worker
nodes with two CPUs each. The job (``jobs/configs/mlp.yaml`` by default) places its two
ranks one per node (``SPREAD``) and a warm spare in the CPU left on one of them, so
each rank's in-memory replica lives on the other node. Once step ``--after-step``
completed, the worker node that holds a rank but not the spare is removed, raylet
and every process on it at once (``remove_node(allow_graceful=False)``), which is
what a lost VM looks like to the rest of the cluster.

The recovery gap is measured as in the ``recovery`` suite: ``resumed_s -
last_step_s`` of the failure event, on the driver's clock; steps replayed =
``lost_steps + 1`` (the step the survivor had started).

Each trial runs in its own process (a Cluster cannot share a process with another
Ray connection, such as pytest's session cluster)::

    python -m raypod.bench.node_loss --trials 3                  # the suite
    python -m raypod.bench.node_loss --trial-out summary.json    # one trial (tests)
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raypod.bench.table import write_results
from raypod.bench.trials import REPO, one_trial_main, suite_parser

MLP = REPO / "jobs" / "configs" / "mlp.yaml"


def _remove_when(driver: Any, cluster: Any, nodes: list[Any], after_step: int, log: dict[str, Any],
                 stop: threading.Event) -> None:
    """Watch the driver; once ``after_step`` completed, remove a rank's node that has no spare."""
    import ray

    while not stop.is_set():
        group = driver.group
        if group is not None and driver.done_step >= after_step and group.nodes:
            spare_nodes = set()
            for actor, _ in list(group.spares):
                try:
                    spare_nodes.add(ray.get(actor.node_info.remote(), timeout=5)["node_id"])
                except Exception:  # noqa: BLE001 - a spare still starting has no node yet
                    pass
            rank_nodes = list(group.nodes)
            target = next((n for n in nodes if n.node_id in rank_nodes and n.node_id not in spare_nodes),
                          None) or next(n for n in nodes if n.node_id in rank_nodes)
            log.update(removed_node=target.node_id, ranks_on_it=[r for r, n in enumerate(rank_nodes)
                                                                  if n == target.node_id],
                       spare_on_it=target.node_id in spare_nodes, at_step=driver.done_step,
                       removed_s=driver.acct.now())
            cluster.remove_node(target, allow_graceful=False)
            return
        time.sleep(0.005)


@contextlib.contextmanager
def local_cluster(nodes: int, resources: dict[str, float]) -> Iterator[tuple[Any, list[Any]]]:
    """A multi-raylet Ray cluster in this process, connected: ``(cluster, worker nodes)``.

    The head has no CPUs (it hosts only the driver, so it is never the node a test loses);
    each of the ``nodes`` worker raylets has ``resources`` (``CPU``, ``GPU``, custom ones; its
    ``memory`` is the machine's).
    Ray is disconnected and every raylet stopped on the way out, also after an error.
    """
    import ray
    from ray.cluster_utils import Cluster

    from raypod import ray_auth

    ray_auth.for_new_cluster()  # its nodes enforce token authentication; this driver sends it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU", "memory")}
        workers = [cluster.add_node(num_cpus=resources.get("CPU", 0), num_gpus=resources.get("GPU", 0),
                                    resources=custom) for _ in range(nodes)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


def run_trial(config: str | os.PathLike = MLP, overrides: list[str] | None = None, after_step: int = 25,
              storage: str | None = None) -> dict[str, Any]:
    """Run one node-loss trial in this process; returns the job summary plus ``node_loss``."""
    from raypod.config import load_config
    from raypod.driver.controller import Driver
    from raypod.progress import ProgressPrinter

    storage = storage or tempfile.mkdtemp(prefix="raypod-nodeloss-")
    cfg = load_config(config, [f"checkpoint.storage={storage}", "name=node-loss", "checkpoint.memory_every_steps=1",
                               "scaling.placement_strategy=SPREAD", "mlflow.enabled=false",
                               *(overrides or [])])
    with local_cluster(2, {"CPU": 2}) as (cluster, nodes):
        driver = Driver(cfg, callbacks=[ProgressPrinter(live=False)])
        removal: dict[str, Any] = {}
        stop = threading.Event()
        watcher = threading.Thread(target=_remove_when, args=(driver, cluster, nodes, after_step, removal,
                                                              stop), daemon=True)
        watcher.start()
        summary = driver.run()
        stop.set()
        summary["node_loss"] = removal
        return summary


def figures(summary: dict[str, Any]) -> dict[str, Any]:
    """Gap, replayed steps and recovery source of a trial's summary."""
    ev = (summary.get("events") or [{}])[0]
    gap = None
    if ev.get("resumed_s") is not None and ev.get("last_step_s") is not None:
        gap = round(ev["resumed_s"] - ev["last_step_s"], 3)
    return {
        "recovered": summary.get("status") == "succeeded" and bool(summary.get("events")),
        "gap_s": gap,
        "detect_s": None if ev.get("detected_s") is None or ev.get("last_step_s") is None
        else round(ev["detected_s"] - ev["last_step_s"], 3),
        "replayed": None if ev.get("lost_steps") is None else ev["lost_steps"] + 1,
        "restored_from": ev.get("restored_from"),
        "spare_on_lost_node": summary.get("node_loss", {}).get("spare_on_it"),
        "samples": summary.get("samples"),
    }


def run_suite(trials: int = 3, out: str | os.PathLike | None = "benchmarks/results") -> dict[str, Any]:
    """Run ``trials`` trials, each in a fresh process, print and write the table."""
    rows = []
    for i in range(trials):
        with tempfile.TemporaryDirectory(prefix="raypod-nodeloss-") as tmp:
            path = Path(tmp) / "summary.json"
            t0 = time.time()
            proc = subprocess.run([sys.executable, "-m", "raypod.bench.node_loss", "--trial-out", str(path)],
                                  cwd=REPO, capture_output=True, text=True, timeout=600)
            summary = json.loads(path.read_text()) if path.exists() else {}
            row = {"trial": i + 1, "exit": proc.returncode, "wall_s": round(time.time() - t0, 1),
                   **figures(summary)}
            if proc.returncode != 0:
                row["stderr_tail"] = proc.stderr[-1500:]
            rows.append(row)
            print(f"trial {i + 1}: {row}", flush=True)
    gaps = [r["gap_s"] for r in rows if r["gap_s"] is not None]
    result = {
        "suite": "node_loss",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
        "command": f"raypod bench node_loss --trials {trials}",
        "workload": "jobs/configs/mlp.yaml, 2 ranks on 2 worker nodes (SPREAD), spares: 1",
        "trials": rows,
        "median_gap_s": statistics.median(gaps) if gaps else None,
        "recovered": sum(1 for r in rows if r["recovered"]),
    }
    table = markdown(result)
    print(table)
    write_results(result, out, "node_loss", table, newline=False)
    return result


def markdown(r: dict[str, Any]) -> str:
    lines = [f"Node loss ({r['date']}, {r['machine']}): `{r['command']}`", "",
             "| trial | recovered | gap s | detect s | steps replayed | restored from | spare on lost node |",
             "|---|---|---|---|---|---|---|"]
    for t in r["trials"]:
        lines.append(f"| {t['trial']} | {t['recovered']} | {t['gap_s']} | {t['detect_s']} | {t['replayed']} "
                     f"| {t['restored_from']} | {t['spare_on_lost_node']} |")
    lines += ["", f"Median gap: {r['median_gap_s']} s; recovered {r['recovered']}/{len(r['trials'])}.", ""]
    return "\n".join(lines)


def run(trials: int = 3, out: str | os.PathLike | None = "benchmarks/results") -> dict[str, Any]:
    """Entry point for ``raypod bench node_loss``."""
    return run_suite(trials=trials, out=out)


def main(argv: list[str] | None = None) -> int:
    p = suite_parser("raypod: recovery from the loss of a whole Ray node")
    p.add_argument("--trial-out", help="run one trial in this process and write its summary here")
    p.add_argument("--config", default=str(MLP))
    p.add_argument("--after-step", type=int, default=25)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args(argv)
    if a.trial_out:
        return one_trial_main(lambda: run_trial(a.config, a.overrides, a.after_step), a.trial_out, figures)
    run_suite(a.trials, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
