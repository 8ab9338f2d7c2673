"""The driver: an explicit state machine that keeps a job training through failures.

One loop iteration (:meth:`Driver.step`) runs the handler of the current state and
returns ``(previous, next)``; :meth:`Driver._set_state` is the only place the state
changes, and it fires the callbacks. Policies decide (:mod:`raypod.driver.failures`,
:mod:`raypod.driver.scaling`); the driver acts.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections import defaultdict, deque
from typing import Any

import ray

from raypod import console, faults
from raypod.callbacks import Callback, FailureEvent, JobInfo, StepReport
from raypod.checkpoint import CheckpointStore, CommittedCheckpoint
from raypod.checkpoint.fs import StorageError, read_json, storage_error, write_json_atomic
from raypod.checkpoint.lease import JobLease
from raypod.config import JobConfig, import_target, join_uri
from raypod.data.order import SampleOrder
from raypod.driver.accounting import JobAccounting
from raypod.driver.cadence import SnapshotCadence
from raypod.driver.failures import Failure, FailureDecision, FailurePolicy
from raypod.driver.health import LossRule, StragglerTracker, ThroughputWatch, hung_rank
from raypod.driver.recovery_source import CHECKPOINT, MEMORY, SourceChoice, choose_source, estimate
from raypod.driver.scaling import ResizeDecision, ScalingPolicy
from raypod.driver.state import (
    ErroredState,
    FinishedState,
    FinishingState,
    HandingOverState,
    RecoveringState,
    RollingBackState,
    RunningState,
    SchedulingState,
    State,
    StateKind,
    StoppedState,
)
from raypod.driver.stop import StopRequested, StopSignals, signal_name
from raypod.driver.worker_group import GroupStartError, PollResult, WorkerError, WorkerGroup
from raypod.recipe import Recipe
from raypod.redact import redact_json

log = logging.getLogger("raypod.driver")

_POLL_S = 0.05
_STEPS_IN_FLIGHT = 2  # steps queued on each rank ahead of the slowest one
_HANG_HISTORY = 3  # steps timed before fault.hang_factor applies
_TRAINING_PHASES = ("start", "forward_backward", "optimizer", "snapshot")
"""Phases of ``raypod.worker.trainer.PHASES`` in which a rank works on its step, so the
others may be waiting on it (in ``sync`` it waits itself; in ``done`` it is between steps)."""


def build_recipe(config: JobConfig) -> Recipe:
    """Instantiate ``recipe.target`` with ``recipe.args``.

    Raises:
        ConfigError: the constructor raised; one sentence naming ``recipe.target`` and the error.
    """
    from raypod.config import ConfigError

    cls = import_target(config.recipe.target, config.recipe.import_dirs)
    try:
        return cls(**config.recipe.args)
    except ConfigError:  # already one sentence naming the key (a missing package, a bad argument)
        raise
    except Exception as e:  # noqa: BLE001 - any constructor failure is the user's recipe or its args
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"recipe.target '{config.recipe.target}' could not be built with recipe.args: "
                          f"{type(e).__name__}: {msg}".rstrip(": ")) from None


FINAL_MODEL_HF = "final_model_hf"
"""``<job_dir>/final_model_hf/``: the recipe's :meth:`Recipe.export_pretrained` output."""


def _exports(recipe: Recipe) -> bool:
    """Whether the recipe overrides :meth:`Recipe.export_pretrained`."""
    return type(recipe).export_pretrained is not Recipe.export_pretrained


_SECOND_PING_S = 3.0
"""How long a rank that missed the first ping gets to answer when its loss would cost the in-memory copy."""
_DEFAULT_LOAD_S = 30.0
"""Assumed seconds to load a checkpoint when this job has measured neither a load nor a save."""


def recipe_metrics(results: list[dict[str, Any]], samples: int) -> dict[str, float]:
    """The recipe's own metrics of one step, over all ranks: the extra metrics its ``loss``
    returned (means over the step's samples) and, on an eval step, ``eval_loss``, its
    other ``eval_<name>`` metrics (means over the eval samples) and ``eval_s``."""
    out: dict[str, float] = {}
    for r in results:
        for k, v in r.get("metrics_sum", {}).items():
            out[k] = out.get(k, 0.0) + v
    out = {k: v / max(1, samples) for k, v in out.items()}
    evaluated = [r for r in results if r.get("eval_samples") is not None]
    n = sum(r["eval_samples"] for r in evaluated)
    if n:
        sums: dict[str, float] = {}
        for r in evaluated:
            for k, v in r["eval_sums"].items():
                sums[k] = sums.get(k, 0.0) + v
        out.update({f"eval_{k}": v / n for k, v in sums.items()})
        out["eval_s"] = max(r["eval_s"] for r in evaluated)
    return out


