"""Chaos runs: one long job with seeded random faults of every kind raypod injects, and a report.

    raypod chaos jobs/configs/mlp.yaml --faults 50 --seed 0

The faults are drawn from the config model itself (``FaultInjection.kind``'s
``Literal``, and for each kind the ``FaultInjection.at`` places its validator accepts), so
a kind or place added there is exercised here without a change. A seeded generator
places ``--faults`` of them on distinct steps at least ``--spacing`` apart (so each
recovery has finished before the next fault), on a random rank, of a random kind, at a
random place in the step (before it, mid-forward, mid-backward, before the optimizer
update, in the replica round); ``fault.max_failures`` is raised to fit them. The job runs
with MLflow on (its default store under the job's storage). Then the same config runs
without faults, at the same fixed world size, as the reference.

Both jobs run on a local Ray cluster of ``--nodes`` raylets (default 2; the ranks spread
over them, each rank's replica holder on another node), so a ``freeze_node`` stops one
node's ranks while the other node holds their in-memory replicas.

The report says:

* faults planned (by kind and by place), fired (the ranks' ``faults/fired_*.json``
  markers), failures the driver saw, and recovered (every failure event has a
  ``resumed_s`` and the job succeeded at its last step), by restore source: all from
  memory is required unless the plan holds a fault that leaves no copy in memory
  (:func:`memory_impossible`);
* ``final_state_sha256`` of the chaos run against the fault-free run (equal means
  bit-identical model and optimizer state: nothing lost, nothing applied twice);
* samples consumed, duplicated and skipped (``summary.json``'s ledger, from the ids
  the ranks reported);
* MLflow points missing or duplicated: for every step metric of the run, the steps
  ``1..max_steps`` without a point and the points beyond one per step;
* survivor processes lost: processes that held a rank, were not lost in a failure and did
  not live on through its recovery (:class:`SurvivorWatch`).

The world size must be fixed (``scaling.min_workers == scaling.max_workers``) so that
the digests can be compared.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import platform
import random
import statistics
import tempfile
import time
import typing
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from raypod.bench.table import loadavg, write_results
from raypod.callbacks import Callback, FailureEvent, JobInfo
from raypod.config import ConfigError, FaultInjection, JobConfig, ScalingConfig, load_config


def fault_kinds() -> list[str]:
    """Every fault kind the config accepts (``FaultInjection.kind``'s ``Literal``)."""
    return list(typing.get_args(FaultInjection.model_fields["kind"].annotation))


GROUP_FORMING = frozenset({"join"})
"""``FaultInjection.at`` places that fire only when a group forms (the job's start, a recovery)
with the fault's step next, not in a step of training: a plan cannot tell which steps a
group will form at, so a fault placed there might never fire. Not drawn."""


def fault_positions(kind: str) -> list[str]:
    """Where in a step a ``kind`` fault may fire: each ``FaultInjection.at`` its validator
    accepts, but those of :data:`GROUP_FORMING`."""
    out = []
    for at in typing.get_args(FaultInjection.model_fields["at"].annotation):
        if at in GROUP_FORMING:
            continue
        try:
            FaultInjection(step=1, rank=0, kind=kind, at=at)
        except ValidationError:
            continue
        out.append(at)
    return out


def plan_faults(n: int, max_steps: int, world_size: int, seed: int, spacing: int = 4,
                first_step: int = 3, kinds: list[str] | None = None) -> list[dict[str, Any]]:
    """``n`` faults on distinct steps ``spacing`` apart or more, random rank, kind and place in
    the step (``at``, among those the kind allows: :func:`fault_positions`), seeded.

    Raises:
        ValueError: ``max_steps`` is too short to hold ``n`` faults that far apart.
    """
    kinds = kinds or fault_kinds()
    last = max_steps - 1  # a fault on the last step would leave no step to show the recovery
    slots = last - first_step + 1 - (n - 1) * (spacing - 1)
    if n < 1 or slots < n:
        raise ValueError(f"{n} faults {spacing} steps apart do not fit in steps {first_step}..{last}")
    rng = random.Random(seed)
    # Choose n of the `slots` compressed positions, then spread them out by the spacing.
    picks = sorted(rng.sample(range(slots), n))
    steps = [first_step + p + i * (spacing - 1) for i, p in enumerate(picks)]
    # Every kind at least once when there are enough faults, then random kinds.
    chosen = (kinds * (n // len(kinds) + 1))[:min(n, len(kinds))] + \
        [rng.choice(kinds) for _ in range(n - min(n, len(kinds)))]
    rng.shuffle(chosen)
    where = {k: fault_positions(k) for k in kinds}
    plan = []
    for s, k in zip(steps, chosen, strict=True):
        rank = rng.randrange(world_size)
        plan.append({"step": s, "rank": rank, "kind": k, "at": rng.choice(where[k])})
    return plan


def rank_nodes(world_size: int, nodes: int) -> list[int]:
    """The node (index) of each rank as a ``SPREAD`` start places them: as even a share per node
    as fits, ranks contiguous per node (``WorkerGroup.start`` sorts them so)."""
    nodes = max(1, min(nodes, world_size))
    return sorted(r % nodes for r in range(world_size))


def memory_impossible(plan: list[dict[str, Any]], world_size: int, nodes: int) -> list[dict[str, Any]]:
    """The planned faults that leave no in-memory copy of some lost rank's state, so that its
    recovery must come from storage: a lost rank whose replica holder (the driver's
    :func:`~raypod.driver.topology.peer_ring` over the start layout) is lost with it (a
    ``freeze_node`` on a node that holds both, or a job of one rank). ``nan`` and ``slow``
    lose no rank."""
    from raypod.driver.topology import peer_ring

    layout = rank_nodes(world_size, nodes)
    holder = peer_ring([str(n) for n in layout])
    out = []
    for f in plan:
        if f["kind"] in ("nan", "slow"):
            continue
        lost = {r for r in range(world_size) if layout[r] == layout[f["rank"]]} \
            if f["kind"] == "freeze_node" else {f["rank"]}
        if any(holder[r] is None or holder[r] in lost for r in lost):
            out.append(f)
    return out


def steps_needed(n: int, spacing: int, first_step: int = 3, tail: int = 5) -> int:
    """The fewest ``max_steps`` that hold ``n`` faults ``spacing`` apart, plus a few steps after."""
    return first_step + (n - 1) * spacing + tail


def mlflow_points(tracking_uri: str, run_id: str, max_steps: int,
                  skipped: set[int] | frozenset[int] = frozenset()) -> dict[str, Any]:
    """Per step metric of the run (``system/*`` aside): steps without a point and extra points.

    ``skipped`` steps (a bad batch skipped on purpose) are not expected to have points.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    keys = sorted(k for k in run.data.metrics if not k.startswith("system/"))
    per: dict[str, Any] = {}
    want = set(range(1, max_steps + 1)) - set(skipped)
    for k in keys:
        hist = client.get_metric_history(run_id, k)
        steps = Counter(m.step for m in hist)
        per[k] = {"points": len(hist), "missing": len(want - set(steps)),
                  "duplicated": sum(c - 1 for c in steps.values() if c > 1),
                  "outside": len(set(steps) - want)}
    return {"metrics": per,
            "missing": sum(v["missing"] for v in per.values()),
            "duplicated": sum(v["duplicated"] for v in per.values()),
            "step_metrics": len(keys)}


# ---- survivors: no process that held a rank dies in another rank's failure -------------


def rank_holders(notes: dict[str, dict[int, dict[str, Any]]]) -> dict[int, dict[str, Any]]:
    """The processes holding a rank now, from the ranks' pid notes (``node -> rank -> note``,
    :func:`raypod.worker.injector.node_pids`): per rank its newest note with its ``node``, kept
    only when it is of the newest attempt (a note of an earlier attempt is a process that no
    longer holds that rank)."""
    latest: dict[int, dict[str, Any]] = {}
    for node, by_rank in notes.items():
        for rank, note in by_rank.items():
            if rank not in latest or note["attempt"] > latest[rank]["attempt"]:
                latest[rank] = {**note, "node": node}
    newest = max((n["attempt"] for n in latest.values()), default=None)
    return {r: n for r, n in latest.items() if n["attempt"] == newest}


def lost_in(kind: str, rank: int | None, holders: dict[int, dict[str, Any]]) -> set[int]:
    """The ranks whose processes a failure takes: the fault's target rank (the driver ends
    it, whatever the kind), and for a ``freeze_node`` every rank on its node."""
    if rank is None:
        return set()
    lost = {rank}
    if kind == "freeze_node" and rank in holders:
        lost |= {r for r, n in holders.items() if n["node"] == holders[rank]["node"]}
    return lost


def survivors_lost(before: dict[int, dict[str, Any]], lost: set[int], after: dict[int, dict[str, Any]],
                   alive: Callable[[int, str | None], bool]) -> list[dict[str, Any]]:
    """The processes that held a rank ``before`` a failure and were not ``lost`` in it, but
    ``after`` its recovery are gone or hold no rank (``alive(pid, started)`` says whether
    the process noted is still there)."""
    holding = {(n["pid"], n.get("started")) for n in after.values()}
    out = []
    for rank, note in sorted(before.items()):
        if rank in lost:
            continue
        key = (note["pid"], note.get("started"))
        why = "process gone" if not alive(*key) else "holds no rank" if key not in holding else None
        if why:
            out.append({"rank": rank, "pid": note["pid"], "node": note.get("node"), "why": why})
    return out


def process_alive(pid: int, started: str | None) -> bool:
    """Process ``pid`` runs (a zombie does not) and is the one noted: the same start time in
    ``/proc/<pid>/stat`` (without ``/proc``: the pid exists)."""
    if not os.path.isdir("/proc"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] not in ("Z", "X") and (started is None or fields[19] == started)


class SurvivorWatch(Callback):
    """Checks that every process that held a rank and was not lost in a failure lives on.

    At each failure (``after_failure``) it notes which processes hold a rank (the pid notes
    ranks write when the job plans faults); after that failure's recovery (``after_recovery``,
    the first step after it done) each of them that the failure did not take
    (:func:`lost_in`, with the ranks lost in failures still being recovered) must be alive and
    hold a rank (:func:`survivors_lost`). Alerts (nothing interrupted) are skipped. A failure
    that never saw a recovery (counted at ``after_job``), or with no pid notes on this host to
    read (ranks on another machine), is a check missing: no survivor is vouched for unseen.
    """

    def __init__(self, alive: Callable[[int, str | None], bool] = process_alive) -> None:
        self.alive = alive
        self.job_dir: str | None = None
        self.pending: list[tuple[FailureEvent, dict[int, dict[str, Any]], set[int]]] = []
        self.lost: list[dict[str, Any]] = []
        self.checked = 0
        self.unchecked = 0
        self.unseen = 0

    def before_job(self, job: JobInfo) -> None:
        self.job_dir = job.job_dir

    def holders(self) -> dict[int, dict[str, Any]]:
        """The processes holding a rank now, from every node's pid notes on this host."""
        from raypod.worker.injector import node_pids, pid_dir

        assert self.job_dir is not None
        root = os.path.dirname(pid_dir(self.job_dir, "node"))
        nodes = os.listdir(root) if os.path.isdir(root) else []
        return rank_holders({n: node_pids(self.job_dir, n) for n in nodes})

    def after_failure(self, event: FailureEvent) -> None:
        if event.extra.get("alert") or self.job_dir is None:
            return
        before = self.holders()
        if not before:
            self.unseen += 1
            return
        self.pending.append((event, before, lost_in(event.kind, event.rank, before)))

    def after_recovery(self, event: FailureEvent) -> None:
        mine = [p for p in self.pending if p[0] is event]
        if not mine:
            return
        lost = set().union(*(p[2] for p in self.pending))  # overlapping failures excuse each other's ranks
        after = self.holders()
        for _, before, _ in mine:
            self.lost += [{**x, "failure": f"{event.kind} at step {event.step}"}
                          for x in survivors_lost(before, lost, after, self.alive)]
            self.checked += 1
        self.pending = [p for p in self.pending if p[0] is not event]

    def after_job(self, summary: dict[str, Any], summary_path: str) -> None:
        self.unchecked = len(self.pending)

    def books(self) -> dict[str, Any]:
        """What the report says about the survivors."""
        return {"survivor_checks": self.checked, "survivor_checks_missing": self.unchecked + self.unseen,
                "survivor_processes_lost": len(self.lost), "survivors_lost": self.lost}


