"""Elastic scaling on an autoscaling cluster: grow as nodes arrive, shrink when one goes.

A trial starts :class:`raypod.bench.fake_cluster.FakeAutoscalingCluster` (Ray's fake
multi-node autoscaler: a CPU-less head, worker nodes of one CPU, one worker node at
the start, up to three) and runs ``jobs/configs/tiny.yaml`` with ``scaling.min_workers:
1``, ``scaling.max_workers: 3`` and no spares. The job starts on what exists, asks the
autoscaler for room for three ranks, and grows at step boundaries as nodes come up
and their actors are warm. Once it has run ``--steps-at-max`` steps at three ranks,
the node of its last rank is terminated (raylet and every process on it); the job
shrinks in place and goes on, growing again if the autoscaler replaces the node. Until
that happened, the harness slows the job's last 50 steps down (0.25 s each), so that a
slow machine cannot end the job before the nodes arrive.

Figures, on the driver's clock (seconds since the job started):

* **node to step**: from a worker node first seen alive to the first step completed
  with a rank on it;
* **shrink gap**: from the last step completed before the node loss to the first one
  completed after it (``resumed_s - last_step_s`` of the failure event).

Each trial runs in its own process (it owns a Ray connection)::

    python -m raypod.bench.elastic --trial-out summary.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from typing import Any

from raypod.bench.trials import REPO, one_trial_main

TINY = REPO / "jobs" / "configs" / "tiny.yaml"


def _watch(driver: Any, cluster: Any, steps_at_max: int, log: dict[str, Any], stop: threading.Event) -> None:
    """Record when nodes appear; terminate the last rank's node after ``steps_at_max`` steps at max."""
    seen: dict[str, float] = log.setdefault("nodes_seen_s", {})
    at_max_step = None
    while not stop.is_set():
        for n in cluster.alive_workers():
            seen.setdefault(n["NodeID"], round(driver.acct.now(), 3))
        group = driver.group
        if group is not None and "terminated" not in log and group.world_size == driver.cfg.scaling.max_workers:
            if at_max_step is None:
                at_max_step = driver.done_step
            elif driver.done_step >= at_max_step + steps_at_max and group.nodes:
                node = group.nodes[-1]
                log["terminated"] = {"node_id": node, "at_s": round(driver.acct.now(), 3),
                                     "after_step": driver.done_step}
                cluster.terminate_node(node)
        time.sleep(0.1)


def _prepared(cfg: Any) -> Any:
    """The job's recipe after raypod.api.run's data step (the demo corpus built on first use,
    its tokens prepared with Ray Data; a fresh machine has neither), on a private local Ray
    of its own before the autoscaling cluster starts: Ray Data's CPU demand there would have
    the autoscaler add nodes before the job has started on its one node."""
    import ray

    from raypod import ray_auth
    from raypod.recipe import build_recipe

    recipe = build_recipe(cfg)
    recipe.check_data(cfg)
    ray_auth.for_new_cluster()
    ray.init(address="local", include_dashboard=False, num_cpus=2, log_to_driver=False)
    try:
        recipe.prepare_data(cfg)  # into the job's token cache: the ranks read it from there
    finally:
        ray.shutdown()
    return recipe


def run_trial(config: str | os.PathLike = TINY, overrides: list[str] | None = None,
              steps_at_max: int = 10) -> dict[str, Any]:
    import ray

    from raypod.bench.fake_cluster import FakeAutoscalingCluster
    from raypod.callbacks import Callback, StepReport
    from raypod.config import load_config
    from raypod.driver.controller import Driver
    from raypod.progress import ProgressPrinter

    log: dict[str, Any] = {}

    class StepLog(Callback):
        """Records (step, time, world size); holds the job's last steps back until the node
        was terminated, so that a slow machine cannot finish before the scenario happened."""

        def __init__(self, hold_from: int) -> None:
            self.rows: list[tuple[int, float, int]] = []
            self.hold_from = hold_from

        def after_step(self, report: StepReport) -> None:
            self.rows.append((report.step, report.time_s, int(report.metrics["world_size"])))
            if report.step >= self.hold_from and "terminated" not in log:
                time.sleep(0.25)

    storage = tempfile.mkdtemp(prefix="raypod-elastic-")
    cfg = load_config(config, [f"checkpoint.storage={storage}", "name=elastic", "mlflow.enabled=false",
                               "scaling.min_workers=1", "scaling.max_workers=3", "scaling.spares=0",
                               *(overrides or [])])
    recipe = _prepared(cfg)
    cluster = FakeAutoscalingCluster(worker_min=1, worker_max=3)
    cluster.start()
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_workers(1)
        steps = StepLog(hold_from=max(1, cfg.train.max_steps - 50))
        driver = Driver(cfg, callbacks=[steps, ProgressPrinter(live=False)], recipe=recipe)
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(driver, cluster, steps_at_max, log, stop), daemon=True)
        watcher.start()
        summary = driver.run()
        stop.set()
        watcher.join(timeout=5)
        summary["elastic"] = {**log, "steps": steps.rows}
        return summary
    finally:
        ray.shutdown()
        cluster.stop()


def figures(summary: dict[str, Any]) -> dict[str, Any]:
    """Node-to-step seconds per grown node, and the shrink gap."""
    el = summary.get("elastic", {})
    rows = el.get("steps", [])
    grows = [r for r in summary.get("resizes", []) if r["kind"] == "grow"]
    node_to_step = []
    # New nodes in the order they appeared (the first node was there at the start); each
    # grow by n ranks takes the n earliest not yet taken that had appeared by then, and its
    # ranks first contribute to the first step completed after it at >= its new world size
    # (two grows can follow each other before a step completes between them).
    waiting = sorted(el.get("nodes_seen_s", {}).values())[1:]
    for g in grows:
        first = next((t for s, t, w in rows if w >= g["to"] and t >= g["at_s"]), None)
        appeared = [t for t in waiting if t <= g["at_s"]][: max(0, g["to"] - g["from"])]
        for t in appeared:
            waiting.remove(t)
            if first is not None:
                node_to_step.append(round(first - t, 3))
    gaps = [round(e["resumed_s"] - e["last_step_s"], 3) for e in summary.get("events", [])
            if e.get("resumed_s") is not None and e.get("last_step_s") is not None]
    return {"status": summary.get("status"), "world_sizes": summary.get("world_sizes"),
            "resizes": [(r["kind"], r["from"], r["to"]) for r in summary.get("resizes", [])],
            "node_to_step_s": node_to_step, "shrink_gap_s": gaps, "samples": summary.get("samples")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="raypod: grow and shrink on Ray's fake autoscaling cluster")
    p.add_argument("--trial-out", required=True, help="write the job summary here")
    p.add_argument("--config", default=str(TINY))
    p.add_argument("--steps-at-max", type=int, default=10)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args(argv)
    return one_trial_main(lambda: run_trial(a.config, a.overrides, a.steps_at_max), a.trial_out, figures)


if __name__ == "__main__":
    sys.exit(main())
