"""What many tests share: the repository's paths and the tiny test job's config.

Importable from every test module (``pythonpath = ["tests"]`` in pyproject.toml).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIGS = REPO / "jobs" / "configs"
TINY = CONFIGS / "tiny.yaml"
"""The small GPT on 2 CPU ranks: the integration tests' job."""
MLP = CONFIGS / "mlp.yaml"


def tiny_job(storage: Path | str, *overrides: str, name: str = "it", max_steps: int = 20,
             mlflow: bool = False) -> Any:
    """``tiny.yaml`` as the integration tests run it: its own storage and name, a
    checkpoint every 5 steps, no MLflow unless asked; ``overrides`` (``key=value``) last."""
    from raypod.config import load_config

    base = [f"checkpoint.storage={storage}", f"name={name}", f"train.max_steps={max_steps}",
            "checkpoint.every_steps=5", "fault.hang_timeout_s=60"]
    if not mlflow:
        base.append("mlflow.enabled=false")
    return load_config(TINY, base + list(overrides))
