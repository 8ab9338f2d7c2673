"""A 20-step tiny job run in-process on a running local Ray, as the integration tests run
jobs: seconds to the first step and to the job's end, without and with a warm spare,
alternating, ``ROUNDS`` times (BENCHMARKS.md "Startup", 2026-12-01).

    .venv/bin/python benchmarks/job_start_probe.py 3

To compare a commit, check it out in a worktree and put it first on the path:
``PYTHONPATH=/tmp/wt .venv/bin/python benchmarks/job_start_probe.py 3``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import ray  # noqa: E402
from support import tiny_job  # noqa: E402

from raypod.api import run  # noqa: E402


def main(rounds: int) -> dict[int, list[tuple[float, float]]]:
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    out: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
    try:
        for _ in range(rounds):
            for spares in (0, 1):
                cfg = tiny_job(tempfile.mkdtemp(prefix="job-start-"), f"scaling.spares={spares}")
                t0 = time.time()
                summary = run(cfg, callbacks=[])
                out[spares].append((round(summary["first_step_s"], 2), round(time.time() - t0, 2)))
                print(f"spares={spares}: first step {out[spares][-1][0]} s, job {out[spares][-1][1]} s", flush=True)
    finally:
        ray.shutdown()
    print({f"spares={k}": v for k, v in out.items()})
    return out


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
