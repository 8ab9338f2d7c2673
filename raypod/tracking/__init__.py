"""Experiment tracking callbacks (MLflow)."""

from raypod.tracking.mlflow import MLflowCallback, resolve_tracking_uri

__all__ = ["MLflowCallback", "resolve_tracking_uri"]
