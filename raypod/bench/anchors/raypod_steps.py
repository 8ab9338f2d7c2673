"""raypod under the step-time suites: ``raypod run`` plus a callback that records step completions.

    python raypod/bench/anchors/raypod_steps.py jobs/configs/mlp.yaml --log FILE \
        [--set key.path=value ...]

Runs the job exactly as ``raypod run CONFIG --quiet --set ...`` does (a private local
Ray, the driver in this process), with MLflow off, and one extra driver callback
that records ``time.time()`` when the driver holds every rank's result of a step
(``after_step``). At the end it writes ``step,unix_time`` lines to ``--log`` (first
completions only; a replayed step is not a new line) and copies the job's
``summary.json`` path to ``--log`` + ``.summary``.

For the goodput suite, ``--live-log FILE`` appends ``step,unix_time,attempt`` for
*every* step completion as it happens (replays too; ``attempt`` = failures seen so
far), the anchors' step-log format, and ``--deadline UNIX_TIME`` stops the driver at
the first step completed at or after that time, the way Ctrl-C does (its summary
says "interrupted"); the exit code is then 0.
"""

from __future__ import annotations

import argparse
import sys
import time

from raypod.callbacks import Callback, FailureEvent, StepReport


class DeadlineReached(KeyboardInterrupt):
    """Raised from a callback to stop the driver as Ctrl-C would (a plain exception
    in a callback is only logged)."""


class StepTimes(Callback):
    """``step -> time.time()`` of the first completion of each step, on the driver."""

    def __init__(self) -> None:
        self.times: dict[int, float] = {}

    def after_step(self, report: StepReport) -> None:
        self.times.setdefault(report.step, time.time())


class LiveStepLog(Callback):
    """Appends ``step,unix_time,attempt`` for every completion; stops the job at ``deadline``."""

    def __init__(self, path: str | None, deadline: float | None) -> None:
        self.file = open(path, "a", buffering=1) if path else None  # noqa: SIM115 - open for the run
        self.deadline = deadline
        self.attempt = 0
        self.stopped = False

    def after_failure(self, event: FailureEvent) -> None:
        self.attempt += 1

    def after_step(self, report: StepReport) -> None:
        t = time.time()
        if self.file is not None:
            self.file.write(f"{report.step},{t:.6f},{self.attempt}\n")
        if self.deadline is not None and t >= self.deadline:
            self.stopped = True
            raise DeadlineReached(f"deadline {self.deadline:.0f} reached at step {report.step}")


def main() -> int:
    from raypod.api import JobFailed, JobStopped, run
    from raypod.config import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--log", required=True)
    p.add_argument("--live-log", default=None, help="append every completion as it happens")
    p.add_argument("--deadline", type=float, default=None, help="stop at this unix time")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    cfg = load_config(args.config, [*args.overrides, "mlflow.enabled=false"])
    rec = StepTimes()
    live = LiveStepLog(args.live_log, args.deadline)
    rc = 0
    try:
        run(cfg, callbacks=[rec, live], progress=False)
    except (JobFailed, JobStopped) as e:  # the deadline stops the job as Ctrl-C would: JobStopped
        if not live.stopped:
            print(f"raypod_steps.py: {e}", file=sys.stderr)
            rc = 1
    with open(args.log, "w") as f:
        f.writelines(f"{s},{t:.6f}\n" for s, t in sorted(rec.times.items()))
    with open(args.log + ".summary", "w") as f:
        f.write(f"{cfg.job_dir}/summary.json\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
