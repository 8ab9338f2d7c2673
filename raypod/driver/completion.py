"""Steps that count: the ranks' results become a step's figures, its health checks and
checkpoint commits.

:meth:`StepCompletion.absorb` takes what a poll brought (results, finished saves, replica
acknowledgements, which ride in the results) into the :class:`~raypod.driver.ledger.StepLedger`,
and completes every step that is ready, in order: a bad loss stops there and asks for a roll back
(``health_next``); otherwise the step counts, its metrics go to the ``after_step`` hook,
stragglers, throughput and preemption are checked, and a checkpoint every rank saved is
committed.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from raypod.callbacks import FailureEvent, StepReport
from raypod.checkpoint import CheckpointStore
from raypod.checkpoint.lease import JobLease
from raypod.config import JobConfig
from raypod.driver.accounting import JobAccounting
from raypod.driver.ledger import StepLedger
from raypod.driver.state import HandingOverState, RollingBackState, State
from raypod.policies import Policies
from raypod.protocol import StepResult, WorkerGroupProtocol
from raypod.recipe import Recipe
from raypod.storage import storage_error

log = logging.getLogger("raypod.driver")


def recipe_metrics(results: list[StepResult], samples: int) -> dict[str, float]:
    """The recipe's own metrics of one step, over all ranks: the extra metrics its ``loss``
    returned (means over the step's samples) and, on an eval step, ``eval_loss``, its
    other ``eval_<name>`` metrics (means over the eval samples) and ``eval_s``."""
    out: dict[str, float] = {}
    for r in results:
        for k, v in r.metrics_sum.items():
            out[k] = out.get(k, 0.0) + v
    out = {k: v / max(1, samples) for k, v in out.items()}
    evaluated = [r for r in results if r.eval_samples is not None]
    n = sum(r.eval_samples or 0 for r in evaluated)
    if n:
        sums: dict[str, float] = {}
        for r in evaluated:
            for k, v in (r.eval_sums or {}).items():
                sums[k] = sums.get(k, 0.0) + v
        out.update({f"eval_{k}": v / n for k, v in sums.items()})
        out["eval_s"] = max(r.eval_s or 0.0 for r in evaluated)
    return out


def rank_figures(results: list[StepResult], nodes: list[str]) -> dict[int, dict[str, Any]]:
    """Each rank's own compute, its waits (peers, data) and its node, for the step report."""
    out: dict[int, dict[str, Any]] = {}
    for r in results:
        out[r.rank] = {"compute_s": max(0.0, r.compute_s - r.wait_s - r.data_s), "wait_s": r.wait_s,
                       "data_s": r.data_s, "node_id": nodes[r.rank] if r.rank < len(nodes) else None}
    return out


class StepCompletion:
    """Completes the steps every rank finished, and commits the checkpoints every rank saved.

    Args:
        config: the job's config.
        ledger: the step ledger.
        acct: the job's accounting (steps, samples, events).
        policies: the job's policies (bad loss, stragglers, throughput, snapshot cadence).
        recipe: for ``tokens_per_sample``.
        store: where checkpoints are committed.
        lease: the job's owner lease (no commit once it is lost).
        fire: calls a callback hook.
        bad_steps: steps whose batch is skipped on purpose (shared with the driver).
    """

    def __init__(self, config: JobConfig, ledger: StepLedger, acct: JobAccounting, policies: Policies,
                 recipe: Recipe, store: CheckpointStore, lease: JobLease | None,
                 fire: Callable[..., None], bad_steps: set[int]) -> None:
        self.cfg, self.ledger, self.acct, self.policies = config, ledger, acct, policies
        self.recipe, self.store, self.lease, self.fire = recipe, store, lease, fire
        self.bad_steps = bad_steps
        self.health_next: State | None = None
        """A state the health checks of the last results ask for (rolling back, handing over)."""
        self.step_durs: deque[float] = deque(maxlen=50)
        """Recent step times (for ``fault.hang_factor`` and the recovery-source estimates)."""
        self.save_s: dict[int, float] = {}
        """Per rank: seconds its last persistent save took."""
        self.failures = 0
        """Failures so far (a metric of every step)."""
        self.finished_s: dict[int, float] = {}
        """Per step not counted yet: when every rank had finished it (job seconds)."""
        self.save_digests: dict[int, dict[str, dict[str, Any]]] = {}
        """Per checkpoint step not committed yet: the file digests the ranks took as they wrote
        (the manifest's; files no rank reported are hashed at commit)."""

    # ---- what a poll brought ---------------------------------------------------------
    def absorb(self, group: WorkerGroupProtocol, result: Any) -> None:
        """Take a poll's results, saves and replica acknowledgements; complete what is ready."""
        ledger = self.ledger
        for r in result.steps:
            ledger.record(r)
            for s in r.replicated:
                ledger.ack_replica(r.rank, s)
            if r.save_s is not None:
                self.save_s[r.rank] = r.save_s
            for s, files in r.save_digests.items():
                if s > ledger.committed_step:
                    self.save_digests.setdefault(s, {}).update(files)
            if len(ledger.partial[r.step]) == group.world_size:  # every rank finished it: now
                self.finished_s[r.step] = self.acct.now()
        for rank, steps in result.saved:
            ledger.ack_saves(rank, steps)
        self.commit_saved(group)
        for rank, step, _ok in result.replicated:
            ledger.ack_replica(rank, step)
        while self.health_next is None or not isinstance(self.health_next, RollingBackState):
            nxt = ledger.done_step + 1
            if nxt in self.bad_steps and nxt <= self.cfg.train.max_steps:
                ledger.done_step = nxt  # skipped on purpose
            elif ledger.ready(nxt, group.world_size, self.replicates(group, nxt)):
                self.complete(group, nxt)
            else:
                break

    def ack_saves(self, group: WorkerGroupProtocol, rank: int, steps: list[int]) -> None:
        """Note finished saves; commit a step all ranks saved, once the step itself counted."""
        self.ledger.ack_saves(rank, steps)
        self.commit_saved(group)

    def replicates(self, group: WorkerGroupProtocol, step: int) -> bool:
        """Whether step ``step``'s snapshot is replicated to peers (then the step completes
        only once every replica is in place, so losing any one rank never loses it)."""
        return self.policies.cadence.snapshots(step) and any(p is not None for p in group.peer_to)

    def replica_fallback(self, group: WorkerGroupProtocol) -> None:
        """Ask the ranks for the oldest uncounted step's replica acknowledgement when no later
        result can carry it any more.

        An acknowledgement rides in the rank's next result, so the explicit ``wait_replicated``
        call is needed only once every submitted step after it has returned: the last step, a
        step before a grow or the finish, a pipeline stalled by the in-flight limit, a round
        slower than the steps after it. At most once per step and group (``ledger.reset``).
        """
        ledger, n = self.ledger, group.world_size
        step = ledger.done_step + 1
        if (step >= ledger.next_step or step in ledger.replica_waits or not self.replicates(group, step)
                or len(ledger.partial.get(step, ())) != n or len(ledger.replica_acks.get(step, ())) == n):
            return
        if any(len(ledger.partial.get(s, ())) != n for s in range(step + 1, ledger.next_step)
               if s not in self.bad_steps):
            return  # a later result is still to come: it carries the acknowledgement
        ledger.replica_waits.add(step)
        group.submit_replica_wait(step)

    # ---- a step every rank finished -------------------------------------------------
    def complete(self, group: WorkerGroupProtocol, step: int, resolve: bool = True) -> None:
        """Count step ``step`` (or, for a bad loss, ask for a roll back instead)."""
        results = self.ledger.take(step)
        samples = sum(r.samples for r in results)
        loss = sum(r.loss_sum for r in results) / max(1, samples)
        bad = self.policies.loss.check(loss)
        if bad is not None:  # the step does not count: roll back and skip its batch
            self.health_next = RollingBackState(step=step, reason=bad, loss=loss, time_s=self.acct.now())
            return
        now = time.time()
        dur = max(1e-9, now - self.ledger.last_completion)
        self.ledger.last_completion = now
        self.step_durs.append(dur)
        self.ledger.done_step = step
        replayed, resolved = self.acct.step_done(step, dur, [(r.epoch, r.ids) for r in results],
                                                 resolve=resolve, finished_s=self.finished_s.pop(step, None))
        for s in [s for s in self.finished_s if s < step]:
            del self.finished_s[s]
        metrics = {**recipe_metrics(results, samples), **self._metrics(results, loss, dur)}
        self.policies.cadence.observe(step, results)
        self._check_health(group, step, results, metrics)
        self.commit_saved(group)  # a save of this step may have been held back until it counted
        self.fire("after_step", StepReport(step=step, metrics=metrics, time_s=self.acct.now(),
                                           replayed=replayed, ranks=rank_figures(results, group.nodes)))
        for ev in resolved:
            log.info("recovered from %s at step %d: resumed %.2f s after detection, %s lost steps",
                     ev.kind, ev.step, ev.resumed_s - ev.detected_s, ev.lost_steps)
            self.fire("after_recovery", ev)

    def _metrics(self, results: list[StepResult], loss: float, dur: float) -> dict[str, float]:
        """raypod's own figures of a step (they win a clash with the recipe's names)."""
        sps = self.cfg.train.global_batch / dur
        after_first = self.acct.now() - (self.acct.first_step_s or 0.0)
        return {
            "loss": loss,
            "lr": results[0].lr,
            "grad_norm": results[0].grad_norm,
            "step_time_s": dur,
            "compute_s": max(r.compute_s for r in results),
            "samples_per_s": sps,
            "tokens_per_s": sps * self.recipe.tokens_per_sample(),
            "world_size": float(len(results)),
            "data_wait_frac": max(r.data_s for r in results) / dur,
            "goodput": min(1.0, self.acct.productive_s() / after_first) if after_first > 0 else 1.0,
            "failures": float(self.failures),
        }

    def _check_health(self, group: WorkerGroupProtocol, step: int, results: list[StepResult],
                      metrics: dict[str, float]) -> None:
        """Straggler, throughput and preemption checks of a step every rank finished."""
        f = self.cfg.fault
        own = {r.rank: max(0.0, r.compute_s - r.wait_s) for r in results}
        worst, slow = self.policies.stragglers.update(own)
        metrics["straggler_ratio"] = worst
        metrics["wait_s"] = max(r.wait_s for r in results)
        for rank, ratio in slow:
            msg = (f"rank {rank} computes {ratio:.1f}x the other ranks' median for "
                   f"{f.straggler_steps} steps (fault.straggler_factor={f.straggler_factor:g})")
            if f.replace_stragglers and self.health_next is None:
                self.health_next = HandingOverState(ranks=(rank,), reason="straggler", step=step + 1,
                                                    time_s=self.acct.now(), message=msg)
            else:
                self.alert(group, "straggler", step, rank, msg, ratio=round(ratio, 3))
        collapse = self.policies.throughput.update(metrics["samples_per_s"])
        if collapse is not None:
            self.alert(group, "throughput_collapse", step, None,
                       f"throughput fell to {collapse:.2f}x its running median "
                       f"(fault.throughput_alert_ratio={f.throughput_alert_ratio:g})", ratio=round(collapse, 3))
        preempted = sorted(r.rank for r in results if r.preempted)
        if preempted and self.health_next is None:
            self.health_next = HandingOverState(ranks=tuple(preempted), reason="preempt", step=step + 1,
                                                time_s=self.acct.now(),
                                                message=f"rank(s) {preempted} received SIGTERM")

    def alert(self, group: WorkerGroupProtocol, kind: str, step: int, rank: int | None, message: str,
              **extra: Any) -> None:
        """An event that interrupts nothing: reported at once, resolved at once."""
        now = self.acct.now()
        ev = FailureEvent(kind=kind, step=step, rank=rank, detected_s=now, message=message,
                          resumed_s=now, lost_steps=0, world_size_after=group.world_size,
                          extra={"alert": True, **extra})
        self.acct.failure(ev)
        log.warning("alert at step %d: %s", step, message)
        self.fire("after_failure", ev)
        self.fire("after_recovery", ev)

    # ---- checkpoint commits ----------------------------------------------------------
    def commit_saved(self, group: WorkerGroupProtocol) -> None:
        """Commit every checkpoint step the ledger's rule allows (none once the lease is lost)."""
        for s in self.ledger.committable(group.world_size):
            if self.lease is not None and not self.lease.held():
                return  # another driver owns the job now; the loop stops at its next turn
            try:
                path = self.store.commit(s, group.world_size, digests=self.save_digests.pop(s, None))
            except OSError as e:
                full = storage_error(e, self.cfg.checkpoint.storage, f"committing checkpoint step {s}")
                if full is None:
                    raise
                raise full from None
            self.ledger.committed(s)
            for k in [k for k in self.save_digests if k <= s]:
                del self.save_digests[k]
            log.info("checkpoint step %d committed", s)
            self.fire("after_checkpoint", s, path)