def _job(cfg: JobConfig, name: str, overrides: dict[str, Any]) -> JobConfig:
    raw = cfg.model_dump(mode="json")
    raw["name"] = name
    for path, value in overrides.items():
        node = raw
        *head, last = path.split(".")
        for k in head:
            node = node[k]
        node[last] = value
    return JobConfig.model_validate(raw)


@dataclass(frozen=True)
class ChaosJobs:
    """The chaos job and its fault-free reference, planned from the base config."""

    plan: list[dict[str, Any]]
    max_steps: int
    world_size: int
    storage: str
    skipped: list[dict[str, Any]]
    """The ``nan`` faults: batches both jobs skip on purpose."""
    chaos: JobConfig
    reference: JobConfig
    nodes: int = 1
    """Worker raylets of the local cluster both jobs run on (1: the Ray ``raypod run`` uses)."""
    no_memory: list[dict[str, Any]] = field(default_factory=list)
    """The planned faults whose recovery cannot come from memory (:func:`memory_impossible`)."""


def plan_jobs(base: JobConfig, faults: int, seed: int, spacing: int, steps: int | None, storage: str | None,
              name: str, nodes: int = 1) -> ChaosJobs:
    """Place the faults and derive both jobs' configs (the world size must be fixed).

    On ``nodes`` > 1 the ranks are spread over the nodes (``SPREAD``), so that each rank's
    replica holder is on another node and a ``freeze_node`` leaves a copy of every state.
    """
    s = base.scaling
    if s.min_workers != s.max_workers:
        raise ConfigError(f"a chaos run needs a fixed world size (scaling.min_workers {s.min_workers} "
                          f"!= scaling.max_workers {s.max_workers})")
    if nodes < 1:
        raise ConfigError(f"a chaos run needs one node or more (--nodes {nodes})")
    max_steps = steps or max(base.train.max_steps, steps_needed(faults, spacing))
    plan = plan_faults(faults, max_steps, s.max_workers, seed, spacing)
    storage = storage or tempfile.mkdtemp(prefix="raypod-chaos-")
    common: dict[str, Any] = {"checkpoint.storage": storage, "train.max_steps": max_steps}
    if nodes > 1:
        # A spare on every node, spread like the ranks: a lost rank is replaced on its own node,
        # so no rank ever shares a node with the holder of its copy (see SparePool.take).
        common["scaling.placement_strategy"] = "SPREAD"
        common["scaling.spares"] = max(s.spares, nodes)
    # A ``nan`` fault makes the job skip that step's batch on purpose: the reference skips the
    # same batches (the same nan faults, nothing else), so the two states must still match.
    skipped = [f for f in plan if f["kind"] == "nan"]
    common["fault.max_bad_steps"] = max(base.fault.max_bad_steps, len(skipped))
    chaos = {**common, "fault.inject": plan, "fault.max_failures": max(base.fault.max_failures, faults + 5),
             # Injected faults say nothing about a node's health: a node is not given up for them.
             "fault.max_node_failures": max(base.fault.max_node_failures, faults + 5),
             "mlflow.enabled": True}
    if any(f["at"] == "replica" for f in plan):
        chaos["checkpoint.memory_every_steps"] = 1  # a replica round on every step, so every such fault fires
    chaos_cfg = _job(base, name, chaos)
    ref_cfg = _job(base, f"{name}-reference", {**common, "fault.inject": skipped, "mlflow.enabled": False})
    return ChaosJobs(plan, max_steps, s.max_workers, storage, skipped, chaos_cfg, ref_cfg, nodes,
                     memory_impossible(plan, s.max_workers, nodes))


