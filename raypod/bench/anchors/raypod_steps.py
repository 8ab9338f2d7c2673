"""raypod under the step-time suites: ``raypod run`` plus a callback that records step completions.

    python raypod/bench/anchors/raypod_steps.py jobs/configs/mlp.yaml --log FILE \
        [--set key.path=value ...]

Runs the job exactly as ``raypod run CONFIG --quiet --set ...`` does (a private local
Ray, the driver in this process), with MLflow off, and one extra driver callback
that records ``time.time()`` when the driver holds every rank's result of a step
(``after_step``). At the end it writes ``step,unix_time`` lines to ``--log`` (first
completions only; a replayed step is not a new line) and copies the job's
``summary.json`` path to ``--log`` + ``.summary``.
"""

from __future__ import annotations

import argparse
import sys
import time

from raypod.callbacks import Callback, StepReport


class StepTimes(Callback):
    """``step -> time.time()`` of the first completion of each step, on the driver."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}

    def after_step(self, report: StepReport) -> None:
        self.times.setdefault(report.step, time.time())


def main() -> int:
    from raypod.api import JobFailed, run
    from raypod.config import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--log", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    cfg = load_config(args.config, [*args.overrides, "mlflow.enabled=false"])
    rec = StepTimes()
    rc = 0
    try:
        run(cfg, callbacks=[rec], progress=False)
    except JobFailed as e:
        print(f"raypod_steps.py: {e}", file=sys.stderr)
        rc = 1
    with open(args.log, "w") as f:
        f.writelines(f"{s},{t:.6f}\n" for s, t in sorted(rec.times.items()))
    with open(args.log + ".summary", "w") as f:
        f.write(f"{cfg.job_dir}/summary.json\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
