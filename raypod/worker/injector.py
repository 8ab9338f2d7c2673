"""Configured faults (``fault.inject``) firing on a rank: kept out of the training step.

The trainer asks its :class:`FaultInjector` at three points of a step: :meth:`~FaultInjector.fire`
before it (a ``kill`` ends the process, a ``hang`` never returns, a ``preempt`` sends the
process a SIGTERM, an ``exception`` raises :class:`InjectedFault`; ``slow`` and ``nan`` arm
the two effects below), :meth:`~FaultInjector.delay` before the step's sync (``slow``) and
:meth:`~FaultInjector.poison_step` before the optimizer update (``nan``). Every fault first
writes its marker (:func:`raypod.faults.record_fired`), so the driver knows it fired.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import torch

from raypod import faults
from raypod.config import FaultInjection

log = logging.getLogger("raypod.worker")


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

    def __init__(self, job_dir: str) -> None:
        self.job_dir = job_dir
        self.injections: list[tuple[int, FaultInjection]] = []
        self.rank, self.attempt = -1, 0

    def arm(self, injections: list[tuple[int, FaultInjection]], rank: int, attempt: int) -> None:
        """Keep the pending faults meant for ``rank`` (on joining a group)."""
        self.rank, self.attempt = rank, attempt
        self.injections = [(i, f) for i, f in injections if f.rank == rank]

    def fire(self, step: int) -> None:
        """Fire the faults planned for ``step``, each after writing its marker."""
        for i, f in self.injections:
            if f.step == step:
                faults.record_fired(self.job_dir, i, f, self.attempt)
                log.info("[rank %d attempt %d] injecting %s at step %d", self.rank,  # the driver reports it
                         self.attempt, f.kind, step)
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
                else:
                    raise InjectedFault(f"injected exception at step {step} on rank {self.rank}")

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
