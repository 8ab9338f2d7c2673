"""Experiment tracking callbacks (MLflow).

:mod:`~raypod.tracking.mlflow` holds the driver callback (its hooks only queue work);
:mod:`~raypod.tracking.sender` is its background thread (batching, retries, the spool of
:mod:`~raypod.tracking.spool`); :mod:`~raypod.tracking.identity` finds the one run per job
name; :mod:`~raypod.tracking.params` turns the config into redacted params and sends params
and tags; :mod:`~raypod.tracking.events` numbers failure and resize events as tags;
:mod:`~raypod.tracking.artifacts` logs the run's end, with the final model of
:mod:`~raypod.tracking.model`; :mod:`~raypod.tracking.system` samples the nodes.
"""

from raypod.tracking.mlflow import MLflowCallback, resolve_tracking_uri

__all__ = ["MLflowCallback", "resolve_tracking_uri"]