def node_resources(scaling: ScalingConfig, nodes: int) -> dict[str, float]:
    """What each worker raylet offers: room for its share of the ranks and of the spares (at
    least one spare), in rank bundles."""
    from raypod.policies.scaling import worker_bundle

    per_node = math.ceil(scaling.max_workers / nodes) + max(1, math.ceil(scaling.spares / nodes))
    return {k: v * per_node for k, v in worker_bundle(scaling).items()}


@contextlib.contextmanager
def _cluster(jobs: ChaosJobs) -> Iterator[None]:
    """A local cluster of ``jobs.nodes`` raylets for both jobs (shut down at the end, also
    on an error); nothing for one node (the jobs connect as ``raypod run`` does)."""
    if jobs.nodes <= 1:
        yield
        return
    from raypod.bench.node_loss import local_cluster

    with local_cluster(jobs.nodes, node_resources(jobs.chaos.scaling, jobs.nodes)):
        yield


def _go(cfg: JobConfig, mlflow: bool, progress: bool, watch: Callback | None = None) -> dict[str, Any]:
    """Run one job to its end; its summary (also when it failed)."""
    from raypod.api import JobFailed, run
    from raypod.progress import ProgressPrinter
    from raypod.tracking import MLflowCallback

    cbs: list[Any] = [ProgressPrinter(live=False)] if progress else []
    if mlflow:
        cbs.append(MLflowCallback())
    if watch is not None:
        cbs.append(watch)
    try:
        return run(cfg, callbacks=cbs, progress=False)
    except JobFailed as e:
        return e.summary


