"""A small job on a 2-node ``ray.cluster_utils.Cluster`` that logs to an MLflow server.

Run as a subprocess by the ``mlflow_cluster_job`` fixture (tests/conftest.py), because a
Cluster cannot share a process with pytest's connection to the session cluster (as in
``raypod.bench.node_loss``): a head node with no CPUs (the driver only) and two worker
nodes of two CPUs, one rank on each (``SPREAD``). The MLP recipe (pytorch flavour) trains
a few steps with MLflow on, the final model registered; the job's summary is written
to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MLP = REPO / "jobs" / "configs" / "mlp.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--storage", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("raypod").setLevel(logging.INFO)

    import ray
    from ray.cluster_utils import Cluster

    from raypod import ray_auth
    from raypod.api import run
    from raypod.config import load_config
    from raypod.tracking import MLflowCallback

    cfg = load_config(MLP, [f"checkpoint.storage={a.storage}", "mlflow.enabled=true",
                            "scaling.placement_strategy=SPREAD", "scaling.spares=0", *a.overrides])
    ray_auth.for_new_cluster()  # its nodes enforce token authentication; this driver sends it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        cb = MLflowCallback(flush_interval_s=0.25, system_metrics_interval_s=1.0)
        summary = run(cfg, callbacks=[cb], progress=False, handle_signals=False)
        summary["worker_nodes"] = [n.node_id for n in nodes]
    finally:
        ray.shutdown()
        cluster.shutdown()
    Path(a.out).write_text(json.dumps(summary, indent=2, default=str))
    return 0 if summary.get("status") == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
