"""Benchmarks that run raypod side by side with anchors in one invocation.

Each suite reports absolute figures for raypod and for the systems it is compared
with, measured in the same run on the same machine, plus the ratios between them.

    raypod bench startup --trials 3      # launch to first step vs Ray Train V2 and torchrun
    raypod bench recovery --trials 3     # a worker killed: gap and replayed steps vs the same
    raypod bench logging                 # MLflow logging overhead vs logging off
    raypod bench node_loss --trials 3    # a whole Ray node removed: in-place recovery gap
    raypod bench overhead --trials 3     # steady-state step time vs torchrun and a plain loop
    raypod bench checkpoint --trials 3   # stall of a snapshot / persistent save vs Ray Train V2
    raypod bench data                    # Ray Data stream vs training consumption, data_wait_frac
    raypod bench elastic --trials 1      # grow/shrink on the fake autoscaler vs Ray Train V2 elastic
    raypod bench goodput                 # 600 s, a rank SIGKILLed every 60 s: goodput vs the same
    raypod bench gpu                     # one GPU: tokens/s and MFU vs a plain PyTorch loop
    raypod bench scale --ranks 2,4,8,16,32  # the driver at N ranks vs no driver; the simulator's calibration
    raypod bench sim                     # the real driver vs 1k/10k/100k simulated ranks (virtual time)

``python -m raypod.bench.plots`` draws one PNG per suite from the JSON files.

Layout: one module per suite (``elastic_suite`` for ``elastic``; ``elastic`` and
``node_loss`` also run one in-process trial for the tests), all on one skeleton:
``trials`` (a session, a tagged trial in its own folder, the cold subprocess, the
interleaved loop, draining), ``table`` (cells, medians, ratios, Markdown and rich
tables, the result files) and, for the step-time suites (overhead, checkpoint, gpu),
``steptime``. ``chaos`` is ``raypod chaos``; ``gpu_probe`` a one-GPU step-time probe
without Ray; ``fake_cluster`` Ray's fake autoscaler; ``anchors/`` the other systems.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

SUITES: dict[str, str] = {
    "startup": "raypod.bench.startup",
    "recovery": "raypod.bench.recovery",
    "logging": "raypod.bench.logging",
    "node_loss": "raypod.bench.node_loss",
    "overhead": "raypod.bench.overhead",
    "checkpoint": "raypod.bench.checkpoint",
    "data": "raypod.bench.data",
    "elastic": "raypod.bench.elastic_suite",
    "goodput": "raypod.bench.goodput",
    "gpu": "raypod.bench.gpu",
    "scale": "raypod.bench.scale",
    "sim": "raypod.bench.sim",
}
"""Suite name -> module with ``run(trials=..., out=...) -> dict``."""


def run_suite(suite: str, trials: int | None = 3, out: str | os.PathLike | None = "benchmarks/results",
              **options: Any) -> dict[str, Any]:
    """Run benchmark ``suite``, print its table, write ``<out>/<suite>.json`` and ``.md``.

    Args:
        suite: one of :data:`SUITES`.
        trials: trials per system (``None``: the suite's default).
        out: folder for the results (``None``: write nothing).
        options: more keyword arguments of the suite's ``run`` (goodput: ``duration``,
            ``kill_every``).

    Returns:
        The results (what the JSON file holds).

    Raises:
        ValueError: ``suite`` is not a known suite.
    """
    if suite not in SUITES:
        raise ValueError(f"unknown benchmark suite '{suite}' (known: {', '.join(SUITES)})")
    kwargs: dict[str, Any] = {"out": out, **options}
    if trials is not None:
        kwargs["trials"] = trials
    return importlib.import_module(SUITES[suite]).run(**kwargs)
