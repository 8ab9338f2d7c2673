"""What-if for BENCHMARKS.md "Scale": ``raypod bench sim`` at 10,000 ranks with ``fault.silent_s`` = 3 s.

With the 2026-12-01 calibration the liveness round over 1,250 node agents takes about 1.08 s,
over the default ``fault.silent_s`` of 1 s, so the 10,000-rank job of ``raypod bench sim`` never
trains steadily; this runs the same simulation with 3 s to show the rest of the figures.

Usage: .venv/bin/python benchmarks/sim_whatif_silent.py benchmarks/results/sim_whatif_silent3
"""

import sys

from raypod.bench import sim

_base = sim.job_config


def job_config(ranks, steps, storage, stragglers=True):  # noqa: ANN001, ANN201 - sim.job_config's own
    cfg = _base(ranks, steps, storage, stragglers)
    return cfg.model_copy(update={"fault": cfg.fault.model_copy(update={"silent_s": 3.0})})


if __name__ == "__main__":
    sim.job_config = job_config
    sim.run(out=sys.argv[1], ranks=(10_000,), calibration_dir="benchmarks/results", profile_at=None)
