"""A job on a 2-node ``ray.cluster_utils.Cluster`` logs a registered MLflow model and every node.

The session fixture ``mlflow_cluster_job`` (tests/conftest.py) runs the MLP on two
worker nodes, one rank each, logging to the session's real ``mlflow server`` with
``mlflow.registered_model`` set. The run must hold the final model as an MLflow 3
logged model (pytorch flavour) that is registered, loads with ``mlflow.pytorch`` and
computes what the final state dict computes; system metrics of both worker nodes; and
per-rank step times for every step. ``test_mlflow_browser.py`` checks the same run in
the UI.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import (
    MLFLOW_CLUSTER_EXPERIMENT,
    MLFLOW_CLUSTER_JOB,
    MLFLOW_CLUSTER_MODEL,
    MLFLOW_REGISTERED_MODEL,
)
from support import MLP

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)  # the 2-node Cluster job runs in the fixture
def test_cluster_job_logs_a_registered_model_every_node_and_every_rank(mlflow_server, mlflow_cluster_job):
    import mlflow.pytorch
    import torch
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from raypod.config import load_config
    from raypod.recipe import RankContext, build_recipe

    summary = mlflow_cluster_job
    assert summary["status"] == "succeeded" and summary["final_step"] == 30
    client = MlflowClient(mlflow_server.uri)
    run_id = summary["mlflow_run_id"]
    run = client.get_run(run_id)
    exp = client.get_experiment_by_name(MLFLOW_CLUSTER_EXPERIMENT)

    # The final model: a logged model of the run (its output), READY, and registered.
    [output] = run.outputs.model_outputs
    [model] = [m for m in client.search_logged_models([exp.experiment_id]) if m.source_run_id == run_id]
    assert model.model_id == output.model_id and output.step == 30
    assert model.status == LoggedModelStatus.READY and run.data.tags["raypod.model_id"] == model.model_id
    [version] = client.search_model_versions(f"name='{MLFLOW_REGISTERED_MODEL}'")
    assert version.source == f"models:/{model.model_id}" and version.run_id == run_id
    artifacts = {f.path for f in client.list_artifacts(run_id)}
    assert "model" not in artifacts, "the plain state dict is not logged beside the MLflow model"

    # It loads from the registry and computes what the job's final weights compute.
    with _use_tracking_uri(mlflow_server.uri):
        loaded = mlflow.pytorch.load_model(f"models:/{MLFLOW_REGISTERED_MODEL}/{version.version}")
    cfg = load_config(MLP, [MLFLOW_CLUSTER_MODEL])
    reference = build_recipe(cfg).build_model(RankContext(0, 1, torch.device("cpu"), cfg))
    job_dir = Path(run.data.tags["raypod.job_dir"])
    reference.load_state_dict(torch.load(job_dir / "final_model.pt", weights_only=True))
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), reference(x))

    # System metrics of both worker nodes, named by node, with their addresses as tags.
    metrics = run.data.metrics
    for node in summary["worker_nodes"]:
        label = node[:8]
        for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
            assert f"system/{label}/{name}" in metrics, (label, sorted(metrics))
        assert re.fullmatch(r"\S+ \S+ \(\d+ GPUs\)", run.data.tags[f"raypod.node.{label}"])  # address host
    # Each rank's own compute and waits, one point per step.
    for rank in (0, 1):
        for key in ("compute_s", "wait_s", "data_s"):
            steps = sorted(m.step for m in client.get_metric_history(run_id, f"rank/{rank}/{key}"))
            assert steps == list(range(1, 31)), (rank, key)
    assert summary["mlflow_url"].endswith(f"/#/experiments/{exp.experiment_id}/runs/{run_id}"
                                          "?workflowType=machine_learning")
    assert run.info.run_name == MLFLOW_CLUSTER_JOB