def _mlflow_books(jobs: ChaosJobs, chaos: dict[str, Any]) -> dict[str, Any] | None:
    """MLflow points missing or duplicated in the chaos run (None: it has no run)."""
    from raypod.tracking.mlflow import resolve_tracking_uri

    if not chaos.get("mlflow_run_id"):
        return None
    try:
        return mlflow_points(resolve_tracking_uri(jobs.chaos, jobs.chaos.job_dir), chaos["mlflow_run_id"],
                             jobs.max_steps, {f["step"] for f in jobs.skipped})
    except Exception as e:  # noqa: BLE001 - the report says what could not be read
        return {"error": f"{type(e).__name__}: {e}"}


def fault_books(jobs: ChaosJobs, chaos: dict[str, Any]) -> dict[str, Any]:
    """Faults planned, fired, seen and recovered; recovery and pause times; restore sources."""
    from raypod import faults as fault_markers

    fired = fault_markers.fired(jobs.chaos.job_dir)
    everything = chaos.get("events") or []
    alerts = [e for e in everything if e.get("alert")]  # reported, nothing interrupted (a slow rank)
    events = [e for e in everything if not e.get("alert")]
    ok = chaos.get("status") == "succeeded" and chaos.get("final_step") == jobs.max_steps
    recovered = [e for e in events if e.get("resumed_s") is not None]
    return {
        "faults_planned": len(jobs.plan),
        "faults_planned_by_kind": dict(Counter(f["kind"] for f in jobs.plan)),
        "faults_planned_by_at": dict(Counter(f["at"] for f in jobs.plan)),
        "faults_planned_by_kind_at": dict(Counter(f"{f['kind']}@{f['at']}" for f in jobs.plan)),
        "faults_fired": len(fired),
        "failures_seen": len(events),
        "recovered": len(recovered),
        "alerts": dict(Counter(e["kind"] for e in alerts)),
        "recovery_s": _spread([e["resumed_s"] - e["detected_s"] for e in recovered]),
        # Training paused: from the last step completed before the fault to the first after it.
        "pause_s_by_kind": {k: _spread([e["resumed_s"] - e["last_step_s"] for e in recovered
                                        if e["kind"] == k and e.get("last_step_s") is not None])
                            for k in sorted({e["kind"] for e in recovered})},
        "all_recovered": ok and len(recovered) == len(events) and len(fired) == len(jobs.plan),
        "restored_from": dict(Counter(_source(e) for e in events)),
        "all_from_memory": all(_source(e) == "memory" or _checkpoint_chosen(e) for e in events),
        "checkpoint_chosen_over_memory": sum(1 for e in events if _checkpoint_chosen(e)),
        "memory_required": not jobs.no_memory,
        "memory_impossible": jobs.no_memory,
        "lost_steps_total": sum(int(e.get("lost_steps") or 0) for e in events),
    }


