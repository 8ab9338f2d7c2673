"""Chaos runs: one long job with seeded random faults of every kind raypod injects, and a report.

    raypod chaos jobs/configs/mlp.yaml --faults 50 --seed 0

The faults are drawn from the config model itself (``FaultInjection.kind``'s
``Literal``), so a kind added there is exercised here without a change. A seeded
generator places ``--faults`` of them on distinct steps at least ``--spacing`` apart
(so each recovery has finished before the next fault), on a random rank, of a random
kind; ``fault.max_failures`` is raised to fit them. The job runs with MLflow on
(its default store under the job's storage). Then the same config runs without
faults, at the same fixed world size, as the reference. The report says:

* faults planned, fired (the ranks' ``faults/fired_*.json`` markers), failures the
  driver saw, and recovered (every failure event has a ``resumed_s`` and the job
  succeeded at its last step), by kind and by restore source (memory or storage);
* ``final_state_sha256`` of the chaos run against the fault-free run (equal means
  bit-identical model and optimizer state: nothing lost, nothing applied twice);
* samples consumed, duplicated and skipped (``summary.json``'s ledger, from the ids
  the ranks reported);
* MLflow points missing or duplicated: for every step metric of the run, the steps
  ``1..max_steps`` without a point and the points beyond one per step.

The world size must be fixed (``scaling.min_workers == scaling.max_workers``) so that
the digests can be compared.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import random
import statistics
import tempfile
import time
import typing
from collections import Counter
from dataclasses import dataclass
from typing import Any

from raypod.bench.table import loadavg, write_results
from raypod.config import ConfigError, FaultInjection, JobConfig, load_config


def fault_kinds() -> list[str]:
    """Every fault kind the config accepts (``FaultInjection.kind``'s ``Literal``)."""
    return list(typing.get_args(FaultInjection.model_fields["kind"].annotation))


def plan_faults(n: int, max_steps: int, world_size: int, seed: int, spacing: int = 4,
                first_step: int = 3, kinds: list[str] | None = None) -> list[dict[str, Any]]:
    """``n`` faults on distinct steps ``spacing`` apart or more, random rank and kind, seeded.

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
    return [{"step": s, "rank": rng.randrange(world_size), "kind": k} for s, k in zip(steps, chosen, strict=True)]


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


def plan_jobs(base: JobConfig, faults: int, seed: int, spacing: int, steps: int | None, storage: str | None,
              name: str) -> ChaosJobs:
    """Place the faults and derive both jobs' configs (the world size must be fixed)."""
    s = base.scaling
    if s.min_workers != s.max_workers:
        raise ConfigError(f"a chaos run needs a fixed world size (scaling.min_workers {s.min_workers} "
                          f"!= scaling.max_workers {s.max_workers})")
    max_steps = steps or max(base.train.max_steps, steps_needed(faults, spacing))
    plan = plan_faults(faults, max_steps, s.max_workers, seed, spacing)
    storage = storage or tempfile.mkdtemp(prefix="raypod-chaos-")
    common = {"checkpoint.storage": storage, "train.max_steps": max_steps}
    # A ``nan`` fault makes the job skip that step's batch on purpose: the reference skips the
    # same batches (the same nan faults, nothing else), so the two states must still match.
    skipped = [f for f in plan if f["kind"] == "nan"]
    common["fault.max_bad_steps"] = max(base.fault.max_bad_steps, len(skipped))
    chaos_cfg = _job(base, name, {**common, "fault.inject": plan,
                                  "fault.max_failures": max(base.fault.max_failures, faults + 5),
                                  "mlflow.enabled": True})
    ref_cfg = _job(base, f"{name}-reference", {**common, "fault.inject": skipped, "mlflow.enabled": False})
    return ChaosJobs(plan, max_steps, s.max_workers, storage, skipped, chaos_cfg, ref_cfg)


def _go(cfg: JobConfig, mlflow: bool, progress: bool) -> dict[str, Any]:
    """Run one job to its end; its summary (also when it failed)."""
    from raypod.api import JobFailed, run
    from raypod.progress import ProgressPrinter
    from raypod.tracking import MLflowCallback

    cbs: list[Any] = [ProgressPrinter(live=False)] if progress else []
    if mlflow:
        cbs.append(MLflowCallback())
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
        "restored_from": dict(Counter((e.get("restored_from") or "none").split(" step")[0]
                                      for e in events)),
        "lost_steps_total": sum(int(e.get("lost_steps") or 0) for e in events),
    }


def _nothing_lost(report: dict[str, Any]) -> bool:
    samples, points = report["samples"], report["mlflow"]
    return bool(
        report["all_recovered"] and report["state_matches_reference"] is not False
        and samples.get("duplicated") == 0 and samples.get("skipped") == 0
        and points is not None and points.get("missing") == 0 and points.get("duplicated") == 0)


def run_chaos(config: str | os.PathLike, faults: int = 50, seed: int = 0, spacing: int = 4,
              steps: int | None = None, overrides: list[str] | None = None, storage: str | None = None,
              out: str | os.PathLike | None = "benchmarks/results", name: str = "chaos",
              progress: bool = False, baseline: bool = True) -> dict[str, Any]:
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
    """
    jobs = plan_jobs(load_config(config, overrides), faults, seed, spacing, steps, storage, name)
    started = _dt.datetime.now(_dt.timezone.utc)
    load_before = os.getloadavg()
    t0 = time.monotonic()
    chaos = _go(jobs.chaos, True, progress)
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
        "kinds": fault_kinds(),
        **fault_books(jobs, chaos),
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
        f"--spacing {r['spacing']} --steps {r['max_steps']}{(' ' + over) if over else ''}` (world size "
        f"{r['world_size']}, fault kinds {', '.join(r['kinds'])}).",
        "",
        "| | |",
        "|---|---|",
        f"| faults injected (planned / fired) | {r['faults_planned']} / {r['faults_fired']} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(r['faults_planned_by_kind'].items()))}) |",
        f"| failures seen / recovered | {r['failures_seen']} / {r['recovered']} "
        f"({'all' if r['all_recovered'] else 'NOT all'}) |",
        f"| alerts (nothing interrupted) | {', '.join(f'{k} {v}' for k, v in sorted(r['alerts'].items())) or 'none'} |",
        f"| detection to training resumed (s) | {_spread_md(r.get('recovery_s'))} |",
        "| training paused, last step before to first after (s) | "
        + "; ".join(f"{k}: {_spread_md(v)}" for k, v in (r.get("pause_s_by_kind") or {}).items()) + " |",
        f"| restored from | {', '.join(f'{k} {v}' for k, v in sorted(r['restored_from'].items()))} |",
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
        f"| **nothing lost** | **{'yes' if r['nothing_lost'] else 'NO'}** |",
        "",
    ]
    if r.get("error"):
        lines += [f"Error: {r['error']}", ""]
    return "\n".join(lines)
