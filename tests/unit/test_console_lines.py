"""The driver's console: a line that arrives while the progress line is drawn clears it
first and redraws it after; Ray's noise goes to driver.log only (raypod.console)."""

from __future__ import annotations

import io
import logging
import sys

from raypod.console import Console, _ConsoleHandler, _Forward, _LogFileHandler, is_noise
from raypod.progress import ProgressPrinter

WORKER = "\x1b[36m(TrainWorker pid=4242)\x1b[0m "
OOM = ("\x1b[33m(raylet)\x1b[0m A worker died or was killed while executing a task by an unexpected "
       "system error. To troubleshoot the problem, check the logs for the dead worker.\nWorker exit "
       "type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error code 2. "
       "Some common causes include: (1) the process was killed by the OOM killer due to high memory usage")


def _console(tmp_path, live: bool) -> tuple[Console, io.StringIO, io.StringIO, _Forward]:
    out, err = io.StringIO(), io.StringIO()
    console = Console(out, err, live=live)
    console.open_log(str(tmp_path / "job"))
    return console, out, err, _Forward(console, out, err=False)


def test_a_worker_line_never_glues_onto_the_live_progress_line(tmp_path):
    console, out, _, stdout = _console(tmp_path, live=True)
    console.status("step 3/10")
    print(WORKER + "a line the recipe printed", file=stdout)  # Ray's log_to_driver: two writes
    console.status("step 4/10")
    text = out.getvalue()
    # Cleared, the line on its own, the progress line drawn again below it.
    assert text == ("\r\x1b[2Kstep 3/10" + "\r\x1b[2K" + WORKER + "a line the recipe printed\n"
                    + "step 3/10" + "\r\x1b[2Kstep 4/10")
    console.status("step 10/10", final=True)
    assert out.getvalue().endswith("\r\x1b[2Kstep 10/10\n")


def test_noise_goes_to_the_log_only_and_warnings_stay(tmp_path):
    console, out, _, stdout = _console(tmp_path, live=False)
    print(OOM, file=stdout)  # one print of a multi-line message
    print(WORKER + "2026-11-30 03:50:00,123\tWARNING progress.py:29 -- Progress bars disabled. "
          "To enable, set ...", file=stdout)
    print(WORKER + "2026-11-30 03:50:00,124 INFO raypod.worker: [rank 1] joining a group of 2", file=stdout)
    print(WORKER + "2026-11-30 03:50:00,125 WARNING raypod.data: data stream late for 3 steps", file=stdout)
    print(WORKER + "a plain print", file=stdout)
    print("(pid=gcs_server) [2026-11-30 03:43:21,522 E 527 527] (gcs_server) gcs_actor_scheduler.cc:538: "
          "Failed to kill actor da58, return status: Invalid: KillActor RPC failed for actor da58", file=stdout)
    print("(raylet) [2026-11-30 03:43:21,522 I 527 527] (raylet) node_manager.cc:1: started", file=stdout)
    shown = out.getvalue().splitlines()
    assert shown == ["(TrainWorker pid=4242) 2026-11-30 03:50:00,125 WARNING raypod.data: data stream late "
                     "for 3 steps", "(TrainWorker pid=4242) a plain print"]
    console.close_log()
    logged = (tmp_path / "job" / "driver.log").read_text()
    assert "killed by the OOM killer" in logged and "Progress bars disabled" in logged
    assert "joining a group of 2" in logged and "\x1b[" not in logged


def test_log_records(tmp_path):
    console, _, err, _ = _console(tmp_path, live=False)
    lg = logging.getLogger("test_console.records")
    lg.propagate = False
    lg.setLevel(logging.INFO)
    for h in (_ConsoleHandler(console), _LogFileHandler(console)):
        lg.addHandler(h)
    lg.info("Creating initial MLflow database tables...")
    lg.warning("Progress bars disabled. To enable, set `enable_progress_bars = True`.")
    lg.warning("checkpoint storage is %d%% full", 95)
    assert err.getvalue().splitlines()[0].endswith("WARNING test_console.records: checkpoint storage is 95% full")
    assert len(err.getvalue().splitlines()) == 1
    console.close_log()
    logged = (tmp_path / "job" / "driver.log").read_text()
    assert "Creating initial MLflow database tables" in logged and "Progress bars disabled" in logged
    assert is_noise(OOM) and not is_noise("rank 1 at step 6: the worker process died")


def test_progress_printer_uses_the_console(tmp_path, monkeypatch):
    console, out, _, stdout = _console(tmp_path, live=True)
    monkeypatch.setattr("raypod.console._console", console)
    printer = ProgressPrinter()
    assert printer.console is console
    printer.max_steps = 2
    printer._emit("step      1/2", transient=True)
    print(WORKER + "hello", file=stdout)
    printer._emit("raypod |    1.00s | FAILURE kill on rank 1 at step 2: ...")
    assert out.getvalue().endswith("step      1/2\r\x1b[2K" + WORKER + "hello\nstep      1/2\r\x1b[2K"
                                   "raypod |    1.00s | FAILURE kill on rank 1 at step 2: ...\nstep      1/2")


def test_main_gives_the_process_back(capsys):
    """In a process that goes on (a test), ``raypod`` leaves streams and loggers as they were."""
    from raypod.cli import main

    root = logging.getLogger()
    before = (sys.stdout, sys.stderr, list(root.handlers), root.level)
    from support import TINY as tiny
    assert main(["check", str(tiny)]) == 0
    assert "name: tiny-gpt" in capsys.readouterr().out
    assert (sys.stdout, sys.stderr, list(root.handlers), root.level) == before
