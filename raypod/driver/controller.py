"""The driver: an explicit state machine that keeps a job training through failures.

One loop iteration (:meth:`Driver.step`) runs the handler of the current state and
returns ``(previous, next)``; :meth:`Driver._set_state` is the only place the state
changes, and it fires the callbacks. Policies decide (:mod:`raypod.policies`); the driver
acts, with one helper per job:

- :mod:`raypod.driver.ledger`: steps in flight, acknowledgements, the commit rule;
- :mod:`raypod.driver.completion`: results into counted steps, health checks, commits;
- :mod:`raypod.driver.diagnosis`: errors, heartbeats and fault markers into a ``Failure``;
- :mod:`raypod.driver.recovery_plan`: what to do when a rank dies (pure);
- :mod:`raypod.driver.recovery`: the group carries that plan out;
- :mod:`raypod.driver.membership`: spares and joiners.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any

import ray

from raypod import faults
from raypod.callbacks import Callback, FailureEvent, JobInfo
from raypod.checkpoint import CheckpointStore
from raypod.checkpoint.lease import JobLease
from raypod.config import FaultInjection, JobConfig
from raypod.data.order import SampleOrder
from raypod.driver.accounting import JobAccounting, write_summary
from raypod.driver.checkpoint_choice import CheckpointChoice
from raypod.driver.completion import StepCompletion
from raypod.driver.diagnosis import Diagnosis, dead_ranks
from raypod.driver.ledger import StepLedger
from raypod.driver.membership import Membership
from raypod.driver.recovery import Recovery
from raypod.driver.state import (
    ErroredState,
    FinishedState,
    FinishingState,
    RecoveringState,
    RunningState,
    SchedulingState,
    State,
    StateKind,
    StoppedState,
)
from raypod.driver.stop import StopRequested, StopSignals, signal_name
from raypod.driver.worker_group import GroupStartError, WorkerGroup
from raypod.policies import Policies, policies_for
from raypod.policies.failures import Failure
from raypod.protocol import WorkerGroupProtocol
from raypod.recipe import Recipe, build_recipe, exports_pretrained
from raypod.redact import redact_json
from raypod.storage import StorageError, join_uri, read_json, storage_error

log = logging.getLogger("raypod.driver")

_POLL_S = 0.05
FINAL_MODEL_HF = "final_model_hf"
"""``<job_dir>/final_model_hf/``: the recipe's :meth:`Recipe.export_pretrained` output."""


def _draining_nodes() -> set[str]:
    """Node ids Ray is draining (preemption, autoscaler scale-down); none when it cannot say."""
    try:
        draining = ray._private.worker.global_worker.gcs_client.get_draining_nodes()
    except Exception:  # noqa: BLE001 - an older Ray or a GCS hiccup: nothing known to drain
        return set()
    return {k.hex() if isinstance(k, bytes) else str(k) for k in draining}


