"""The driver's console: raypod's lines and the progress line; Ray's and MLflow's detail in
``<job_dir>/driver.log``.

The ``raypod`` command installs one :class:`Console` (:func:`install`) before anything
else runs. From then on:

* every log record at INFO and above, from every logger of the driver process (raypod's,
  Ray's, Ray Data's, MLflow's, alembic's), and every line the process prints or that Ray
  forwards from the workers (``log_to_driver``: ``(TrainWorker pid=...) ...``) or the
  raylets is written in full to ``driver.log`` in the job's folder, once the job owns its
  folder (:meth:`Console.open_log`; the lines before are kept until then). Records are
  redacted where they are made (:func:`raypod.redact.install_log_redaction`), forwarded
  lines here, so no secret reaches the file either.
* the console gets raypod's own lines (the progress line, failures, recoveries, the
  summary; raypod's log records at WARNING, and at INFO with ``-v``, the ranks' too), and
  warnings, errors and plain prints of everything else, except what a user cannot act on
  (:data:`NOISE`, log records below WARNING): Ray Data's progress-bar notices and execution
  plans, MLflow's database set-up, and Ray's guess at why a worker died ("killed by the OOM
  killer"): raypod names every lost rank and its node itself, and knows which deaths it
  caused (``fault.inject``).

On a terminal the progress line is redrawn in place and any other line clears it first
and redraws it after, so nothing is glued to it; without one (``ray job submit``, a pipe)
every line is a plain line.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import tempfile
import threading
import time
from typing import Any, TextIO

from raypod.redact import redact_text

log = logging.getLogger("raypod.console")

LOG_NAME = "driver.log"
"""The file in the job's folder that holds everything the driver logged and forwarded."""

NOISE = tuple(re.compile(p) for p in (
    r"Progress bars (for operators )?disabled",  # Ray Data: raypod turns them off on purpose
    r"(Starting execution|Execution plan) of Dataset",  # Ray Data's plan of raypod's own pipeline
    r"Progress will be logged because stdout",
    r"A worker died or was killed while executing",  # Ray's guess (OOM, ray stop, SIGSEGV): raypod
    r"killed by the OOM killer",  # reports each lost rank itself, with its node and the cause it knows
    r"Tip: use `ray status`",
    r"Failed to kill actor .* KillActor RPC failed",  # raypod ended an actor that was gone already
    # MLflow on the model raypod logs for the user: how it pins torch, that pickles run code
    r"contains a local version label",
    r"Saving pytorch model by Pickle or CloudPickle",
    # MLflow's registry news for mlflow.registered_model (the run's page shows the version)
    r"Successfully registered model '",
    r"Created version '\d+' of model '",
))
"""Messages no user acts on: they go to ``driver.log`` only."""

_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_PREFIX_RE = re.compile(r"^\((?P<who>[^\n]*?pid=\w+[^)\n]*|raylet[^)\n]*|autoscaler[^)\n]*)\) ?(?P<msg>.*)$", re.S)
# A log record as the common formats print it: a time, then (after at most two words) its level.
_LEVEL_RE = re.compile(r"^\[?\d[\d:,./\-T ]*\d\]?\s+(?:\S+\s+){0,2}?\[?(?P<level>DEBUG|INFO|WARNING|WARN|ERROR|"
                       r"CRITICAL|FATAL)\b")
# Ray's C++ components: "[2026-11-30 03:43:21,522 E 527 527] (gcs_server) file.cc:538: ..."
_GLOG_RE = re.compile(r"^\[\d[\d:,.\- ]*\d (?P<level>[DIWEF]) \d+ \d+\]")
_GLOG_LEVELS = {"D": "DEBUG", "I": "INFO", "W": "WARNING", "E": "ERROR", "F": "FATAL"}
_CONTINUATION_RE = re.compile(r"^(\s|Traceback \(most recent call last\)|[\w.]+(Error|Exception|Interrupt|Exit)\b)")
_CONTINUATION_S = 1.0
"""A forwarded traceback or indented line within this long after a record of the same process
belongs to that record."""


