"""The job's config as MLflow params, and the run's params and tags as MLflow calls.

Params are ``cfg.flat()`` with secrets redacted (:mod:`raypod.redact`), keys cleaned of
characters MLflow refuses and values cut to MLflow's limits. A run continued by a later
submission keeps its first value of a param (MLflow refuses to change one); a new value
becomes a ``raypod.param_changed.<key>`` tag instead.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from raypod.redact import redact

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from raypod.config import JobConfig

MAX_PARAM_VAL = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VAL = 5000  # below MLflow 3's 8000, which older servers do not accept
_MAX_KEY = 250
_PARAMS_TAGS_PER_BATCH = 100
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")
_CHANGED = "Changing param values is not allowed"


def params_from_config(cfg: JobConfig) -> dict[str, str]:
    """``cfg.flat()`` as MLflow params: secrets redacted, keys sanitised, values truncated.

    Args:
        cfg: The job's config.

    Returns:
        ``{"section.key": "value"}`` ready for ``Param`` entities.
    """
    out: dict[str, str] = {}
    for key, value in cfg.flat().items():
        value = redact(key, value)
        text = json.dumps(value) if isinstance(value, dict | list) else str(value)
        out[clean_key(key)] = text[:MAX_PARAM_VAL]
    return out


def clean_key(key: str) -> str:
    """A metric, param or tag key MLflow accepts (odd characters replaced, length capped)."""
    return _BAD_KEY_CHARS.sub("_", key)[:_MAX_KEY]


def changed_tag(key: str, value: str) -> tuple[str, str]:
    """The ``raypod.param_changed.<key>`` tag that records a param's new value."""
    return clean_key(f"raypod.param_changed.{key}"), value[:MAX_TAG_VAL]


def drop_existing(params: dict[str, str], existing: dict[str, str], tags: dict[str, str]) -> None:
    """Remove from ``params`` those the run has already; a changed value goes into ``tags``."""
    for k, v in list(params.items()):
        if k in existing:
            if existing[k] != v:
                key, value = changed_tag(k, v)
                tags[key] = value
            del params[k]


def log_params(client: MlflowClient, run_id: str, params: dict[str, str],
               tags: dict[str, str]) -> None:
    """Log ``params`` in batches, removing each batch once it is in; refused changes go to ``tags``."""
    from mlflow.entities import Param

    items = list(params.items())
    for i in range(0, len(items), _PARAMS_TAGS_PER_BATCH):
        chunk = items[i:i + _PARAMS_TAGS_PER_BATCH]
        try:
            client.log_batch(run_id, params=[Param(k, v) for k, v in chunk], synchronous=True)
        except Exception as e:
            if _CHANGED not in str(e):
                raise
            _log_params_one_by_one(client, run_id, chunk, tags)
        for k, _ in chunk:
            params.pop(k, None)


def _log_params_one_by_one(client: MlflowClient, run_id: str, chunk: list[tuple[str, str]],
                           tags: dict[str, str]) -> None:
    for k, v in chunk:
        try:
            client.log_param(run_id, k, v, synchronous=True)
        except Exception as e:
            if _CHANGED not in str(e):
                raise
            key, value = changed_tag(k, v)
            tags[key] = value


def log_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    """Set run tags in batches (keys cleaned, values cut to MLflow's limit)."""
    from mlflow.entities import RunTag

    items = [(clean_key(k), str(v)[:MAX_TAG_VAL]) for k, v in tags.items()]
    for i in range(0, len(items), _PARAMS_TAGS_PER_BATCH):
        client.log_batch(
            run_id, tags=[RunTag(k, v) for k, v in items[i:i + _PARAMS_TAGS_PER_BATCH]],
            synchronous=True)
