"""The live status line: step/max, loss, throughput, ETA, world size, failures.

On a terminal it is one line redrawn in place (rich); in ``ray job logs`` or a pipe
it is a plain line every ``train.log_every_s`` seconds, plus one per state change and
failure, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from raypod.callbacks import Callback, FailureEvent, JobInfo, StepReport
from raypod.redact import redact_uri


def _fmt_s(s: float) -> str:
    s = int(max(0, s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def _fmt_rate(x: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


class ProgressPrinter(Callback):
    """Prints the job's progress.

    Args:
        stream: where to print (stdout by default).
        live: redraw one line in place; default: when ``stream`` is a terminal.
    """

    def __init__(self, stream: TextIO | None = None, live: bool | None = None) -> None:
        from raypod import console

        # The ``raypod`` command's console, unless told where: it keeps other lines off the
        # progress line (raypod.console).
        self.console = console.get() if stream is None and live is None else None
        self.stream = stream or sys.stdout
        if self.console is not None:
            self.live = self.console.live
        else:
            self.live = self.stream.isatty() if live is None else live
        self.max_steps = 0
        self.every_s = 5.0
        self.last_print = 0.0
        self.failures = 0
        self.tokens = False
        self._rate: float | None = None
        self._eval: float | None = None
        """The latest ``eval_loss``, shown on every line once there is one."""
        self._line_open = False
        self._logged = 0.0  # when a live progress line last went to driver.log

    def _emit(self, line: str, transient: bool = False) -> None:
        if self.console is not None:
            if transient:
                self.console.status(line)
            else:
                self.console.say(line)
            return
        if self.live and transient:
            self.stream.write("\r\x1b[2K" + line)
            self._line_open = True
        else:
            if self._line_open:
                self.stream.write("\n")
                self._line_open = False
            self.stream.write(line + "\n")
        self.stream.flush()

    def before_job(self, job: JobInfo) -> None:
        cfg = job.config
        self.max_steps = cfg.train.max_steps
        self.every_s = cfg.train.log_every_s
        self.start_step = job.start_step
        where = f"resuming after step {job.start_step}" if job.start_step else "from scratch"
        self._emit(f"raypod | job {cfg.name} | {cfg.scaling.min_workers}-{cfg.scaling.max_workers} "
                   f"workers | {cfg.parallel.strategy} | {where} | storage {redact_uri(job.job_dir)}")

    def after_state_change(self, previous: str, new: str, time_s: float) -> None:
        if new in ("recovering", "errored", "finished"):
            self._emit(f"raypod | {time_s:7.2f}s | state {previous} -> {new}")

    def after_step(self, report: StepReport) -> None:
        m = report.metrics
        rate_key = "tokens_per_s" if m.get("tokens_per_s", 0) > m.get("samples_per_s", 0) else "samples_per_s"
        rate = m[rate_key]
        self._rate = rate if self._rate is None else 0.9 * self._rate + 0.1 * rate
        now = time.monotonic()
        last = report.step == self.max_steps
        evaluated = "eval_loss" in m
        if evaluated:
            self._eval = m["eval_loss"]
        if not (self.live or last or evaluated or now - self.last_print >= self.every_s or report.step == 1):
            return
        self.last_print = now
        steps_left = self.max_steps - report.step
        eta = steps_left * m["step_time_s"] if steps_left else 0.0
        unit = "tok/s" if rate_key == "tokens_per_s" else "samples/s"
        pct = 100.0 * report.step / max(1, self.max_steps)
        line = (f"step {report.step:>6}/{self.max_steps} {pct:5.1f}% | loss {m['loss']:.4f} | "
                f"{_fmt_rate(self._rate)} {unit} | {m['step_time_s'] * 1000:6.0f} ms/step | "
                f"eta {_fmt_s(eta)} | world {int(m['world_size'])} | failures {self.failures}"
                + (f" | eval_loss {self._eval:.4f}" if self._eval is not None else "")
                + (" | replay" if report.replayed else ""))
        if self.console is not None:
            if last:
                self.console.status(line, final=True)
                return
            if self.live and (report.step == 1 or evaluated or now - self._logged >= self.every_s):
                self._logged = now  # driver.log gets the progress a pipe would show
                self.console.to_log(line)
        self._emit(line, transient=not last)

    def after_failure(self, event: FailureEvent) -> None:
        self.failures += 1
        who = f"rank {event.rank}" if event.rank is not None else "the group"
        what = event.message.removeprefix(f"{who} at step {event.step}: ")  # said already
        self._emit(f"raypod | {event.detected_s:7.2f}s | FAILURE {event.kind} on {who} at step "
                   f"{event.step}: {what}")

    def after_resize(self, resize: dict[str, Any]) -> None:
        self._emit(f"raypod | {resize['at_s']:7.2f}s | {resize['kind']} from {resize['from']} to "
                   f"{resize['to']} ranks after step {resize['step']} ({resize['took_s']:.2f} s, state "
                   "resharded in memory)")

    def after_recovery(self, event: FailureEvent) -> None:
        self._emit(f"raypod | {event.resumed_s:7.2f}s | recovered from {event.kind}: training "
                   f"again {event.resumed_s - event.detected_s:.2f} s after detection, "
                   f"{event.lost_steps} steps redone, world size {event.world_size_after}, "
                   f"restored from {event.restored_from}")

    def after_checkpoint(self, step: int, path: str) -> None:
        if not self.live:
            self._emit(f"raypod | checkpoint step {step} committed")