def is_noise(text: str) -> bool:
    """Whether ``text`` is a message no user acts on (:data:`NOISE`)."""
    return any(p.search(text) for p in NOISE)


class Console:
    """The driver's console and its ``driver.log``.

    Args:
        out: the terminal or pipe for standard output (the real ``sys.stdout``).
        err: the same for standard error.
        verbose: show raypod's INFO records too (``raypod -v``).
        live: redraw the progress line in place; default: when ``out`` is a terminal.
    """

    def __init__(self, out: TextIO, err: TextIO, verbose: bool = False, live: bool | None = None) -> None:
        self.out, self.err = out, err
        self.verbose = verbose
        self.live = _isatty(out) if live is None else live
        self._lock = threading.RLock()
        self._status = ""  # the progress line drawn in place now, on a terminal
        self._pending: list[str] = []  # driver.log lines from before the job owned its folder
        self._file: TextIO | None = None
        self._uri: str | None = None  # where driver.log goes when the job's folder is not local
        self._log_uri: str | None = None  # the driver.log open now
        self._atexit = False
        self._last: dict[str, tuple[bool, float]] = {}  # forwarded source -> (shown, when)

    # ---- the console ---------------------------------------------------------
    def line(self, text: str, err: bool = False) -> None:
        """Print ``text`` as a line of its own; a progress line drawn in place is cleared
        first and drawn again after."""
        with self._lock:
            stream = self.err if err else self.out
            if self._status:
                self._write(self.out, "\r\x1b[2K")
                if stream is not self.out:
                    self._flush(self.out)
            self._write(stream, text if text.endswith("\n") else text + "\n")
            self._flush(stream)
            if self._status:
                self._write(self.out, self._status)
                self._flush(self.out)

    def status(self, text: str, final: bool = False) -> None:
        """Draw ``text`` as the progress line: in place on a terminal, else as a plain line.
        A ``final`` one stays where it is, as a line of its own."""
        with self._lock:
            if self.live and not final:
                self._status = text
                self._write(self.out, "\r\x1b[2K" + text)
                self._flush(self.out)
                return
            if self._status:  # a final line replaces the one drawn in place
                self._write(self.out, "\r\x1b[2K")
                self._status = ""
            self.say(text)

    def say(self, text: str) -> None:
        """One of raypod's own lines: on the console and in ``driver.log``."""
        with self._lock:
            self.to_log(text)
            self.line(text)

    def end_status(self) -> None:
        """Leave the progress line drawn in place as it is and go on below it."""
        with self._lock:
            if self._status:
                self._status = ""
                self._write(self.out, "\n")
                self._flush(self.out)

    @staticmethod
    def _write(stream: TextIO, text: str) -> None:
        try:
            stream.write(text)
        except (OSError, ValueError):  # a closed pipe: nothing more to show
            pass

    @staticmethod
    def _flush(stream: TextIO) -> None:
        try:
            stream.flush()
        except (OSError, ValueError):
            pass

    # ---- driver.log ----------------------------------------------------------
    def to_log(self, text: str) -> None:
        """Append ``text`` (one or more lines) to ``driver.log``, or keep it until it is open."""
        text = text if text.endswith("\n") else text + "\n"
        with self._lock:
            if self._file is None:
                self._pending.append(text)
                del self._pending[:-10000]  # a job that never starts keeps no unbounded backlog
                return
            try:
                self._file.write(text)
                self._file.flush()
            except (OSError, ValueError):  # full storage: the job reports that itself; stop logging
                self._file = None
                self._pending = []

    def open_log(self, job_dir: str) -> str:
        """Write ``driver.log`` in ``job_dir`` from now on (appending: a resumed job continues
        it), starting with what was logged before; the log of another job before it (``raypod
        chaos`` runs two) is closed. A folder that is not local (``s3://`` ...) gets the file
        when it is closed (:meth:`close_log`, at exit at the latest). Returns the file's URI."""
        from fsspec.implementations.local import LocalFileSystem

        from raypod.storage import get_fs, join_uri

        uri = join_uri(job_dir, LOG_NAME)
        fs, path = get_fs(uri)
        if self._log_uri not in (None, uri):
            self.close_log()
        with self._lock:
            if self._file is not None:
                return uri
            self._log_uri = uri
            try:
                if isinstance(fs, LocalFileSystem):
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open until close_log
                else:
                    self._file = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115
                    self._uri = uri
                self._file.write(f"---- raypod driver, pid {os.getpid()}, "
                                 f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}\n")
                self._file.writelines(self._pending)
                self._file.flush()
            except OSError as e:
                self._file = None
                log.warning("cannot write %s: %s", uri, e)
            self._pending = []
        if not self._atexit:
            import atexit

            atexit.register(self.close_log)  # after Ray's own exit handler: its last lines too
            self._atexit = True
        return uri

    def close_log(self) -> None:
        """Finish ``driver.log`` (a remote job folder gets it now)."""
        with self._lock:
            f, uri, self._file, self._uri, self._log_uri = self._file, self._uri, None, None, None
        if f is None:
            return
        try:
            if uri is not None:
                from raypod.storage import get_fs

                f.seek(0)
                fs, path = get_fs(uri)
                old = fs.cat_file(path).decode() if fs.exists(path) else ""
                fs.pipe_file(path, (old + f.read()).encode())
            f.close()
        except OSError as e:
            log.warning("cannot write %s: %s", uri, e)

    # ---- what other code prints ------------------------------------------------
    def forward(self, text: str, err: bool) -> None:
        """A block of lines written to ``sys.stdout``/``sys.stderr`` by anyone but raypod's
        console (Ray's forwarded worker and raylet lines, prints, foreign log handlers):
        all of it to ``driver.log``, to the console what a user can act on."""
        adopted = adopt_loggers()
        text = redact_text(text)
        plain = _ANSI_RE.sub("", text)
        m = _PREFIX_RE.match(plain)
        source = m.group("who").split(",")[0] if m else ""
        body = m.group("msg") if m else plain
        now = time.monotonic()
        header = _LEVEL_RE.match(body)
        if adopted and header is not None and m is None:
            return  # a record of a logger just adopted: it reaches raypod's handlers next
        self.to_log(plain)
        glog = _GLOG_RE.match(body) if header is None else None
        if (header is None and glog is None and _CONTINUATION_RE.match(body) and source in self._last
                and now - self._last[source][1] < _CONTINUATION_S):
            show = self._last[source][0]  # the rest of a record: as its start
        else:
            level = header.group("level") if header else _GLOG_LEVELS[glog.group("level")] if glog else None
            ours = level == "INFO" and self.verbose and " raypod." in body  # -v: the ranks' INFO too
            show = (level not in ("DEBUG", "INFO") or ours) and not is_noise(plain)
        self._last[source] = (show, now)
        if show:
            self.line(text if self.live else plain, err=err)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Forward(io.TextIOBase):
    """Stands in for ``sys.stdout``/``sys.stderr``: whole lines (each thread's own) go to
    :meth:`Console.forward`."""

    def __init__(self, console: Console, real: TextIO, err: bool) -> None:
        super().__init__()
        self.console, self.real, self.is_err = console, real, err
        self._buf = threading.local()

    def write(self, s: str) -> int:
        buf = getattr(self._buf, "text", "") + s
        if buf.endswith("\n"):  # a print()'s text and its newline are two writes: one block
            self._buf.text = ""
            self.console.forward(buf, self.is_err)
        else:
            self._buf.text = buf
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return _isatty(self.real)

    def fileno(self) -> int:
        return self.real.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.real, "encoding", "utf-8")

    def writable(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:  # buffer, errors, ...: the real stream's
        return getattr(self.real, name)


class _ConsoleHandler(logging.Handler):
    """Log records on the console: raypod's at WARNING (INFO with ``-v``), others' at WARNING
    unless they are :data:`NOISE`; Ray Data's hidden records never."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.INFO)
        self.console = console
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                            datefmt="%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        ours = record.name == "raypod" or record.name.startswith("raypod.")
        floor = logging.INFO if ours and self.console.verbose else logging.WARNING
        if record.levelno < floor or getattr(record, "hide", False):
            return
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a malformed record is logging's problem, not the job's
            self.handleError(record)
            return
        if not ours and is_noise(text):
            return
        self.console.line(text, err=True)


class _LogFileHandler(logging.Handler):
    """Every record at INFO and above, in full, to ``driver.log``."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.INFO)
        self.console = console
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.to_log(_ANSI_RE.sub("", self.format(record)))
        except Exception:  # noqa: BLE001
            self.handleError(record)


_console: Console | None = None
_saved: dict[str, Any] = {}  # what install() changed, for uninstall()
_adopted: list[tuple[logging.Logger, list[logging.Handler], bool, int]] = []
_LEVELS = {"ray": logging.INFO, "alembic": logging.INFO, "mlflow": logging.INFO}
"""Loggers whose INFO records belong in ``driver.log`` though their library logs only warnings."""


def adopt_loggers() -> bool:
    """Make every logger with console handlers of its own (Ray's, Ray Data's, MLflow's,
    alembic's) hand its records to raypod's instead: its handlers that print are removed and
    it propagates to the root. Files it writes are kept. Cheap; safe to call often (a
    library imported later configures its loggers then). Returns whether one was adopted."""
    if _console is None:
        return False
    adopted = False
    for name, lg in list(logging.root.manager.loggerDict.items()):
        if not isinstance(lg, logging.Logger) or (lg.propagate and not lg.handlers):
            continue
        printing = [h for h in lg.handlers if isinstance(h, logging.StreamHandler)
                    and not isinstance(h, logging.FileHandler) and type(h).__name__ != "SessionFileHandler"]
        if not printing and lg.propagate:
            continue
        _adopted.append((lg, printing, lg.propagate, lg.level))
        for h in printing:
            lg.removeHandler(h)
        lg.propagate = adopted = True
        if name in _LEVELS and (lg.level == logging.NOTSET or lg.level > _LEVELS[name]):
            lg.setLevel(_LEVELS[name])
    return adopted


def install(verbose: bool = False) -> Console:
    """Set up the driver's console (idempotent): log records and everything printed go
    through one :class:`Console`; returns it."""
    global _console
    if _console is not None:
        _console.verbose = verbose
        return _console
    real_out, real_err = sys.stdout, sys.stderr
    console = Console(real_out, real_err, verbose=verbose)
    root = logging.getLogger()
    _saved.update(handlers=list(root.handlers), level=root.level,
                  raypod_level=logging.getLogger("raypod").level)
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(_LogFileHandler(console))
    root.addHandler(_ConsoleHandler(console))
    root.setLevel(logging.INFO)
    logging.getLogger("raypod").setLevel(logging.INFO)
    _console = console
    sys.stdout = _Forward(console, real_out, err=False)
    sys.stderr = _Forward(console, real_err, err=True)
    adopt_loggers()
    import atexit

    atexit.register(console.end_status)
    return console


def uninstall() -> None:
    """Undo :func:`install`: the streams, the root logger and the adopted loggers as they were
    (for callers of ``raypod.cli.main`` in a process that goes on, such as tests). Not while
    Ray is connected: it may still forward worker lines, which the console keeps filtering
    until the process ends."""
    global _console
    if _console is None:
        return
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return
    console, _console = _console, None
    console.end_status()
    console.close_log()
    if isinstance(sys.stdout, _Forward) and sys.stdout.console is console:
        sys.stdout = console.out
    if isinstance(sys.stderr, _Forward) and sys.stderr.console is console:
        sys.stderr = console.err
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _LogFileHandler | _ConsoleHandler)]:
        root.removeHandler(h)
    for h in _saved.get("handlers", []):
        root.addHandler(h)
    root.setLevel(_saved.get("level", logging.WARNING))
    logging.getLogger("raypod").setLevel(_saved.get("raypod_level", logging.NOTSET))
    for lg, handlers, propagate, level in reversed(_adopted):
        for h in handlers:
            lg.addHandler(h)
        lg.propagate = propagate
        lg.setLevel(level)
    _adopted.clear()
    _saved.clear()


def get() -> Console | None:
    """The installed console, or None (raypod used as a library)."""
    return _console