def _source(event: dict[str, Any]) -> str:
    """Where a failure event's recovery restored from: ``memory``, ``checkpoint``, ``scratch``, ``none``."""
    return (event.get("restored_from") or "none").split(" step")[0]


def _checkpoint_chosen(event: dict[str, Any]) -> bool:
    """The driver restored a committed checkpoint although an in-memory snapshot was there,
    because the checkpoint was newer and so got training back sooner (its recorded
    ``source_choice``: e.g. a bad loss right after a save, the last snapshot steps older).
    Nothing failed over to storage: the choice is the policy's, so it counts as in memory's
    stead for the verdict. The event holds the estimates rounded to the millisecond, so two
    that differed by less read equal; the policy gives a true tie to memory, so a checkpoint
    chosen at equal recorded estimates was still the sooner."""
    choice = event.get("source_choice") or {}
    return (_source(event) == "checkpoint" and choice.get("chosen") == "checkpoint"
            and choice.get("memory_step") is not None
            and choice.get("est_checkpoint_s", 0.0) <= choice.get("est_memory_s", 0.0))


def _nothing_lost(report: dict[str, Any]) -> bool:
    """The verdict: all recovered (from memory, unless the plan made that impossible), the
    state equal to the reference, no sample or MLflow point lost or doubled, no survivor gone."""
    samples, points = report["samples"], report["mlflow"]
    return bool(
        report["all_recovered"] and report["state_matches_reference"] is not False
        and (report["all_from_memory"] or not report["memory_required"])
        and report["survivor_processes_lost"] == 0 and report["survivor_checks_missing"] == 0
        and samples.get("duplicated") == 0 and samples.get("skipped") == 0
        and points is not None and points.get("missing") == 0 and points.get("duplicated") == 0)


