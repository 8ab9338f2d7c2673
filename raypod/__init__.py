"""raypod: resilient PyTorch training on any Ray cluster.

A driver on Ray coordinates one actor per rank of a sharded PyTorch job (FSDP2,
HSDP or DDP), keeps it training through failures, and logs to one MLflow run.
"""

from raypod.callbacks import Callback
from raypod.config import ConfigError, JobConfig, load_config
from raypod.recipe import RankContext, Recipe

__version__ = "0.1.0"

__all__ = ["Callback", "ConfigError", "JobConfig", "RankContext", "Recipe", "load_config", "run"]


def run(config: JobConfig, **kwargs):  # noqa: ANN001, ANN201 - thin lazy re-export
    """Run a job; see :func:`raypod.api.run`."""
    from raypod.api import run as _run

    return _run(config, **kwargs)
