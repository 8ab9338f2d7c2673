"""Configured faults (``fault.inject``) firing on a rank: kept out of the training step.

The trainer asks its :class:`FaultInjector` at three points of a step: :meth:`~FaultInjector.fire`
before it, or where ``FaultInjection.at`` says (mid-forward or mid-backward through
:meth:`~FaultInjector.hook`, before the optimizer update, in the replica round) (a ``kill`` ends the process, a ``hang`` never returns, a ``preempt`` sends the
process a SIGTERM, an ``exception`` raises :class:`InjectedFault`, a ``freeze`` stops the
process with SIGSTOP, a ``freeze_node`` stops every rank process of the job on its node;
``slow`` and ``nan`` arm the two effects below), :meth:`~FaultInjector.delay` before the
step's sync (``slow``) and :meth:`~FaultInjector.poison_step` before the optimizer update
(``nan``). Every fault first writes its marker (:func:`raypod.faults.record_fired`), so the
driver knows it fired.

A ``freeze_node`` must find its siblings' processes: every rank notes its pid in a folder
of its node's own (:func:`register_pid`, on joining a group, with the attempt), which the
firing rank reads (:func:`node_pids`); only ranks of the current attempt are stopped, so
neither a spare nor a process of an earlier attempt (or of another job) is ever touched.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterable

import torch

from raypod import faults
from raypod.config import FaultInjection
from raypod.storage import read_json, write_json_atomic
from raypod.worker.parallel import on_block

log = logging.getLogger("raypod.worker")


def pid_dir(job_dir: str, node_id: str) -> str:
    """``<tmp>/raypod-pids/<job key>/<node id>``: where the job's ranks on this node note
    their pids (local to the node, whatever ``checkpoint.storage`` is)."""
    key = hashlib.sha256(job_dir.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "raypod-pids", key, node_id)


def register_pid(job_dir: str, node_id: str, rank: int, attempt: int) -> None:
    """Note that this process is ``rank`` of ``attempt`` on ``node_id`` (overwrites the rank's
    earlier entry)."""
    write_json_atomic(os.path.join(pid_dir(job_dir, node_id), f"{rank}.json"),
                      {"rank": rank, "pid": os.getpid(), "attempt": attempt, "started": _started(os.getpid())})


def node_pids(job_dir: str, node_id: str) -> dict[int, dict[str, int]]:
    """``rank -> {"rank", "pid", "attempt"}`` of the job's ranks noted on ``node_id``."""
    folder = pid_dir(job_dir, node_id)
    out: dict[int, dict[str, int]] = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        entry = read_json(os.path.join(folder, name)) if name.endswith(".json") else None
        if entry is not None:
            out[int(entry["rank"])] = entry
    return out


def _started(pid: int) -> str | None:
    """When process ``pid`` started (Linux: ``/proc/<pid>/stat``): a pid taken over by another
    process since it was noted does not match."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


class InjectedFault(RuntimeError):
    """Raised by an injected ``exception`` fault."""


class FaultInjector:
    """The faults planned for this rank, and the effects of those that fired.

    Args:
        job_dir: where the fired markers go (``<job_dir>/faults``).
    """

    slow_s: float = 0.0
    """Injected ``slow`` fault: seconds added to every step (stays with the process)."""
    poison: bool = False
    """Injected ``nan`` fault: this step's loss and gradients become NaN."""

    def __init__(self, job_dir: str, planned: Iterable[FaultInjection] = ()) -> None:
        self.job_dir = job_dir
        self.note_pids = any(True for _ in planned)
        """The job plans faults (``fault.inject``): ranks note their pids (:func:`register_pid`), for
        a ``freeze_node`` to find its siblings and for a test to see which processes survived."""
        self.injections: list[tuple[int, FaultInjection]] = []
        self.rank, self.attempt = -1, 0

    def arm(self, injections: list[tuple[int, FaultInjection]], rank: int, attempt: int) -> None:
        """Keep the pending faults meant for ``rank`` (on joining a group)."""
        self.rank, self.attempt = rank, attempt
        self.injections = [(i, f) for i, f in injections if f.rank == rank]
        if not self.note_pids:
            return
        try:  # for a freeze_node fired by a sibling on this node (and tests that follow pids)
            register_pid(self.job_dir, _node_id(), rank, attempt)
        except OSError as e:
            log.warning("[rank %d] could not note its pid for freeze_node faults: %s", rank, e)

    def planned_at(self, at: str) -> bool:
        """A pending fault fires at ``at`` (``forward``, ``backward``, ...) of some step."""
        return any(f.at == at for _, f in self.injections)

    def fire(self, step: int, at: str = "step") -> None:
        """Fire the faults planned for ``step`` at ``at`` (see ``FaultInjection.at``), each
        once, after writing its marker."""
        due = [(i, f) for i, f in self.injections if f.step == step and f.at == at]
        self.injections = [(i, f) for i, f in self.injections if (i, f) not in due]
        for i, f in due:
            faults.record_fired(self.job_dir, i, f, self.attempt)
            log.info("[rank %d attempt %d] injecting %s at step %d (%s)", self.rank,  # the driver reports it
                     self.attempt, f.kind, step, f.at)
            if f.kind == "kill":
                os._exit(137)
            if f.kind == "hang":
                while True:  # no progress, as a rank stuck in a kernel or a deadlock
                    time.sleep(1.0)
            if f.kind == "slow":
                self.slow_s = f.delay_s
            elif f.kind == "nan":
                self.poison = True
            elif f.kind == "preempt":
                os.kill(os.getpid(), signal.SIGTERM)  # what the node's shutdown sends
            elif f.kind in ("freeze", "freeze_node"):
                self._freeze(node=f.kind == "freeze_node")
            else:
                raise InjectedFault(f"injected exception at step {step} on rank {self.rank}")

    def _freeze(self, node: bool) -> None:
        """SIGSTOP this process (``node``: first every other rank process of this attempt on
        this node, as they noted themselves): open sockets, no answer from any thread, until
        someone kills it."""
        if node:
            for entry in node_pids(self.job_dir, _node_id()).values():
                pid = entry["pid"]
                if (entry["attempt"] == self.attempt and pid != os.getpid()
                        and entry.get("started") == _started(pid)):  # the same process still
                    try:
                        os.kill(pid, signal.SIGSTOP)
                    except OSError as e:  # gone already
                        log.info("[rank %d] freeze_node: rank %d (pid %d): %s", self.rank, entry["rank"], pid, e)
        for h in logging.getLogger().handlers:  # the injection line reaches the log first
            h.flush()
        os.kill(os.getpid(), signal.SIGSTOP)

    def hook(self, units: list[torch.nn.Module], step: Callable[[], int]) -> None:
        """Fire ``forward`` and ``backward`` faults in the middle of the pass: before the middle
        sharded block's forward, and when the gradient reaches that block's output (the
        blocks after it are done); ``step()`` is the step running. Nothing is hooked when no
        such fault is planned."""
        if not units or not (self.planned_at("forward") or self.planned_at("backward")):
            return
        on_block(units[len(units) // 2], lambda: self.fire(step(), "forward"),
                 lambda: self.fire(step(), "backward"))

    def delay(self) -> None:
        """A ``slow`` rank: every step takes ``slow_s`` longer."""
        if self.slow_s:
            time.sleep(self.slow_s)

    def poison_step(self, loss_sum: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
        """A ``nan`` fault armed: this step's loss and gradients become NaN (once)."""
        if not self.poison:
            return loss_sum
        self.poison = False
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(float("nan"))
        return loss_sum * float("nan")