def run_chaos(config: str | os.PathLike, faults: int = 50, seed: int = 0, spacing: int = 4,
              steps: int | None = None, overrides: list[str] | None = None, storage: str | None = None,
              out: str | os.PathLike | None = "benchmarks/results", name: str = "chaos",
              progress: bool = False, baseline: bool = True, nodes: int = 2) -> dict[str, Any]:
    """Run the chaos job and its fault-free reference; print, write and return the report.

    Args:
        config: the job config (its world size must be fixed).
        faults: how many faults to inject.
        seed: seeds the fault plan.
        spacing: fewest steps between two faults.
        steps: ``train.max_steps`` (default: the config's, raised to fit the faults).
        overrides: ``key.path=value`` overrides, as ``raypod run --set``.
        storage: ``checkpoint.storage`` for both jobs (default: a new temporary folder).
        out: folder for ``chaos.json`` / ``chaos.md`` (None: write nothing).
        name: the chaos job's name (the reference is ``<name>-reference``).
        progress: print the jobs' progress lines.
        baseline: run the fault-free reference (needed for the digest comparison).
        nodes: worker raylets of a local Ray cluster started for both jobs (a ``freeze_node``
            then stops one node's ranks only); 1: no cluster, the Ray ``raypod run`` connects to.
    """
    jobs = plan_jobs(load_config(config, overrides), faults, seed, spacing, steps, storage, name, nodes)
    started = _dt.datetime.now(_dt.timezone.utc)
    load_before = os.getloadavg()
    watch = SurvivorWatch()
    with _cluster(jobs):
        t0 = time.monotonic()
        chaos = _go(jobs.chaos, True, progress, watch)
        chaos_s = time.monotonic() - t0
        ref = _go(jobs.reference, False, progress) if baseline else None
    digest, ref_digest = chaos.get("final_state_sha256"), (ref or {}).get("final_state_sha256")
    report: dict[str, Any] = {
        "suite": "chaos",
        "date": started.isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "nproc": os.cpu_count(),
                    "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": loadavg()},
        "config": str(config),
        "overrides": list(overrides or []),
        "seed": seed,
        "spacing": spacing,
        "max_steps": jobs.max_steps,
        "world_size": jobs.world_size,
        "nodes": jobs.nodes,
        "kinds": fault_kinds(),
        **fault_books(jobs, chaos),
        **watch.books(),
        "status": chaos.get("status"),
        "final_step": chaos.get("final_step"),
        "error": chaos.get("error"),
        "final_state_sha256": digest,
        "reference_sha256": ref_digest,
        "state_matches_reference": None if ref is None else (digest is not None and digest == ref_digest),
        "samples": chaos.get("samples") or {},
        "mlflow": _mlflow_books(jobs, chaos),
        "goodput": chaos.get("goodput"),
        "wall_s": chaos.get("wall_s"),
        "reference_wall_s": (ref or {}).get("wall_s"),
        "chaos_run_s": round(chaos_s, 1),
        "storage": jobs.storage,
        "plan": jobs.plan,
    }
    report["nothing_lost"] = _nothing_lost(report)
    print(markdown(report))
    write_results(report, out, "chaos", markdown(report))
    return report


def _spread(xs: list[float]) -> dict[str, float] | None:
    """Median and max of some seconds, rounded (None for none)."""
    return {"median": round(statistics.median(xs), 2), "max": round(max(xs), 2), "n": len(xs)} if xs else None


