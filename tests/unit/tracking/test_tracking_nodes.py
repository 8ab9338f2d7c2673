"""Per-rank step figures, their cadence, and the MLflow UI link raypod gives (no Ray, no store)."""

from __future__ import annotations

from raypod.tracking.mlflow import run_url
from raypod.tracking.system import RANKS_EVERY_STEP, node_label, rank_metrics


def _ranks(n: int) -> dict[int, dict[str, float | str]]:
    return {r: {"compute_s": 0.1 * r, "wait_s": 0.01, "data_s": 0.002, "node_id": "f" * 56} for r in range(n)}


def test_rank_metrics_every_step_for_small_worlds_and_bounded_for_large_ones() -> None:
    small = rank_metrics(7, _ranks(2))
    assert small == {"rank/0/compute_s": 0.0, "rank/0/wait_s": 0.01, "rank/0/data_s": 0.002,
                     "rank/1/compute_s": 0.1, "rank/1/wait_s": 0.01, "rank/1/data_s": 0.002}
    n = 4 * RANKS_EVERY_STEP  # every 4th step only, so about 3 x RANKS_EVERY_STEP points a step
    logged = [s for s in range(1, 41) if rank_metrics(s, _ranks(n))]
    assert logged == list(range(4, 41, 4)) and len(rank_metrics(4, _ranks(n))) == 3 * n
    assert rank_metrics(3, {}) == {}
    assert node_label("0123456789abcdef" * 3) == "01234567"


def test_run_url_opens_model_training_pages_without_credentials() -> None:
    assert run_url("http://alice:s3cret@mlflow.example:5000/", "3", "abc") == (
        "http://mlflow.example:5000/#/experiments/3/runs/abc?workflowType=machine_learning")
    assert run_url("sqlite:////tmp/x/mlflow.db", "1", "r") == (
        "http://127.0.0.1:5000/#/experiments/1/runs/r?workflowType=machine_learning")