class Driver:
    """Runs one job to completion or to a clear failure.

    Args:
        config: the validated job config.
        callbacks: hooks (progress, MLflow, ...).
        recipe: the recipe instance; built from the config when omitted.
    """

    worker_group_cls: type = WorkerGroup
    available_resources = staticmethod(ray.available_resources)
    alive_nodes = staticmethod(lambda: {n["NodeID"] for n in ray.nodes() if n.get("Alive")})

    def __init__(self, config: JobConfig, callbacks: list[Callback] | None = None,
                 recipe: Recipe | None = None, lease: JobLease | None = None,
                 stop: StopSignals | None = None) -> None:
        self.cfg = config
        self.lease = lease
        """The job's owner lease (:mod:`raypod.checkpoint.lease`); once lost, the driver
        stops and writes nothing more for the job."""
        self.stop = stop if stop is not None else StopSignals()
        """Where SIGTERM / SIGINT are recorded (:mod:`raypod.driver.stop`)."""
        self.recipe = recipe if recipe is not None else build_recipe(config)
        self.callbacks = list(callbacks or [])
        from raypod.checkpoint.verify import signing_key

        self.store = CheckpointStore(config.job_dir, config.checkpoint.keep, signing_key(config))
        self._first_choice: tuple[CommittedCheckpoint | None, list[Any]] | None = None
        """The checkpoint verified at start, used by the first group (one verification per choice)."""
        self._corrupt_seen: set[tuple[int, str]] = set()
        self.storage_failed = False
        """The job ends because ``checkpoint.storage`` cannot be written (full, read-only)."""
        replicas = config.parallel.replicas if config.parallel.strategy == "hsdp" else 1
        self.failure_policy = FailurePolicy(config.fault.max_failures)
        self.scaling_policy = ScalingPolicy(config.scaling, replicas)
        self.state: State = SchedulingState(attempt=0)  # the initial state
        self.group: Any = None
        self.attempt = 0
        self.failures = 0
        self.fired: set[int] = set()
        self.digest: str | None = None
        self.summary: dict[str, Any] | None = None
        self.start_time = time.time()
        self.acct = JobAccounting(self.start_time)
        # Step bookkeeping for the current group.
        self.next_step = 1
        self.done_step = 0
        self.rank_step: dict[int, int] = {}
        self.partial: dict[int, list[dict[str, Any]]] = defaultdict(list)
        self.save_acks: dict[int, set[int]] = defaultdict(set)
        self.replica_acks: dict[int, set[int]] = defaultdict(set)
        self.last_progress = time.monotonic()
        self.last_completion = time.time()
        self.committed_step = 0
        c = config.checkpoint
        self.cadence = SnapshotCadence(c.memory_every_steps, c.memory_stall_budget, c.memory_max_every)
        self.dead_ranks: set[int] = set()
        self.resizes: list[dict[str, Any]] = []
        self.node_failures: dict[str, int] = defaultdict(int)
        self.growing = False
        self.refill_after = 0
        """Replaced ranks' slots become spares once a step after this one completed."""
        self.ready: list[tuple[Any, Any]] = []
        """Joiners that are warm and wait for the next step boundary."""
        self.next_scale_check = 0.0
        # Health.
        f = config.fault
        self.loss_rule = LossRule(f.loss_spike_factor)
        self.stragglers = StragglerTracker(f.straggler_factor, f.straggler_steps)
        self.throughput = ThroughputWatch(f.throughput_alert_ratio)
        self.bad_steps: set[int] = set()
        """Steps whose batch was skipped for a bad loss: never trained, never submitted again."""
        self.health_next: State | None = None
        """A state the health checks of the last results ask for (rolling back, handing over)."""
        self.next_health_check = 0.0
        self.next_hang_probe = 0.0
        self.step_durs: deque[float] = deque(maxlen=50)  # recent step times, for fault.hang_factor
        self.excluded_nodes: dict[str, str] = {}
        """Nodes that failed a pre-flight check -> which check and why."""
        # What a recovery from the persistent checkpoint costs (see recovery_source).
        self.load_s: float | None = None
        """Seconds the last checkpoint load took (slowest rank), when this job did one."""
        self.save_s: dict[int, float] = {}
        """Per rank: seconds its last persistent save took."""
        self.group_start_s: float | None = None
        """Seconds the last group start took (placement, processes, setup)."""

    # ---- the loop ----------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to ``train.max_steps``; returns the summary (also written to storage)."""
        self._first_choice = self.store.latest_verified()
        latest = self._first_choice[0]
        self.acct = JobAccounting(self.start_time, latest.step if latest else 0)
        self.committed_step = latest.step if latest else 0
        self.fired = set(faults.fired(self.cfg.job_dir))
        self.bad_steps = set((read_json(self._bad_steps_path) or {}).get("steps", []))
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
        except (KeyboardInterrupt, StopRequested) as e:
            self._set_state(self._stopped(self.stop.name or (
                "SIGINT" if isinstance(e, KeyboardInterrupt) else signal_name(e.signum))))
        except Exception as e:  # noqa: BLE001 - the summary must be written whatever happened
            full = storage_error(e, self.cfg.checkpoint.storage, "writing the job's files")
            if full is not None:  # a commit, the final save or the final model: one sentence
                self._set_state(self._storage_failure(full))
            else:
                log.exception("driver error")
                self._set_state(ErroredState(f"driver error: {type(e).__name__}: {e}"))
        finally:
            self.stop.deferred = True  # a signal now does not interrupt the job's ending
            if self.group is not None:
                self.group.shutdown()
                self.group = None
            if self.storage_failed and not (self.lease is not None and self.lease.lost is not None):
                for step in self.store.remove_uncommitted():  # room for summary.json, no leftovers
                    log.info("removed the uncommitted checkpoint step %d", step)
            self._write_summary()
        return self.summary or {}

    def step(self) -> tuple[State, State]:
        """Run one iteration of the current state's handler."""
        prev = self.state
        handlers = {
            StateKind.SCHEDULING: self._schedule,
            StateKind.RUNNING: self._run,
            StateKind.RECOVERING: self._recover,
            StateKind.ROLLING_BACK: self._roll_back,
            StateKind.HANDING_OVER: self._hand_over,
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

    # ---- SCHEDULING --------------------------------------------------------------
    def _decide_world_size(self) -> int | str:
        """Ranks for the next group, or why there is no room (after the schedule timeout)."""
        deadline = time.monotonic() + self.cfg.scaling.schedule_timeout_s
        best, reason = 0, ""
        settle = time.monotonic() + 2.0  # resources of a group just torn down come back
        note = settle + 1.0  # say what it waits for once the wait is more than a hiccup
        while True:
            free = self.available_resources()
            decision = self.scaling_policy.decide(free)
            if isinstance(decision, ResizeDecision):
                best = decision.num_workers
                if best == self.cfg.scaling.max_workers or time.monotonic() > settle:
                    return best
            else:
                reason = decision.reason
                if time.monotonic() >= note:
                    note = time.monotonic() + 30.0
                    bundle = self.scaling_policy.bundle
                    log.warning("waiting for capacity: %d x %s for scaling.min_workers; the cluster has "
                                "%s free; giving up in %.0f s (scaling.schedule_timeout_s)",
                                self.cfg.scaling.min_workers, bundle,
                                {k: round(free.get(k, 0.0), 2) for k in bundle},
                                max(0.0, deadline - time.monotonic()))
            if time.monotonic() > deadline:
                return best or reason
            time.sleep(0.1)

    def _schedule(self, state: SchedulingState) -> State:
        n = self._decide_world_size()
        if isinstance(n, str):
            return ErroredState(f"no room to schedule the job: {n}")
        restore, refused = self._choose_checkpoint()
        if refused is not None:
            return ErroredState(refused)
        restore_step = restore.step if restore else 0
        active = faults.pending(self.cfg, self.fired)
        self.group = self.worker_group_cls(self.cfg, self.recipe)
        self.group.excluded_nodes = set(self.excluded_nodes)
        self.ready, self.growing = [], False
        t_start = time.perf_counter()
        try:
            info = self.group.start(n, state.attempt, restore, active)
        except GroupStartError as e:
            return RecoveringState(Failure(kind=e.kind, rank=e.rank, step=restore_step + 1,
                                           message=str(e), time_s=self.acct.now()))
        self.group_start_s = time.perf_counter() - t_start
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
        self._reset_group_progress(restore_step)
        self._request_capacity()
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
        self.group.shutdown()
        self.group = None
        if not self.alive_nodes() - set(self.excluded_nodes):
            return ErroredState(f"pre-flight checks failed ({why}) and no other node is left to "
                                "place the job on (see raypod doctor)")
        log.warning("pre-flight: %s; placing the job without it", why)
        return RecoveringState(Failure(kind="preflight", rank=None, step=restore_step + 1, message=why,
                                       time_s=self.acct.now()))

    def _reset_group_progress(self, restore_step: int) -> None:
        self.next_step = restore_step + 1
        self.done_step = restore_step
        self.refill_after = restore_step
        self.rank_step = {r: restore_step for r in range(self.group.world_size)}
        self.partial.clear()
        self.save_acks.clear()
        self.replica_acks.clear()
        self.dead_ranks = set()
        self.last_progress = time.monotonic()
        self.last_completion = time.time()
        self.health_next = None
        self.stragglers.reset()
        self.cadence.restart(restore_step)

    # ---- RUNNING -----------------------------------------------------------------
    def _should_save(self, step: int) -> bool:
        every = self.cfg.checkpoint.every_steps
        return step == self.cfg.train.max_steps or (every > 0 and step % every == 0)

    def _request_capacity(self) -> None:
        """Ask the Ray autoscaler for room for every rank up to ``max_workers`` (and spares)."""
        s = self.cfg.scaling
        if getattr(self.group, "world_size", 0) >= s.max_workers:
            return
        try:
            from ray.autoscaler.sdk import request_resources

            bundle = self.scaling_policy.bundle
            request_resources(bundles=[dict(bundle)] * (s.max_workers + s.spares))
        except Exception as e:  # noqa: BLE001 - a cluster without an autoscaler
            log.info("could not ask the autoscaler for more nodes: %s", e)

    def _wants_to_grow(self) -> bool:
        """Start joiners when the cluster has room; True once one is warm (grow at a step boundary)."""
        group = self.group
        if not hasattr(group, "ready_joiners") or group.world_size >= self.cfg.scaling.max_workers:
            return False
        now = time.monotonic()
        if now < self.next_scale_check:
            return False
        self.next_scale_check = now + 0.5
        want = self.scaling_policy.joiners_wanted(group.world_size, len(group.joiners),
                                                  self.available_resources())
        for _ in range(want):
            group.add_joiner()
        self.ready += group.ready_joiners()
        return bool(self.ready)

    def _grow(self, state: RunningState) -> State:
        """Add the warm joiners at this step boundary, resharding the state from live ranks."""
        group = self.group
        room = self.cfg.scaling.max_workers - group.world_size
        added, extra = self.ready[:room], self.ready[room:]
        self.ready, self.growing = [], False
        for actor, _ in extra:
            ray.kill(actor, no_restart=True)
        step, before, t0 = self.done_step, group.world_size, self.acct.now()
        try:
            info = group.reshard(set(), added, step, self.attempt, faults.pending(self.cfg, self.fired))
        except GroupStartError as e:
            return RecoveringState(Failure(kind="resize_failed", rank=None, step=step + 1,
                                           time_s=self.acct.now(), message=f"growing the job failed: {e}"))
        self.acct.group_started(group.world_size)
        self.resizes.append({"kind": "grow", "step": step, "from": before, "to": group.world_size,
                             "at_s": round(t0, 3), "took_s": round(info["recover_s"], 3)})
        self._reset_group_progress(step)
        log.info("grew from %d to %d ranks after step %d in %.2f s (state resharded in memory)",
                 before, group.world_size, step, info["recover_s"])
        self._fire("after_resize", self.resizes[-1])
        return state

    def _run(self, state: RunningState) -> State:
        max_steps = self.cfg.train.max_steps
        if not self.growing and self.done_step < max_steps and self._wants_to_grow():
            self.growing = True  # stop submitting; grow once the steps in flight are done
        if self.growing and self.next_step - 1 == self.done_step:
            return self._grow(state)
        while (not self.growing and self.next_step <= max_steps
               and self.next_step - self.done_step <= _STEPS_IN_FLIGHT):
            if self.next_step not in self.bad_steps:  # a skipped batch is never trained
                self.group.submit_step(self.next_step, snapshot=self.cadence.decide(self.next_step))
                if self._replicates(self.next_step):
                    self.group.submit_replica_wait(self.next_step)
                if self._should_save(self.next_step):
                    self.group.submit_save(self.next_step, self.store.path_for(self.next_step))
            self.next_step += 1
        result = self.group.poll(timeout=_POLL_S)
        self._absorb(result)
        if getattr(self.group, "freed", None) and self.done_step > self.refill_after:
            self.group.refill_spares()  # the group trains again: start the lost ranks' spares
        if result.errors:
            self.dead_ranks = {e.rank for e in result.errors if e.kind == "worker_died"}
            return RecoveringState(self._failure_from(result.errors))
        if self.health_next is not None:
            nxt, self.health_next = self.health_next, None
            return nxt
        if self.done_step >= max_steps:
            return FinishingState()
        stalled = time.monotonic() - self.last_progress
        if stalled > self.cfg.fault.hang_timeout_s:
            return RecoveringState(self._hang_failure())
        quick = self._quick_hang_s()
        if quick is not None and stalled > quick and time.monotonic() >= self.next_hang_probe:
            self.next_hang_probe = time.monotonic() + self.cfg.fault.heartbeat_s
            failure = self._quick_hang_failure(stalled)
            if failure is not None:
                return RecoveringState(failure)
        if time.monotonic() >= self.next_health_check:
            self.next_health_check = time.monotonic() + self.cfg.fault.heartbeat_s
            draining = self._draining_ranks()
            if draining:
                return HandingOverState(ranks=tuple(draining), reason="drain", step=self.done_step + 1,
                                        time_s=self.acct.now(),
                                        message=f"the node of rank(s) {draining} is draining")
        return state

    def _replicates(self, step: int) -> bool:
        """Whether step ``step``'s snapshot is replicated to peers (then the step completes
        only once every replica is in place, so losing any one rank never loses it)."""
        peers = getattr(self.group, "peer_to", None) or []
        return self.cadence.snapshots(step) and any(p is not None for p in peers)

    def _step_ready(self, step: int) -> bool:
        n = self.group.world_size
        if len(self.partial.get(step, ())) != n:
            return False
        return not self._replicates(step) or len(self.replica_acks.get(step, ())) == n

    # ---- health ------------------------------------------------------------------
    @property
    def _bad_steps_path(self) -> str:
        return join_uri(self.cfg.job_dir, "bad_steps.json")

    def _refresh_fired(self) -> dict[int, dict[str, Any]]:
        """Markers of injected faults that fired since the driver last looked."""
        new = {i: m for i, m in faults.fired(self.cfg.job_dir).items() if i not in self.fired}
        self.fired |= set(new)
        return new

    def _quick_hang_s(self) -> float | None:
        """The stall after which the heartbeats are asked for a hung rank (``fault.hang_factor``
        x the median recent step, at least ``fault.hang_min_s``); None until steps are known."""
        f = self.cfg.fault
        if f.hang_factor <= 0 or len(self.step_durs) < _HANG_HISTORY or not hasattr(self.group, "heartbeats"):
            return None
        return max(f.hang_min_s, f.hang_factor * statistics.median(self.step_durs))

    def _quick_hang_failure(self, stalled: float) -> Failure | None:
        """A hang, when one rank is silent or behind every other inside its training step."""
        beats = self.group.heartbeats(timeout=self.cfg.fault.heartbeat_s)
        rank, why = hung_rank(beats)
        hb = beats.get(rank) if rank is not None else None
        if rank is None or (hb is not None and hb["phase_name"] not in _TRAINING_PHASES):
            return None  # a wait every rank shares, or a rank between steps (a save): not a hang
        f = self.cfg.fault
        return self._hang_failure(
            (rank, why), f"no step finished for {stalled:.1f} s ({f.hang_factor:g}x the median step, "
                         f"at least {f.hang_min_s:g} s: fault.hang_factor, fault.hang_min_s)")

    def _hang_failure(self, blamed: tuple[int | None, str] | None = None, after: str | None = None) -> Failure:
        """No step finished for ``fault.hang_timeout_s`` (or ``after`` says for how long): find
        the rank the others wait for (``blamed``, when the heartbeats were just read)."""
        timeout = self.cfg.fault.hang_timeout_s
        rank, why = blamed or (None, "heartbeats are not available")
        if blamed is None and hasattr(self.group, "heartbeats"):
            rank, why = hung_rank(self.group.heartbeats(timeout=self.cfg.fault.heartbeat_s))
        step = self.done_step + 1
        for marker in self._refresh_fired().values():
            if marker["kind"] == "hang" and (rank is None or marker["rank"] == rank):
                rank, step = marker["rank"], marker["step"]
        who = f"rank {rank} {why}" if rank is not None else f"no single rank to blame ({why})"
        return Failure(kind="hang", rank=rank, step=step, time_s=self.acct.now(),
                       message=f"{after or f'no step finished for {timeout:g} s (fault.hang_timeout_s)'}: {who}")

    def _draining_ranks(self) -> list[int]:
        """Ranks on nodes that Ray is draining (preemption, autoscaler scale-down)."""
        nodes = getattr(self.group, "nodes", None)
        if not nodes:
            return []
        try:
            draining = ray._private.worker.global_worker.gcs_client.get_draining_nodes()
        except Exception:  # noqa: BLE001 - an older Ray or a GCS hiccup: nothing known to drain
            return []
        ids = {k.hex() if isinstance(k, bytes) else str(k) for k in draining}
        new = ids & set(nodes) - set(self.excluded_nodes)
        for node in new:  # handled once; the next placements avoid it
            self.excluded_nodes[node] = "drain: Ray is draining the node"
        return [r for r, node in enumerate(nodes) if node in new]

    def _check_health(self, step: int, results: list[dict[str, Any]], metrics: dict[str, float]) -> None:
        """Straggler, throughput and preemption checks of a step every rank finished."""
        own = {r["rank"]: max(0.0, r["compute_s"] - r.get("wait_s", 0.0)) for r in results}
        worst, slow = self.stragglers.update(own)
        metrics["straggler_ratio"] = worst
        metrics["wait_s"] = max(r.get("wait_s", 0.0) for r in results)
        for rank, ratio in slow:
            msg = (f"rank {rank} computes {ratio:.1f}x the other ranks' median for "
                   f"{self.cfg.fault.straggler_steps} steps (fault.straggler_factor="
                   f"{self.cfg.fault.straggler_factor:g})")
            if self.cfg.fault.replace_stragglers and self.health_next is None:
                self.health_next = HandingOverState(ranks=(rank,), reason="straggler", step=step + 1,
                                                    time_s=self.acct.now(), message=msg)
            else:
                self._alert("straggler", step, rank, msg, ratio=round(ratio, 3))
        collapse = self.throughput.update(metrics["samples_per_s"])
        if collapse is not None:
            self._alert("throughput_collapse", step, None,
                        f"throughput fell to {collapse:.2f}x its running median "
                        f"(fault.throughput_alert_ratio={self.cfg.fault.throughput_alert_ratio:g})",
                        ratio=round(collapse, 3))
        preempted = sorted(r["rank"] for r in results if r.get("preempted"))
        if preempted and self.health_next is None:
            self.health_next = HandingOverState(ranks=tuple(preempted), reason="preempt", step=step + 1,
                                                time_s=self.acct.now(),
                                                message=f"rank(s) {preempted} received SIGTERM")

    def _alert(self, kind: str, step: int, rank: int | None, message: str, **extra: Any) -> None:
        """An event that interrupts nothing: reported at once, resolved at once."""
        now = self.acct.now()
        ev = FailureEvent(kind=kind, step=step, rank=rank, detected_s=now, message=message,
                          resumed_s=now, lost_steps=0, world_size_after=self.group.world_size,
                          extra={"alert": True, **extra})
        self.acct.failure(ev)
        log.warning("alert at step %d: %s", step, message)
        self._fire("after_failure", ev)
        self._fire("after_recovery", ev)

    def _absorb(self, result: PollResult) -> None:
        for r in result.steps:
            self.partial[r["step"]].append(r)
            self.rank_step[r["rank"]] = r["step"]
            self.last_progress = time.monotonic()
            self._ack_saves(r["rank"], r.get("saved", []))
            if r.get("save_s") is not None:
                self.save_s[r["rank"]] = r["save_s"]
        for rank, steps in result.saved:
            self._ack_saves(rank, steps)
        for rank, step, _ok in result.replicated:
            self.replica_acks[step].add(rank)
        while self.health_next is None or not isinstance(self.health_next, RollingBackState):
            nxt = self.done_step + 1
            if nxt in self.bad_steps and nxt <= self.cfg.train.max_steps:
                self.done_step = nxt  # skipped on purpose
            elif self._step_ready(nxt):
                self.replica_acks.pop(nxt, None)
                self._complete_step(nxt)
            else:
                break

    def _complete_step(self, step: int, resolve: bool = True) -> None:
        results = sorted(self.partial.pop(step), key=lambda r: r["rank"])
        samples = sum(r["samples"] for r in results)
        loss = sum(r["loss_sum"] for r in results) / max(1, samples)
        bad = self.loss_rule.check(loss)
        if bad is not None:  # the step does not count: roll back and skip its batch
            self.health_next = RollingBackState(step=step, reason=bad, loss=loss, time_s=self.acct.now())
            return
        now = time.time()
        dur = max(1e-9, now - self.last_completion)
        self.last_completion = now
        self.step_durs.append(dur)
        self.done_step = step
        replayed, resolved = self.acct.step_done(step, dur, [(r["epoch"], r["ids"]) for r in results],
                                                 resolve=resolve)
        t = self.cfg.train
        sps = t.global_batch / dur
        after_first = self.acct.now() - (self.acct.first_step_s or 0.0)
        metrics = {
            "loss": loss,
            "lr": results[0]["lr"],
            "grad_norm": results[0]["grad_norm"],
            "step_time_s": dur,
            "compute_s": max(r["compute_s"] for r in results),
            "samples_per_s": sps,
            "tokens_per_s": sps * self.recipe.tokens_per_sample(),
            "world_size": float(len(results)),
            "data_wait_frac": max(r["data_s"] for r in results) / dur,
            "goodput": min(1.0, self.acct.productive_s() / after_first) if after_first > 0 else 1.0,
            "failures": float(self.failures),
        }
        metrics = {**recipe_metrics(results, samples), **metrics}  # raypod's own names win a clash
        self.cadence.observe(step, results)
        self._check_health(step, results, metrics)
        self._commit_saved()  # a save of this step may have been held back until it counted
        self._fire("after_step", StepReport(step=step, metrics=metrics, time_s=self.acct.now(),
                                            replayed=replayed, ranks=self._rank_figures(results)))
        for ev in resolved:
            log.info("recovered from %s at step %d: resumed %.2f s after detection, %s lost steps",
                     ev.kind, ev.step, ev.resumed_s - ev.detected_s, ev.lost_steps)
            self._fire("after_recovery", ev)

    def _rank_figures(self, results: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
        """Each rank's own compute, its waits (peers, data) and its node, for the step report."""
        nodes = list(getattr(self.group, "nodes", None) or [])
        out: dict[int, dict[str, Any]] = {}
        for r in results:
            wait, data = r.get("wait_s", 0.0), r.get("data_s", 0.0)
            out[r["rank"]] = {"compute_s": max(0.0, r["compute_s"] - wait - data), "wait_s": wait,
                              "data_s": data, "node_id": nodes[r["rank"]] if r["rank"] < len(nodes) else None}
        return out

    def _ack_saves(self, rank: int, steps: list[int]) -> None:
        """Note finished saves; commit a step all ranks saved, once the step itself counted.

        A step is committed only after the driver saw every rank finish it with a good
        loss, so a checkpoint of a step that is then rolled back is never committed.
        """
        for s in steps:
            self.save_acks[s].add(rank)
        self._commit_saved()

    def _commit_saved(self) -> None:
        for s in sorted(self.save_acks):
            if s > self.done_step:
                break
            if len(self.save_acks[s]) == self.group.world_size and s > self.committed_step:
                if self.lease is not None and not self.lease.held():
                    return  # another driver owns the job now; the loop stops at its next turn
                try:
                    path = self.store.commit(s, self.group.world_size)
                except OSError as e:
                    full = storage_error(e, self.cfg.checkpoint.storage, f"committing checkpoint step {s}")
                    if full is None:
                        raise
                    raise full from None
                self.committed_step = s
                del self.save_acks[s]
                log.info("checkpoint step %d committed", s)
                self._fire("after_checkpoint", s, path)

    def _failure_from(self, errors: list[WorkerError]) -> Failure:
        """The root cause among the errors: storage that cannot be written, a dead rank, then an
        injected fault, then the rest."""
        full = [x for x in errors if x.kind == "storage"]
        if full:  # full, read-only or forbidden storage: no restart makes room (never retried)
            e = min(full, key=lambda x: x.step)
            return Failure(kind="storage", rank=e.rank, step=e.step, time_s=self.acct.now(),
                           message=e.message, retryable=False)
        priority = {"worker_died": 0, "injected": 1, "exception": 2}
        e = min(errors, key=lambda e: (priority.get(e.kind, 3), e.step))
        timed_out = [x for x in errors if x.kind == "exception" and "timed out" in x.message.lower()]
        if e.kind == "exception" and timed_out and hasattr(self.group, "heartbeats"):
            # A collective timed out (fault.pg_timeout_s): blame the rank the others waited
            # for, which is usually not one of those whose call raised.
            rank, why = hung_rank(self.group.heartbeats(timeout=self.cfg.fault.heartbeat_s))
            if rank is not None and rank not in {x.rank for x in errors}:
                step = self.rank_step.get(rank, self.done_step) + 1
                for marker in self._refresh_fired().values():
                    if marker["rank"] == rank:
                        step = marker["step"]
                return Failure(kind="hang", rank=rank, step=step, time_s=self.acct.now(),
                               message=f"a collective timed out after {self.cfg.fault.pg_timeout_s:g} s "
                                       f"(fault.pg_timeout_s): rank {rank} {why}")
        # A raising call names its step; a dead rank was in the step after its last result.
        step = e.step if e.kind != "worker_died" else self.rank_step.get(e.rank, self.done_step) + 1
        kind = {"worker_died": "worker_died", "injected": "exception"}.get(e.kind, "exception")
        # An injected fault says exactly where it fired (its result may never have arrived).
        for i, marker in faults.fired(self.cfg.job_dir).items():
            if i not in self.fired:
                self.fired.add(i)
                if marker["rank"] == e.rank and marker["kind"] != "slow":  # a slow rank fails nothing
                    kind, step = marker["kind"], marker["step"]
        what = e.message
        if e.kind == "worker_died":  # name the node; Ray's guess at the cause stays in driver.log
            node_of = getattr(self.group, "node_of", None)
            what += f" on {node_of(e.rank)}" if node_of else ""
            if kind == "kill":
                what += " (fault.inject)"
            elif console.get() is not None:
                what += f" (Ray's report of the exit: {console.LOG_NAME})"
        return Failure(kind=kind, rank=e.rank, step=step, time_s=self.acct.now(),
                       message=f"rank {e.rank} at step {step}: {what}")

    # ---- RECOVERING --------------------------------------------------------------
    def _recover(self, state: RecoveringState) -> State:
        f = state.failure
        self.failures += 1
        self.cadence.failure()
        event = FailureEvent(kind=f.kind, step=f.step, rank=f.rank, detected_s=f.time_s,
                             message=f.message)
        self.acct.failure(event)
        self._fire("after_failure", event)
        self._count_node_failures(f)
        decision = self.failure_policy.decide(f, self.failures)
        if decision is FailureDecision.RAISE and f.kind == "storage":
            self.storage_failed = True
            return ErroredState(f.message)
        if decision is FailureDecision.RAISE:
            budget = self.cfg.fault.max_failures
            why = (f"{f.message} (fault.max_failures={budget} exhausted)" if f.retryable
                   else f.message)
            return ErroredState(why)
        self.attempt += 1
        if self.group is not None and self.group.world_size and self._recover_in_memory(f, event):
            return RunningState()
        if self.group is not None:
            self.group.shutdown()
            self.group = None
        return SchedulingState(attempt=self.attempt)

    def _count_node_failures(self, f: Failure) -> None:
        """Blame the nodes of lost ranks; one that failed ``fault.max_node_failures`` times goes."""
        nodes = getattr(self.group, "nodes", None) or []
        lost = set(self.dead_ranks) | ({f.rank} if f.kind in ("worker_died", "kill") and f.rank is not None
                                       else set())
        for node in {nodes[r] for r in lost if r < len(nodes)}:  # once per failure, however many ranks
            self.node_failures[node] += 1
            if (self.node_failures[node] >= self.cfg.fault.max_node_failures
                    and node not in self.excluded_nodes):
                others = self.alive_nodes() - set(self.excluded_nodes) - {node}
                if not others:
                    log.warning("node %s lost ranks %d times, but it is the only node left: keeping it",
                                node, self.node_failures[node])
                    continue
                self.excluded_nodes[node] = (f"lost ranks {self.node_failures[node]} times "
                                             "(fault.max_node_failures)")
                log.warning("node %s lost ranks %d times (fault.max_node_failures): the job no longer "
                            "uses it", node, self.node_failures[node])
        if self.group is not None and hasattr(self.group, "excluded_nodes"):
            self.group.excluded_nodes = set(self.excluded_nodes)

    def _recover_in_memory(self, f: Failure, event: FailureEvent) -> bool:
        """Keep the surviving processes, replace lost ranks, restore from in-memory copies
        or from the newest committed checkpoint, whichever gets training back soonest
        (:func:`raypod.driver.recovery_source.choose_source`; the decision goes in the event).

        Returns False (and the caller restarts every rank from the persistent checkpoint)
        when no survivor is left, the checkpoint was chosen but cannot be loaded in place,
        or the recovery itself fails.
        """
        if not self.cadence.enabled:
            return False
        group = self.group
        marks = [("start", time.perf_counter())]
        # The failed rank goes (a rank whose step raised holds its peers in a collective
        # until its process ends); the others finish or fail their calls in flight.
        culprit = {f.rank} if f.rank is not None else set()
        suspects = set(self.dead_ranks) - culprit
        if suspects and any(group.holder_of(d) in culprit | suspects for d in culprit | suspects):
            # A rank and the holder of its copy both look lost, which would leave only the
            # persistent checkpoint. A rank that merely missed the 0.5 s ping (a busy host)
            # gets one longer ping before it is given up.
            order = sorted(suspects)
            silent = {order[i] for i in group.unresponsive([group.actors[r] for r in order],
                                                           timeout=_SECOND_PING_S)}
            if suspects - silent:
                log.info("ranks %s answered a second ping: not lost", sorted(suspects - silent))
            self.dead_ranks -= suspects - silent
        culprit |= self.dead_ranks  # every rank found dead, not only the one blamed
        group.kill(culprit)
        # The ranks are still in the attempt before this recovery's (counted already).
        lost = group.drain(timeout=min(5.0, self.cfg.fault.pg_timeout_s), attempt=self.attempt - 1) | culprit
        alive = [r for r in range(group.world_size) if r not in lost]
        marks.append(("drain", time.perf_counter()))
        try:
            reports = group.memory_reports(alive) if alive else {}
        except Exception as e:  # noqa: BLE001 - a survivor that cannot answer is lost too
            log.warning("in-memory recovery: a survivor did not answer (%s)", e)
            return False
        steps: set[int] | None = None
        for r in alive:
            own = set(reports[r]["own"])
            steps = own if steps is None else steps & own
        no_memory = None
        for d in sorted(lost):
            twins = getattr(group, "twins", None)
            holder = group.holder_of(d)
            if holder is None or holder in lost:
                event.message += f"; rank {d}'s in-memory replica was lost with it"
                no_memory = f"rank {d} and the holder of its replica are both lost"
                steps = set()
                break
            # An HSDP twin's own snapshots are the lost rank's state; else the replica it holds.
            held = set(reports[holder]["own"] if twins else reports[holder]["replicas"].get(d, []))
            steps = held if steps is None else steps & held
        # Steps every rank finished whose replicas were still on their way are complete
        # too when the restore point includes them; later ones are redone.
        finished = self.done_step
        while len(self.partial.get(finished + 1, ())) == group.world_size:
            finished += 1
        usable = [s for s in steps or () if s <= finished]
        if not usable and no_memory is None:
            no_memory = "no finished step is held in memory by every rank"
        spares = group.live_spares() if alive and (usable or hasattr(group, "load_in_place")) else 0
        shrink = (self.scaling_policy.shrink_to(group.world_size, len(lost), spares)
                  if spares < len(lost) else None)
        # Loaded in place: by the survivors and the replacements (a shrink restarts every rank).
        in_place = bool(alive) and shrink is None and hasattr(group, "load_in_place")
        choice, ckpt = self._pick_source(max(usable) if usable else None, finished, in_place)
        event.extra["source_choice"] = choice.record()
        if no_memory is not None:
            log.warning("in-memory recovery: %s", no_memory)
        if choice.chosen is None or choice.chosen.kind == CHECKPOINT:
            if choice.chosen is not None and in_place:
                return self._load_in_place(event, lost, ckpt, marks)
            if choice.chosen is not None:
                log.warning("recovering from %s: every rank restarts (%s)", choice.chosen.label,
                            choice.reason)
            return False
        restore_step = choice.chosen.step
        while self.done_step < restore_step:
            self._complete_step(self.done_step + 1, resolve=False)
        marks.append(("plan", time.perf_counter()))
        before = group.world_size
        try:
            if shrink is not None:
                # Not enough warm spares: continue with fewer ranks now (state resharded in
                # memory) and bring the lost slots back as joiners, added once they are warm.
                added = [group.spares.pop(0) for _ in range(spares)]
                info = group.reshard(lost, added, restore_step, self.attempt,
                                     faults.pending(self.cfg, self.fired))
                for slot in info["freed"][: self.cfg.scaling.max_workers - group.world_size]:
                    group.add_joiner(slot)
                self.resizes.append({"kind": "shrink", "step": restore_step, "from": before,
                                     "to": group.world_size, "at_s": round(f.time_s, 3),
                                     "took_s": round(info["recover_s"], 3)})
                self._fire("after_resize", self.resizes[-1])
            else:
                info = group.recover_in_place(lost, restore_step, self.attempt,
                                              faults.pending(self.cfg, self.fired))
        except GroupStartError as e:
            log.warning("in-memory recovery failed (%s): using the persistent checkpoint", e)
            return False
        self._rebuilt(event, info, marks, restore_step, f"memory step {restore_step}")
        log.info("attempt %d: recovered in place from memory step %d in %.2f s (replaced %s, "
                 "%d bytes from peers; slowest rank %s)", self.attempt, restore_step,
                 info["recover_s"], info["replaced"], info["received_bytes"],
                 {k: round(v, 3) for k, v in info["slowest_rank_phases_s"].items()})
        return True

    def _rebuilt(self, event: FailureEvent, info: dict[str, Any], marks: list[tuple[str, float]],
                 step: int, source: str) -> None:
        """Book a group rebuilt in place at ``step`` from ``source``: phases into the event, progress reset."""
        self.dead_ranks = set()
        marks.append(("rebuild", time.perf_counter()))
        phases = {name: round(t - marks[i][1], 3) for i, (name, t) in enumerate(marks[1:])}
        phases.update({f"rebuild_{k}": round(v, 3) for k, v in info.get("driver_phases_s", {}).items()})
        phases.update({f"rank_{k}": round(v, 3) for k, v in info["slowest_rank_phases_s"].items()})
        event.extra["recovery_phases_s"] = phases
        self.acct.group_started(self.group.world_size)
        self.acct.rolled_back(event, step, self.group.world_size, source)
        self._reset_group_progress(step)

    # ---- recovery sources ----------------------------------------------------------
    def _latest_checkpoint(self) -> CommittedCheckpoint | None:
        """The newest committed checkpoint a recovery may load (the one place that asks)."""
        return self._choose_checkpoint()[0]

    def _choose_checkpoint(self) -> tuple[CommittedCheckpoint | None, str | None]:
        """The newest committed checkpoint whose files match its manifest (verified here, on the
        driver, before any rank touches a file), or None to start from scratch.

        Each newer checkpoint that fails is recorded once as a ``checkpoint_corrupt`` event
        naming the file. Returns ``(None, why)`` when checkpoints exist but none passes:
        the job does not start from scratch over them.
        """
        chosen, rejected = self._first_choice or self.store.latest_verified()
        self._first_choice = None
        source = f"checkpoint step {chosen.step}" if chosen else "scratch"
        for bad in rejected:
            if (bad.step, bad.reason) in self._corrupt_seen:
                continue
            self._corrupt_seen.add((bad.step, bad.reason))
            now = self.acct.now()
            ev = FailureEvent(kind="checkpoint_corrupt", step=bad.step, rank=None, detected_s=now,
                              message=f"{bad.reason}; using {source} instead", resumed_s=now,
                              lost_steps=0, restored_from=source,
                              extra={"alert": True, "file": bad.file, "checkpoint": bad.path})
            self.acct.failure(ev)
            log.warning("%s", ev.message)
            self._fire("after_failure", ev)
            self._fire("after_recovery", ev)
        if chosen is None and rejected:
            return None, (f"{rejected[0].reason}, and no older committed checkpoint passes "
                          f"verification: not starting from scratch over them (move {self.store.root} "
                          "aside to start afresh)")
        return chosen, None

    def _storage_failure(self, err: StorageError) -> ErroredState:
        """``checkpoint.storage`` cannot be written: the job ends now, in one sentence (no
        recovery can make room), with a ``storage`` event."""
        self.storage_failed = True
        if not any(ev.kind == "storage" for ev in self.acct.events):
            self.acct.failure(FailureEvent(kind="storage", step=self.done_step + 1, rank=None,
                                           detected_s=self.acct.now(), message=str(err)))
        return ErroredState(str(err))

    def _load_estimate(self) -> float:
        """Seconds a checkpoint load is expected to take: the last load this job measured,
        else its slowest rank's last save, else a conservative default."""
        if self.load_s is not None:
            return self.load_s
        if self.save_s:
            return max(self.save_s.values())
        return _DEFAULT_LOAD_S

    def _pick_source(self, memory_step: int | None, target: int,
                     in_place: bool) -> tuple[SourceChoice, CommittedCheckpoint | None]:
        """Where to restore from, and the checkpoint to load when that is the choice.

        The choice is made on the newest committed checkpoint as its manifest says (cheap);
        its files are verified only when it is chosen, and a checkpoint that fails gives way
        to the one verification picks instead (the choice is then made again).
        """
        ckpt = self.store.latest()
        choice = self._choose_source(memory_step, ckpt, target, in_place)
        if choice.chosen is not None and choice.chosen.kind == CHECKPOINT:
            verified = self._latest_checkpoint()
            if verified is None or ckpt is None or verified.step != ckpt.step:
                ckpt = verified
                choice = self._choose_source(memory_step, ckpt, target, in_place)
        return choice, ckpt

    def _choose_source(self, memory_step: int | None, ckpt: CommittedCheckpoint | None, target: int,
                       in_place: bool) -> SourceChoice:
        """Estimate each source's cost to get back to step ``target`` and let the policy choose."""
        step_s = statistics.median(self.step_durs) if self.step_durs else 0.0
        cands = []
        if memory_step is not None:
            cands.append(estimate(MEMORY, memory_step, target, step_s))
        if ckpt is not None:
            restart_s = 0.0 if in_place else (self.group_start_s or _DEFAULT_LOAD_S)
            cands.append(estimate(CHECKPOINT, ckpt.step, target, step_s, self._load_estimate(), restart_s))
        choice = choose_source(cands)
        log.info("recovery source: %s", choice.reason)
        return choice

    def _load_in_place(self, event: FailureEvent, lost: set[int], ckpt: CommittedCheckpoint,
                       marks: list[tuple[str, float]]) -> bool:
        """Replace ``lost`` ranks and load ``ckpt`` on every rank of the group, in place.

        Returns False (every rank then restarts from the checkpoint) when that fails.
        """
        group = self.group
        marks.append(("plan", time.perf_counter()))
        try:
            info = group.load_in_place(lost, ckpt, self.attempt, faults.pending(self.cfg, self.fired))
        except GroupStartError as e:
            log.warning("loading checkpoint step %d in place failed (%s): every rank restarts from it",
                        ckpt.step, e)
            return False
        if info["slowest_rank_phases_s"].get("restore") is not None:
            self.load_s = info["slowest_rank_phases_s"]["restore"]
        self._rebuilt(event, info, marks, ckpt.step, f"checkpoint step {ckpt.step}")
        log.info("attempt %d: recovered in place from checkpoint step %d in %.2f s (replaced %s)",
                 self.attempt, ckpt.step, info["recover_s"], info["replaced"])
        return True

    # ---- ROLLING_BACK ------------------------------------------------------------
    def _roll_back(self, state: RollingBackState) -> State:
        """A bad loss at ``state.step``: back to the last snapshot before it, skip its batch.

        Nothing is lost or replaced: the calls in flight finish (their work is thrown
        away), every rank restores its own snapshot in the group it is in, and the
        step's samples go to the ledger's ``skipped_bad``.
        """
        f = self.cfg.fault
        what = "NaN or infinite" if state.reason == "nan" else f"above {f.loss_spike_factor:g}x the running median"
        event = FailureEvent(kind=state.reason, step=state.step, rank=None, detected_s=state.time_s,
                             message=f"loss {state.loss:.4g} at step {state.step} is {what}: "
                                     f"rolled back and its batch skipped")
        for marker in self._refresh_fired().values():  # an injected nan names its rank
            if marker["kind"] == "nan" and marker["step"] == state.step:
                event.kind, event.rank = "nan", marker["rank"]
        self.acct.failure(event)
        self._fire("after_failure", event)
        self.bad_steps.add(state.step)
        self.cadence.failure()
        try:
            write_json_atomic(self._bad_steps_path, {"steps": sorted(self.bad_steps)})
        except OSError as e:
            log.warning("could not record the skipped steps: %s", e)
        if len(self.bad_steps) > f.max_bad_steps:
            return ErroredState(f"{event.message}; {len(self.bad_steps)} batches skipped "
                                f"(fault.max_bad_steps={f.max_bad_steps} exhausted)")
        group = self.group
        result = group.quiesce(timeout=f.hang_timeout_s)
        finished = result.saved + [(r["rank"], r.get("saved", [])) for r in result.steps]
        for rank, steps in finished:
            self._ack_saves(rank, [s for s in steps if s < state.step])
        if result.errors or group.in_flight:
            errors = result.errors or [WorkerError(rank=-1, step=state.step, kind="exception",
                                                   message="calls did not finish")]
            return RecoveringState(self._failure_from(errors))
        reports = group.memory_reports(list(range(group.world_size)))
        held = set.intersection(*(set(r["own"]) for r in reports.values()))
        good = [s for s in held if s < state.step]
        if not good:
            log.warning("no snapshot before step %d in memory", state.step)
        in_place = hasattr(group, "load_in_place")
        choice, ckpt = self._pick_source(max(good) if good else None, self.done_step, in_place)
        event.extra["source_choice"] = choice.record()
        if choice.chosen is None or choice.chosen.kind == CHECKPOINT:
            self.attempt += 1
            if (choice.chosen is not None and in_place
                    and self._load_in_place(event, set(), ckpt, [("start", time.perf_counter())])):
                log.warning("step %d: %s", state.step, event.message)
                return RunningState()
            group.shutdown()
            self.group = None
            return SchedulingState(attempt=self.attempt)
        to = choice.chosen.step
        for rank, steps in group.rollback(to, timeout=f.hang_timeout_s):
            self._ack_saves(rank, steps)
        for s in [s for s in self.save_acks if s > to]:
            del self.save_acks[s]
        self.acct.rolled_back(event, to, group.world_size, f"memory step {to}")
        self.next_step, self.done_step = to + 1, to
        self.cadence.restart(to, regrouped=False)  # the same group: its replicas up to ``to`` stay
        self.rank_step = dict.fromkeys(range(group.world_size), to)
        self.partial.clear()
        self.last_progress, self.last_completion = time.monotonic(), time.time()
        log.warning("step %d: %s", state.step, event.message)
        return RunningState()

    # ---- HANDING_OVER ------------------------------------------------------------
    def _hand_over(self, state: HandingOverState) -> State:
        """Ranks that must go but still work hand over: no step is lost.

        The steps in flight finish and count, every rank's replica exchange completes
        (so the peers hold the leaving ranks' latest shards), then the leaving ranks
        are replaced in place (spares first) from that step.
        """
        event = FailureEvent(kind=state.reason, step=state.step, rank=state.ranks[0],
                             detected_s=state.time_s, message=state.message)
        self._refresh_fired()
        if state.reason == "straggler":  # a replaced straggler counts against the budget
            self.failures += 1
            if self.failure_policy.decide(Failure(state.reason, state.ranks[0], state.step, state.message,
                                                  state.time_s), self.failures) is FailureDecision.RAISE:
                return ErroredState(f"{state.message} (fault.max_failures={self.cfg.fault.max_failures} "
                                    "exhausted)")
        group, lost = self.group, set(state.ranks)
        self.health_next = None
        result = group.quiesce(timeout=self.cfg.fault.hang_timeout_s)
        self._absorb(result)  # these steps count (the event is recorded after them)
        self.health_next = None  # the leaving ranks are replaced now; later checks start afresh
        self.acct.failure(event)
        self._fire("after_failure", event)
        restore_step = None
        if not result.errors and not group.in_flight:
            try:
                # Every rank snapshots the last step (if the cadence skipped it) and its
                # peer receives it: the leaving ranks' latest state stays in memory.
                reports = group.flush_replicas(timeout=self.cfg.fault.hang_timeout_s, latest=True)
                steps = set.intersection(*(set(reports[r]["own"]) for r in reports if r not in lost))
                for d in lost:
                    holder = group.holder_of(d)
                    if holder is None or holder in lost:
                        steps = set()
                        break
                    steps &= set(reports[holder]["replicas"].get(d, []))
                steps = {s for s in steps if s <= self.done_step}
                restore_step = max(steps) if steps else None
            except Exception as e:  # noqa: BLE001 - fall back to the ordinary recovery
                log.warning("hand-over: %s", e)
        if restore_step is None:
            f = Failure(kind=state.reason, rank=state.ranks[0], step=state.step, time_s=state.time_s,
                        message=state.message)
            self.attempt += 1
            if self._recover_in_memory(f, event):
                return RunningState()
            group.shutdown()
            self.group = None
            return SchedulingState(attempt=self.attempt)
        self.attempt += 1
        try:
            info = group.recover_in_place(lost, restore_step, self.attempt,
                                          faults.pending(self.cfg, self.fired))
        except GroupStartError as e:
            log.warning("hand-over failed (%s): using the persistent checkpoint", e)
            group.shutdown()
            self.group = None
            return SchedulingState(attempt=self.attempt)
        self.acct.group_started(group.world_size)
        self.acct.rolled_back(event, restore_step, group.world_size, f"memory step {restore_step}")
        self._reset_group_progress(restore_step)
        log.info("attempt %d: rank(s) %s handed over at step %d (%s) in %.2f s", self.attempt,
                 sorted(lost), restore_step, state.reason, info["recover_s"])
        return RunningState()

    # ---- a user's stop, a lost lease -----------------------------------------------
    def _stopped(self, signame: str) -> StoppedState:
        """Abandon the steps in flight, commit a save every rank already finished, record a
        ``stop`` event; never starts a save (``ray job stop`` SIGKILLs after a few seconds)."""
        in_flight = max(0, self.next_step - 1 - self.done_step)
        if self.group is not None and self.state.kind is StateKind.RUNNING:
            try:  # what finished by now still counts (steps, save acks -> commits)
                result = self.group.poll(timeout=0)
                if not result.errors:
                    self._absorb(result)
                    in_flight = max(0, self.next_step - 1 - self.done_step)
            except Exception as e:  # noqa: BLE001 - stopping anyway
                log.warning("collecting the steps in flight at the stop: %s", e)
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
        for rank, steps in self.group.finish_saves():
            self._ack_saves(rank, steps)
        # The consolidated model goes beside the checkpoints (and, for a recipe that exports its
        # own format, such as save_pretrained output, to final_model_hf/); MLflow logs it.
        hf = join_uri(self.cfg.job_dir, FINAL_MODEL_HF) if _exports(self.recipe) else None
        self.digest = self.group.state_digest(join_uri(self.cfg.job_dir, "final_model.pt"), hf)
        self.group.close()
        self.group = None
        return FinishedState()

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
        summary["memory_snapshots"] = self.cadence.figures()
        self._fire("before_summary", summary)
        summary = redact_json(summary)  # no credentials (in an error's URI, say) reach storage or MLflow
        path = join_uri(self.cfg.job_dir, "summary.json")
        try:
            write_json_atomic(path, summary)
        except OSError as e:
            # Where it still fits: a local file beside the driver's other state, named here.
            fallback = os.path.join(os.path.expanduser("~/.raypod/summary"),
                                    f"{self.cfg.name}-{int(self.start_time)}.json")
            try:
                write_json_atomic(fallback, summary)
                log.error("could not write %s (%s): the job's summary is in %s instead", path, e, fallback)
                path = fallback
            except OSError as e2:
                log.error("could not write %s (%s) nor %s (%s)", path, e, fallback, e2)
        self.summary = summary
        self._fire("after_job", summary, path)