def _counts(c: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"


def _memory_verdict(r: dict[str, Any]) -> str:
    if r["all_from_memory"]:
        chosen = r.get("checkpoint_chosen_over_memory") or 0
        return "all from memory" + (f" ({chosen} from a newer checkpoint, chosen over an older snapshot "
                                     "as the sooner way back)" if chosen else "")
    if r["memory_required"]:
        return "NOT all from memory (the plan allowed memory for every failure)"
    return f"not all from memory ({len(r['memory_impossible'])} planned fault(s) leave no copy in memory)"


def _survivors_md(r: dict[str, Any]) -> str:
    """``survivor processes lost: N`` and what was checked."""
    gone = "; ".join(f"rank {x['rank']} pid {x['pid']} ({x['why']}, {x['failure']})" for x in r["survivors_lost"])
    return (f"survivor processes lost: {r['survivor_processes_lost']} (checked after {r['survivor_checks']} "
            f"recoveries, {r['survivor_checks_missing']} check(s) missing){': ' + gone if gone else ''}")


def _spread_md(v: dict[str, float] | None) -> str:
    return f"median {v['median']}, max {v['max']}" if v else "none"


def markdown(r: dict[str, Any]) -> str:
    """The report as a Markdown section."""
    pts = r.get("mlflow") or {}
    m = r["machine"]
    over = " ".join(f"--set '{o}'" for o in r["overrides"])
    lines = [
        "# chaos: seeded random faults, then the books",
        "",
        f"Date: {r['date']}. Machine: {m['platform']}, {m['nproc']} CPUs; load average (1 min) "
        f"{m['loadavg_before'][0]} before, {m['loadavg_after'][0]} after.",
        f"Command: `raypod chaos {r['config']} --faults {r['faults_planned']} --seed {r['seed']} "
        f"--spacing {r['spacing']} --steps {r['max_steps']} --nodes {r['nodes']}{(' ' + over) if over else ''}` "
        f"(world size {r['world_size']} on {r['nodes']} node(s), fault kinds {', '.join(r['kinds'])}).",
        "",
        "| | |",
        "|---|---|",
        f"| faults injected (planned / fired) | {r['faults_planned']} / {r['faults_fired']} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(r['faults_planned_by_kind'].items()))}) |",
        f"| where in the step (at) | {_counts(r['faults_planned_by_at'])} |",
        f"| kind at | {_counts(r['faults_planned_by_kind_at'])} |",
        f"| failures seen / recovered | {r['failures_seen']} / {r['recovered']} "
        f"({'all' if r['all_recovered'] else 'NOT all'}) |",
        f"| alerts (nothing interrupted) | {', '.join(f'{k} {v}' for k, v in sorted(r['alerts'].items())) or 'none'} |",
        f"| detection to training resumed (s) | {_spread_md(r.get('recovery_s'))} |",
        "| training paused, last step before to first after (s) | "
        + "; ".join(f"{k}: {_spread_md(v)}" for k, v in (r.get("pause_s_by_kind") or {}).items()) + " |",
        f"| restored from | {_counts(r['restored_from'])}: {_memory_verdict(r)} |",
        f"| steps redone in all | {r['lost_steps_total']} |",
        f"| job | {r['status']}, final step {r['final_step']} of {r['max_steps']}, wall {r['wall_s']} s "
        f"(fault-free reference {r['reference_wall_s']} s), goodput {r['goodput']} |",
        f"| final_state_sha256 | `{(r['final_state_sha256'] or '')[:16]}…` vs reference "
        f"`{(r['reference_sha256'] or '')[:16]}…`: "
        f"{'equal' if r['state_matches_reference'] else 'DIFFERENT' if r['state_matches_reference'] is False else 'no reference'} |",
        f"| samples consumed / duplicated / skipped | {r['samples'].get('consumed')} / "
        f"{r['samples'].get('duplicated')} / {r['samples'].get('skipped')} |",
        "| MLflow points missing / duplicated | "
        + (f"{pts.get('missing')} / {pts.get('duplicated')} over {pts.get('step_metrics')} step metrics x "
           f"{r['max_steps']} steps |" if "missing" in pts else f"not read ({pts.get('error')}) |"),
        f"| survivors (ranks not lost in a failure) | {_survivors_md(r)} |",
        f"| **nothing lost** | **{'yes' if r['nothing_lost'] else 'NO'}** |",
        "",
    ]
    if r.get("error"):
        lines += [f"Error: {r['error']}", ""]
    return "\n".join(lines)