class Driver:
    """Runs one job to completion or to a clear failure.

    Args:
        config: the validated job config.
        callbacks: hooks (progress, MLflow, ...).
        recipe: the recipe instance; built from the config when omitted.
        lease: the job's owner lease (:mod:`raypod.checkpoint.lease`); once lost, the driver
            stops and writes nothing more for the job.
        stop: where SIGTERM / SIGINT are recorded (:mod:`raypod.driver.stop`).
        policies: the policies that decide; :func:`raypod.policies.policies_for` the config when omitted.
    """

    worker_group_cls: type = WorkerGroup
    available_resources = staticmethod(ray.available_resources)
    alive_nodes = staticmethod(lambda: {n["NodeID"] for n in ray.nodes() if n.get("Alive")})
    draining_nodes = staticmethod(_draining_nodes)

    def __init__(self, config: JobConfig, callbacks: list[Callback] | None = None,
                 recipe: Recipe | None = None, lease: JobLease | None = None,
                 stop: StopSignals | None = None, policies: Policies | None = None) -> None:
        from raypod.checkpoint.verify import signing_key

        self.cfg = config
        self.lease = lease
        self.stop = stop if stop is not None else StopSignals()
        self.recipe = recipe if recipe is not None else build_recipe(config)
        self.callbacks = list(callbacks or [])
        self.policies = policies if policies is not None else policies_for(config)
        self.store = CheckpointStore(config.job_dir, config.checkpoint.keep, signing_key(config))
        self.storage_failed = False
        """The job ends because ``checkpoint.storage`` cannot be written (full, read-only)."""
        self.state: State = SchedulingState(attempt=0)  # the initial state
        self.group: WorkerGroupProtocol | None = None
        self.attempt = 0
        self.digest: str | None = None
        self.summary: dict[str, Any] | None = None
        self.start_time = time.time()
        self.acct = JobAccounting(self.start_time)
        self.bad_steps: set[int] = set()
        """Steps whose batch was skipped for a bad loss: never trained, never submitted again."""
        self.checkpoints = CheckpointChoice(self.store, self.acct, self._fire)
        self.ledger = StepLedger()
        self.diagnosis = Diagnosis(config, self.ledger, self.acct.now)
        self.membership = Membership(config.scaling, self.policies.scaling)
        self.completion = StepCompletion(config, self.ledger, self.acct, self.policies, self.recipe,
                                         self.store, lease, self._fire, self.bad_steps)
        self.recovery = Recovery(self)
        self.dead_ranks: set[int] = set()
        self.resizes: list[dict[str, Any]] = []
        self.node_failures: dict[str, int] = defaultdict(int)
        self.excluded_nodes: dict[str, str] = {}
        """Nodes that failed a pre-flight check or lost ranks too often -> why."""
        self.load_s: float | None = None
        """Seconds the last checkpoint load took (slowest rank), when this job did one."""
        self.group_start_s: float | None = None
        """Seconds the last group start took (placement, processes, setup)."""
        self.group_formed = False
        """The current group finished its start (a failure raised by the start itself leaves
        ranks inside their set-up call: such a group is never recovered afresh in place)."""

    # ---- what other modules read ---------------------------------------------------
    @property
    def done_step(self) -> int:
        return self.ledger.done_step

    @property
    def committed_step(self) -> int:
        return self.ledger.committed_step

    @property
    def failures(self) -> int:
        return self.completion.failures

    @failures.setter
    def failures(self, n: int) -> None:
        self.completion.failures = n

    @property
    def fired(self) -> set[int]:
        """Indices of ``fault.inject`` entries that fired (they never fire again)."""
        return self.diagnosis.fired

    def pending_faults(self) -> list[tuple[int, FaultInjection]]:
        """The configured faults that have not fired yet, by their markers in storage (one may
        have fired while a group formed, where the running loop did not look)."""
        return faults.pending(self.cfg, faults.fired(self.cfg.job_dir))

    # ---- the loop ----------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to ``train.max_steps``; returns the summary (also written to storage)."""
        latest = self.checkpoints.start()
        self.acct.resumed_after(latest.step if latest else 0)
        self.ledger.committed_step = latest.step if latest else 0
        self.fired.update(faults.fired(self.cfg.job_dir))
        self.bad_steps.update((read_json(self._bad_steps_path) or {}).get("steps", []))
        self.acct.bad_steps = self.bad_steps
        info = JobInfo(config=self.cfg, job_dir=self.cfg.job_dir, start_time=self.start_time,
                       start_step=self.acct.start_step)
        self._fire("before_job", info)
        log.info("state -> %s", self.state.name)
        try:
            while not self.state.is_terminal:
                if self.stop.requested:
                    self._set_state(self._stopped(self.stop.name))
                elif self.lease is not None and not self.lease.held():
                    self._ownership_lost()
                else:
                    self.step()
        except KeyboardInterrupt as e:  # a StopRequested, or the KeyboardInterrupt Ray raises for it
            self._set_state(self._stopped(self.stop.name or (
                signal_name(e.signum) if isinstance(e, StopRequested) else "SIGINT")))
        except Exception as e:  # noqa: BLE001 - the summary must be written whatever happened
            full = storage_error(e, self.cfg.checkpoint.storage, "writing the job's files")
            if full is not None:  # a commit, the final save or the final model: one sentence
                self._set_state(self._storage_failure(full))
            else:
                log.exception("driver error")
                self._set_state(ErroredState(f"driver error: {type(e).__name__}: {e}"))
        finally:
            self._end()
        return self.summary or {}

    def _end(self) -> None:
        self.stop.deferred = True  # a signal now does not interrupt the job's ending
        if self.group is not None:
            self.group.shutdown()
            self.group = None
        if self.storage_failed and not (self.lease is not None and self.lease.lost is not None):
            for step in self.store.remove_uncommitted():  # room for summary.json, no leftovers
                log.info("removed the uncommitted checkpoint step %d", step)
        self._write_summary()

    def step(self) -> tuple[State, State]:
        """Run one iteration of the current state's handler."""
        prev = self.state
        handlers = {
            StateKind.SCHEDULING: self._schedule,
            StateKind.RUNNING: self._run,
            StateKind.RECOVERING: self.recovery.recover,
            StateKind.ROLLING_BACK: self.recovery.roll_back,
            StateKind.HANDING_OVER: self.recovery.hand_over,
            StateKind.FINISHING: self._finish,
        }
        # In RUNNING the loop polls every 50 ms and reacts to a stop itself; elsewhere a
        # stop signal interrupts what the driver waits for (StopRequested).
        self.stop.deferred = prev.kind is StateKind.RUNNING
        nxt = handlers[prev.kind](prev)
        if nxt is not prev:
            self._set_state(nxt)
        return prev, nxt

    def _set_state(self, new: State) -> None:
        prev, self.state = self.state, new
        detail = ""
        if isinstance(new, ErroredState):
            detail = f": {new.error}"
        elif isinstance(new, RecoveringState):
            detail = f": {new.failure.message}"
        log.info("state %s -> %s%s", prev.name, new.name, detail)
        self._fire("after_state_change", prev.name, new.name, self.acct.now())

    def _fire(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            try:
                getattr(cb, hook)(*args)
            except Exception:  # noqa: BLE001 - a broken hook never stops training
                log.exception("callback %s.%s failed", type(cb).__name__, hook)

    def reset(self, step: int, same_group: bool = False) -> None:
        """Training resumes after ``step``: in a new or re-formed group, or (``same_group``,
        a roll back) in the same one."""
        assert self.group is not None
        self.ledger.reset(step, self.group.world_size, same_group)
        self.completion.finished_s.clear()
        for s in [s for s in self.completion.save_digests if s > step or not same_group]:
            del self.completion.save_digests[s]  # a step redone is saved again: its files too
        self.policies.cadence.restart(step, regrouped=not same_group)
        if same_group:  # the same ranks: their replicas up to ``step`` stay
            return
        self.membership.refill_after = step
        self.dead_ranks = set()
        self.completion.health_next = None
        self.policies.stragglers.reset()

    def restart(self) -> SchedulingState:
        """Shut the group down; the next one starts from storage."""
        self._drop_group()
        return SchedulingState(attempt=self.attempt)

    def _drop_group(self) -> None:
        if self.group is not None:
            self.group.shutdown()
            self.group = None

    # ---- SCHEDULING --------------------------------------------------------------
    def _schedule(self, state: SchedulingState) -> State:
        n = self.membership.decide_world_size(self.available_resources)
        if isinstance(n, str):
            return ErroredState(f"no room to schedule the job: {n}")
        restore, refused = self.checkpoints.choose()
        if refused is not None:
            return ErroredState(refused)
        restore_step = restore.step if restore else 0
        self.group = group = self.worker_group_cls(self.cfg, self.recipe)
        group.excluded_nodes = set(self.excluded_nodes)
        self.membership.new_group()
        t_start = time.perf_counter()
        self.group_formed = False
        try:
            info = group.start(n, state.attempt, restore, self.pending_faults())
        except GroupStartError as e:
            return RecoveringState(Failure(kind=str(e.kind), rank=e.rank, step=restore_step + 1,
                                           message=str(e), time_s=self.acct.now()))
        self.group_start_s = time.perf_counter() - t_start
        self.group_formed = True
        if info.get("load_s") is not None:
            self.load_s = info["load_s"]
        refused = self._preflight(info.get("doctor", []), restore_step)
        if refused is not None:
            return refused
        if self.acct.order is None:
            self.acct.order = SampleOrder(info["num_samples"], self.cfg.train.global_batch,
                                          self.cfg.train.seed)
        self.acct.group_started(n)
        source = f"checkpoint step {restore_step}" if restore else "scratch"
        for ev in self.acct.events:
            if ev.world_size_after is None and not ev.extra.get("alert"):
                self.acct.rolled_back(ev, restore_step, n, source)
        self.reset(restore_step)
        self.membership.request_capacity(group)
        log.info("attempt %d: %d ranks ready, from %s (setup %.1f s)", state.attempt, n, source,
                 info.get("setup_s", 0.0))
        if self.done_step >= self.cfg.train.max_steps:
            return FinishingState()
        return RunningState()

    def _preflight(self, reports: list[dict[str, Any]], restore_step: int) -> State | None:
        """Exclude the nodes whose pre-flight checks failed; None when every rank passed."""
        from raypod.doctor import failing_nodes

        bad = failing_nodes(reports)
        if not bad:
            for d in reports[:1]:
                log.info("pre-flight checks passed: %s", "; ".join(
                    f"{c['name']}: {c['detail']}" for c in d["checks"]))
            return None
        self.excluded_nodes.update(bad)
        why = "; ".join(f"node {node[:12]} fails check {reason}" for node, reason in bad.items())
        self._drop_group()
        if not self.alive_nodes() - set(self.excluded_nodes):
            return ErroredState(f"pre-flight checks failed ({why}) and no other node is left to "
                                "place the job on (see raypod doctor)")
        log.warning("pre-flight: %s; placing the job without it", why)
        return RecoveringState(Failure(kind="preflight", rank=None, step=restore_step + 1, message=why,
                                       time_s=self.acct.now()))

    # ---- RUNNING -----------------------------------------------------------------
    def _run(self, state: RunningState) -> State:
        group, ledger, joins = self.group, self.ledger, self.membership
        assert group is not None
        max_steps = self.cfg.train.max_steps
        if not joins.growing and ledger.done_step < max_steps and joins.wants_to_grow(group, self.available_resources):
            joins.growing = True  # stop submitting; grow once the steps in flight are done
        if joins.growing and ledger.next_step - 1 == ledger.done_step:
            return self._grow(state)
        if not joins.growing:
            self._submit(group)
        self.completion.replica_fallback(group)  # after the submits: a step just queued carries the ack
        result = group.poll(timeout=_POLL_S)
        self.completion.absorb(group, result)
        joins.refill(group, ledger.done_step)  # the group trains again: start the lost ranks' spares
        if result.errors:
            self.dead_ranks = dead_ranks(result.errors)
            return RecoveringState(self.diagnosis.failure_from(group, result.errors))
        if self.completion.health_next is not None:
            nxt, self.completion.health_next = self.completion.health_next, None
            return nxt
        if ledger.done_step >= max_steps:
            return FinishingState()
        nxt = self.diagnosis.watch(group, self.completion.step_durs, self.excluded_nodes, self.draining_nodes)
        if nxt is None:
            return state
        self.dead_ranks = set(self.diagnosis.silent)  # silent ranks are lost with the one blamed
        return nxt

    def _submit(self, group: WorkerGroupProtocol) -> None:
        """Queue steps (and their saves) up to the in-flight limit; replica acknowledgements come
        back in the next step's results (``completion.replica_fallback`` asks when none will)."""
        ledger, cadence = self.ledger, self.policies.cadence
        while ledger.next_step <= self.cfg.train.max_steps and ledger.has_room():
            step = ledger.next_step
            if step not in self.bad_steps:  # a skipped batch is never trained
                group.submit_step(step, snapshot=cadence.decide(step))
                every = self.cfg.checkpoint.every_steps
                if step == self.cfg.train.max_steps or (every > 0 and step % every == 0):
                    group.submit_save(step, self.store.path_for(step))
            ledger.next_step += 1

    def _grow(self, state: RunningState) -> State:
        """Add the warm joiners at this step boundary, resharding the state from live ranks."""
        group = self.group
        assert group is not None
        added = self.membership.take_ready(group)
        step, before, t0 = self.done_step, group.world_size, self.acct.now()
        try:
            info = group.reshard(set(), added, step, self.attempt, self.pending_faults())
        except GroupStartError as e:
            return RecoveringState(Failure(kind="resize_failed", rank=None, step=step + 1,
                                           time_s=self.acct.now(), message=f"growing the job failed: {e}"))
        self.acct.group_started(group.world_size)
        self.resizes.append({"kind": "grow", "step": step, "from": before, "to": group.world_size,
                             "at_s": round(t0, 3), "took_s": round(info["recover_s"], 3)})
        self.reset(step)
        log.info("grew from %d to %d ranks after step %d in %.2f s (state resharded in memory)",
                 before, group.world_size, step, info["recover_s"])
        self._fire("after_resize", self.resizes[-1])
        return state

    @property
    def _bad_steps_path(self) -> str:
        return join_uri(self.cfg.job_dir, "bad_steps.json")

    # ---- a user's stop, a lost lease -----------------------------------------------
    def _stopped(self, signame: str) -> StoppedState:
        """Abandon the steps in flight, commit a save every rank already finished, record a
        ``stop`` event; never starts a save (``ray job stop`` SIGKILLs after a few seconds)."""
        if self.group is not None and self.state.kind is StateKind.RUNNING:
            try:  # what finished by now still counts (steps, save acks -> commits)
                result = self.group.poll(timeout=0)
                if not result.errors:
                    self.completion.absorb(self.group, result)
            except Exception as e:  # noqa: BLE001 - stopping anyway
                log.warning("collecting the steps in flight at the stop: %s", e)
        in_flight = self.ledger.in_flight
        step = self.acct.last_step
        now = self.acct.now()
        msg = (f"stopped by {signame} after step {step}; {in_flight} step(s) in flight abandoned; "
               f"latest committed checkpoint: step {self.committed_step}")
        ev = FailureEvent(kind="stop", step=step, rank=None, detected_s=now, message=msg,
                          lost_steps=0, extra={"signal": signame, "abandoned_steps": in_flight,
                                               "committed_step": self.committed_step})
        self.acct.failure(ev)
        log.info("job '%s' %s", self.cfg.name, msg)  # not a failure: no after_failure hook
        return StoppedState(signal=signame, step=step)

    def _ownership_lost(self) -> None:
        """Another driver owns the job now: stop at once, tell no callback, write nothing."""
        assert self.lease is not None and self.lease.lost is not None
        self.callbacks = []  # the MLflow run and the progress belong to the new owner
        self._set_state(ErroredState(self.lease.lost))

    # ---- FINISHING ---------------------------------------------------------------
    def _finish(self, state: FinishingState) -> State:
        group = self.group
        assert group is not None
        group.quiesce(timeout=0.0)  # sends the calls still queued (a large group's last saves)
        for rank, steps in group.finish_saves():
            self.completion.ack_saves(group, rank, steps)
        # The consolidated model goes beside the checkpoints (and, for a recipe that exports its
        # own format, such as save_pretrained output, to final_model_hf/); MLflow logs it.
        hf = join_uri(self.cfg.job_dir, FINAL_MODEL_HF) if exports_pretrained(self.recipe) else None
        self.digest = group.state_digest(join_uri(self.cfg.job_dir, "final_model.pt"), hf)
        group.close()
        self.group = None
        return FinishedState()

    # ---- storage that cannot be written -------------------------------------------
    def _storage_failure(self, err: StorageError) -> ErroredState:
        """``checkpoint.storage`` cannot be written: the job ends now, in one sentence (no
        recovery can make room), with a ``storage`` event."""
        self.storage_failed = True
        if not any(ev.kind == "storage" for ev in self.acct.events):
            self.acct.failure(FailureEvent(kind="storage", step=self.done_step + 1, rank=None,
                                           detected_s=self.acct.now(), message=str(err)))
        return ErroredState(str(err))

    # ---- the end -----------------------------------------------------------------
    def _write_summary(self) -> None:
        ok = self.state.kind is StateKind.FINISHED
        error = self.state.error if isinstance(self.state, ErroredState) else None
        if self.lease is not None and self.lease.lost is not None:  # not ours to write any more
            self.summary = self.acct.summary(status="failed", final_step=self.acct.last_step,
                                             run_id=None, digest=None, error=self.lease.lost)
            return
        stopped = isinstance(self.state, StoppedState)
        summary = self.acct.summary(
            status="succeeded" if ok else "stopped" if stopped else "failed",
            final_step=self.acct.last_step,
            run_id=None,
            digest=self.digest,
            error=error,
        )
        summary["committed_step"] = self.committed_step
        summary["resizes"] = self.resizes
        summary["excluded_nodes"] = dict(self.excluded_nodes)
        summary["memory_snapshots"] = self.policies.cadence.figures()
        self._fire("before_summary", summary)
        summary = redact_json(summary)  # no credentials (in an error's URI, say) reach storage or MLflow
        path = write_summary(self.cfg.job_dir, self.cfg.name, self.start_time, summary)
        self.summary = summary
        self._fire("after_job", summary, path)
