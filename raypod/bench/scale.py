"""The ``scale`` suite: raypod's driver at 2 .. 32 ranks on real Ray, and the simulator's calibration.

A light rank (``jobs/configs/mlp.yaml``'s MLP made tiny: :data:`RECIPE_ARGS`, gloo, one
torch thread, :data:`CPU_PER_RANK` logical CPUs, so 32 ranks and a spare fit one local
Ray) makes the driver's own work visible: per step it submits one ``train_step`` call
per rank, one ``wait_replicated`` per rank when the step snapshots, and polls with
``ray.wait``; a liveness ping per rank runs beside. For each rank count ``N`` (in the
order given, a configuration at a time, ``trials`` interleaved rounds each) three cold
subprocesses run, each with its own local Ray (``ray.init(num_cpus=...)``):

* ``raypod``: ``raypod.api.run`` of the job in that process, which is the driver; an
  ``after_step`` callback notes each step's completion time and the process's CPU time
  (``resource.getrusage``). **Step time**: the median interval between completions over
  the steady window (steps after :func:`warmup_steps`); **driver CPU per step**: the
  CPU time over that window divided by its steps.
* ``nodriver``: the same ``N`` ranks (raypod's own actor, :class:`FreeRunner`, with the
  same resources, rendezvous, peers and ``Trainer``) each stepping in a loop inside its
  actor, with no driver call per step, snapshotting at the interval the raypod run
  settled on. Step time as above, a step complete when every rank finished it. Then,
  in the same Ray, the calibration figures (:func:`calibrate`): the driver CPU of N
  no-op actor calls (actors with ``num_cpus=0``), of one ``ray.wait`` over N ready
  refs, the wall time of a ping round over the N ranks, and the ranks' RSS.
* ``kill``: the raypod run again with ``checkpoint.memory_every_steps=1`` and rank
  ``N-1`` killed at :func:`kill_step`. **Gap** ``events[0].resumed_s - last_step_s``,
  its phases ``recovery_phases_s`` (``rebuild``: the group re-formed in place, the
  calibration's regroup time).

Then per-operation least-squares lines (:class:`raypod.bench.calibration.Fit`) go to
``<out>/scale_calibration.json`` and the table to ``<out>/scale.json`` and ``.md``, with
the acceptance lines computed from the figures: raypod's step time within
:data:`STEP_RATIO_MAX` of no-driver at every ``N``, and the gap growing at most
:data:`GAP_GROWTH_MAX` from the smallest to the largest ``N``. Before each
configuration the suite checks the memory available against what the ranks measured so
far need, and stops growing ``N`` (saying so) when it would not fit; a trial during
which the available memory falls under :data:`MIN_FREE_BYTES` is ended.

    raypod bench scale --ranks 2,4,8,16,32 --steps 40 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from raypod.bench import calibration, table
from raypod.bench import trials as harness
from raypod.bench.calibration import Calibration, Fit
from raypod.bench.table import fmt
from raypod.policies.cadence import CALIBRATION_SNAPSHOTS
from raypod.worker.actor import TrainWorker

RANKS = (2, 4, 8, 16, 32)
STEPS = 40
GLOBAL_BATCH = 64
"""Samples per step at every ``N`` (divisible by each): one micro-batch of ``64 / N`` per rank."""
RECIPE_ARGS = {"n_blocks": 2, "dim": 64, "hidden": 128, "num_samples": 4096}
CPU_PER_RANK = 0.25
"""Logical CPUs per rank: 32 ranks and a spare need 8.25 of a local Ray's."""
SPARES = 1
STEP_RATIO_MAX = 1.05
GAP_GROWTH_MAX = 1.5
RANK_MEMORY_GUESS = 450 * 2**20
"""Bytes per rank process assumed before any configuration measured one (then: its USS)."""
BASE_BYTES = 1.5 * 2**30
"""Ray's own processes and the driver, beside the ranks."""
MIN_FREE_BYTES = 1 * 2**30
QUIET_TIMEOUT_S = 60.0
CALIBRATION_ROUNDS = 30
CONFIG = "jobs/configs/mlp.yaml"
KINDS = ("raypod", "nodriver", "kill")

_log = harness.logger("bench scale")


# ---- the workload ------------------------------------------------------------------------
def warmup_steps(steps: int) -> int:
    """Steps left out of the steady window: the first quarter, at least 5."""
    return max(5, steps // 4)


def kill_step(steps: int) -> int:
    """The step at whose start the kill trial's last rank dies (mid-window)."""
    return max(warmup_steps(steps) + 2, steps // 2)


def overrides(n: int, steps: int, storage: str, name: str, kind: str = "raypod") -> list[str]:
    """``--set`` overrides of :data:`CONFIG` for ``n`` light ranks (``kind`` ``kill``: a kill of
    rank ``n - 1`` and a snapshot every step)."""
    out = [f"name={name}", f"checkpoint.storage={storage}", "checkpoint.every_steps=0", "mlflow.enabled=false",
           f"scaling.min_workers={n}", f"scaling.max_workers={n}", f"scaling.spares={SPARES}",
           f"scaling.resources_per_worker={{CPU: {CPU_PER_RANK}}}", f"train.max_steps={steps}",
           f"train.global_batch={GLOBAL_BATCH}", f"train.micro_batch={GLOBAL_BATCH // n}",
           *[f"recipe.args.{k}={v}" for k, v in RECIPE_ARGS.items()]]
    if kind == "kill":
        out += ["checkpoint.memory_every_steps=1",
                f"fault.inject=[{{step: {kill_step(steps)}, rank: {n - 1}, kind: kill}}]"]
    return out


def ray_cpus(n: int) -> int:
    """Logical CPUs of a configuration's local Ray: its ranks, spares and one for Ray Data."""
    return max(2, math.ceil((n + SPARES) * CPU_PER_RANK) + 1)


def check_ranks(ranks: Sequence[int]) -> list[int]:
    """``ranks`` as a list, each at least 2 and dividing :data:`GLOBAL_BATCH`."""
    bad = [n for n in ranks if n < 2 or GLOBAL_BATCH % n]
    if bad or not ranks:
        raise ValueError(f"rank counts must be at least 2 and divide the global batch {GLOBAL_BATCH} "
                         f"(got {list(ranks)})")
    return list(ranks)


# ---- figures from step times ---------------------------------------------------------------
def steady(times: dict[int, float], steps: int) -> float:
    """Median seconds between consecutive completions over the steady window."""
    first = warmup_steps(steps)
    if steps <= first or any(k not in times for k in range(first, steps + 1)):
        raise RuntimeError(f"steps {first}..{steps} did not all complete (last {max(times, default=0)})")
    return statistics.median(times[k + 1] - times[k] for k in range(first, steps))


def cpu_per_step(cpu: dict[int, float], steps: int) -> float:
    """Driver CPU seconds per step over the steady window."""
    first = warmup_steps(steps)
    return (cpu[steps] - cpu[first]) / (steps - first)


def group_times(per_rank: Sequence[Sequence[float]]) -> dict[int, float]:
    """``step -> time`` the last rank finished it (a step is done when every rank is)."""
    return {i + 1: max(ts) for i, ts in enumerate(zip(*per_rank, strict=True))}


# ---- the trials (run in the configuration's own subprocess) --------------------------------
def _start_ray(n: int) -> None:
    """A private local Ray for ``n`` ranks, as :func:`raypod.api.connect_ray` starts one but with
    :func:`ray_cpus` logical CPUs (raypod's own rule would cap them at 2 per core)."""
    import ray

    from raypod import ray_auth

    ray_auth.for_new_cluster()
    ray.init(address="local", include_dashboard=False, num_cpus=ray_cpus(n), log_to_driver=True,
             configure_logging=True, logging_level=logging.WARNING)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_raypod(cfg: Any, steps: int) -> dict[str, Any]:
    """Run the job with this process as its driver; step times, driver CPU and the summary."""
    import raypod.api as api
    from raypod.api import JobFailed, run
    from raypod.callbacks import Callback, StepReport

    class Recorder(Callback):
        def __init__(self) -> None:
            self.times: dict[int, float] = {}
            self.cpu: dict[int, float] = {}
            self.driver: Any = None
            self.spares_warm_step: int | None = None

        def after_step(self, report: StepReport) -> None:
            if self.spares_warm_step is None and not report.replayed:
                self._hold_for_spares(report.step)
            self.times.setdefault(report.step, time.time())
            self.cpu.setdefault(report.step, _cpu_s())

        def _hold_for_spares(self, step: int) -> None:
            """Hold each early step up to 1 s until the spare is warm: the driver starts spares
            once the group has trained a step, and on 2 shared cores a spare importing torch
            and rehearsing would run inside the steady window (and be what a kill at step
            steps/2 waits for), which no rank count of a cluster pays."""
            import ray

            group = getattr(self.driver, "group", None)
            pool = getattr(group, "pool", None)
            deadline = time.monotonic() + 1.0
            while pool is not None:
                refs = list(pool.warming.values())
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0) if refs else ([], [])
                if len(pool.spares) >= SPARES and len(ready) == len(refs):
                    self.spares_warm_step = step
                    return
                if time.monotonic() >= deadline:
                    return
                time.sleep(0.05)

    rec = Recorder()

    class TrackedDriver(api.Driver):  # the recorder reads the spare pool of the job's driver
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            rec.driver = self

    plain, api.Driver = api.Driver, TrackedDriver
    try:
        summary = run(cfg, callbacks=[rec], progress=False)
    except JobFailed as e:
        return {"ok": False, "why": str(e), "summary": e.summary}
    finally:
        api.Driver = plain
    out: dict[str, Any] = {"ok": True, "summary": summary, "spares_warm_step": rec.spares_warm_step,
                           "snapshot_every": int(summary.get("memory_snapshots", {}).get("every", 1))}
    if not summary.get("failures"):  # alerts (a throughput dip) interrupt nothing
        out["step_s"] = steady(rec.times, steps)
        out["driver_cpu_per_step_s"] = cpu_per_step(rec.cpu, steps)
    out["driver_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def kill_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The kill trial's gap and phases from its summary's event of the injected kill (the first
    event if none is marked so); other failures of the run (a false silence on an overloaded
    host) are named in ``other_events``, not taken for the kill."""
    events = summary.get("events") or []
    ev = next((e for e in events if e.get("kind") == "kill"), events[0] if events else None)
    if ev is None or ev.get("resumed_s") is None or ev.get("last_step_s") is None:
        return {"ok": False, "why": f"no recovered failure in the summary (events: {events})"}
    others = [f"{e.get('kind')} at step {e.get('step')}" for e in events if e is not ev]
    return {"ok": summary.get("status") == "succeeded", "gap_s": ev["resumed_s"] - ev["last_step_s"],
            "phases_s": ev.get("recovery_phases_s", {}), "restored_from": ev.get("restored_from"),
            "lost_steps": ev.get("lost_steps"), **({"other_events": others} if others else {})}


class FreeRunner(TrainWorker):
    """raypod's rank actor, stepping in a loop of its own: the ranks without a driver in the loop."""

    def run_steps(self, last: int, snapshot_every: int) -> list[float]:
        """Steps 1..``last``; ``time.time()`` after each. Snapshots as raypod's ``auto`` cadence
        does in steady state: the first :data:`CALIBRATION_SNAPSHOTS` steps, then every
        ``snapshot_every`` (0: never)."""
        out = []
        for step in range(1, last + 1):
            snap = bool(snapshot_every) and (step <= CALIBRATION_SNAPSHOTS or step % snapshot_every == 0)
            self.train_step(step, snap)
            out.append(time.time())
        return out


class NoOp:
    """A small actor whose call does nothing: the cost of a call itself."""

    def noop(self) -> None:
        return None

    def stream(self, items: int) -> Any:
        """A window call's stream (``TrainWorker.train_window``): ``items`` step results."""
        import numpy as np

        from raypod.protocol import StepResult

        for step in range(1, items + 1):
            yield StepResult(step=step, rank=0, loss_sum=1.0, samples=2, ids=np.arange(2), epoch=0, lr=0.1,
                             grad_norm=1.0, compute_s=0.0)


STREAM_ITEMS = 20
"""Results in each stream of the calibration's ``stream_item`` figure."""


def stream_collect_s(noops: list[Any], collect: Any = None) -> float:
    """Driver CPU seconds to collect one streamed step result from each of the N :class:`NoOp`
    actors' calls (a step of step windows): each streams :data:`STREAM_ITEMS` results, all
    arrived before the clock starts; ``collect(calls)`` empties the
    :class:`~raypod.driver.inflight.InFlight` (default: as the driver does, by polling)."""
    import ray

    from raypod.driver.inflight import STEP, InFlight

    gens = [a.stream.options(num_returns="streaming").remote(STREAM_ITEMS) for a in noops]
    ray.get([g.completed() for g in gens])
    calls = InFlight()
    for r, g in enumerate(gens):
        calls.add(g, r, STEP, 1)
    t0 = time.process_time()
    if collect is not None:
        collect(calls)
    while len(calls):
        calls.poll([], 1.0)
    return (time.process_time() - t0) / STREAM_ITEMS


def _start_ranks(cfg: Any, n: int) -> tuple[list[Any], Any]:
    """``n`` :class:`FreeRunner` ranks joined in one group, as raypod's worker group forms one
    (the job's rendezvous store in this process, the peer ring, the same actor options);
    returns the ranks and the store (kept by the caller while the ranks run)."""
    import ray

    from raypod.driver.topology import link_first, peer_ring, peers
    from raypod.protocol import GroupSpec
    from raypod.recipe import build_recipe
    from raypod.worker.rendezvous import RendezvousStore

    recipe = build_recipe(cfg)
    cls = ray.remote(max_restarts=0, max_task_retries=0,
                     concurrency_groups={"ping": 1, "replica": 4, "health": 1})(FreeRunner)
    cpu = cfg.scaling.resources_per_worker.get("CPU", 1.0)
    actors = [cls.options(num_cpus=cpu).remote(int(cpu) or 1) for _ in range(n)]
    infos = ray.get([a.node_info.remote() for a in actors])
    store = RendezvousStore()
    ip, port = store.open(n, cfg.fault.pg_timeout_s)
    ring = peer_ring([i["node_id"] for i in infos])
    pairs, first = peers(ring), link_first(ring)
    specs = [GroupSpec(config=cfg, recipe=recipe, rank=r, world_size=n, init_method=f"tcp://{ip}:{port}/g0",
                       injections=[], attempt=0, peers=pairs[r], link_first=first[r]) for r in range(n)]
    ray.get([a.setup.remote(s, None) for a, s in zip(actors, specs, strict=True)])
    return actors, store


def run_nodriver(cfg: Any, n: int, steps: int, snapshot_every: int) -> dict[str, Any]:
    """``n`` ranks stepping with no driver call per step; then :func:`calibrate` on them."""
    import ray

    actors, _store = _start_ranks(cfg, n)
    per_rank = ray.get([a.run_steps.remote(steps, snapshot_every) for a in actors])
    out = {"ok": True, "step_s": steady(group_times(per_rank), steps), "snapshot_every": snapshot_every,
           **calibrate(actors)}
    ray.get([a.close.remote() for a in actors])
    return out


def _median_of(rounds: int, measure: Any) -> float:
    return statistics.median(measure() for _ in range(rounds))


def calibrate(ranks: list[Any], rounds: int = CALIBRATION_ROUNDS) -> dict[str, Any]:
    """The driver's per-operation costs at ``N = len(ranks)``, medians of ``rounds``: CPU of N no-op
    calls (actors with ``num_cpus=0``) submitted and collected, CPU of one ``ray.wait`` over N
    ready refs, wall time of a ping round over the ranks; and the ranks' RSS and USS (the memory
    a process holds alone: what one more rank adds, torch's shared libraries aside)."""
    import psutil
    import ray

    n = len(ranks)
    noops = [ray.remote(NoOp).options(num_cpus=0).remote() for _ in range(n)]
    ready = [a.noop.remote() for a in noops]
    ray.get(ready)

    def calls() -> float:
        t0 = time.process_time()
        ray.get([a.noop.remote() for a in noops])
        return time.process_time() - t0

    def wait() -> float:
        t0 = time.process_time()
        ray.wait(ready, num_returns=n, timeout=0)
        return time.process_time() - t0

    def stream() -> float:
        return stream_collect_s(noops)

    def ping() -> float:
        t0 = time.perf_counter()
        refs = [a.ping.remote() for a in ranks]
        ray.wait(refs, num_returns=n, timeout=30)
        return time.perf_counter() - t0

    pids = ray.get([a.ping.remote() for a in ranks])
    mem = [psutil.Process(p).memory_full_info() for p in pids]
    out = {"actor_call_cpu_s": _median_of(rounds, calls), "wait_cpu_s": _median_of(rounds, wait),
           "stream_item_cpu_s": _median_of(max(3, rounds // 5), stream),
           "ping_round_s": _median_of(rounds, ping), "rank_rss_bytes": statistics.median(m.rss for m in mem),
           "rank_uss_bytes": statistics.median(m.uss for m in mem)}
    for a in noops:
        ray.kill(a)
    return out


def trial_main(kind: str, n: int, steps: int, storage: str, name: str, snapshot_every: int, out: str) -> int:
    """One configuration's trial in this process (its own local Ray); figures to ``out`` as JSON."""
    from raypod.config import load_config

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    cfg = load_config(harness.REPO / CONFIG, overrides(n, steps, storage, name, kind))
    _start_ray(n)
    if kind == "nodriver":
        fig = run_nodriver(cfg, n, steps, snapshot_every)
    else:
        fig = run_raypod(cfg, steps)
        if kind == "kill" and fig.get("summary"):
            fig.update(kill_figures(fig["summary"]))
        elif kind == "raypod" and fig["ok"] and "step_s" not in fig:
            events = [e.get("kind") for e in fig["summary"].get("events", []) if not e.get("alert")]
            fig.update(ok=False, why=f"failures during the run ({events}): no steady window")
    Path(out).write_text(json.dumps(fig, indent=2, default=str))
    return 0 if fig.get("ok") else 1


# ---- the suite (the parent process) ----------------------------------------------------------
def _watch(proc: Any, tag: str, timeout_s: float) -> tuple[int | None, dict[str, Any]]:
    """Wait for the trial, sampling its processes' total RSS and the memory available every 2 s;
    end it when the available memory falls under :data:`MIN_FREE_BYTES`."""
    import psutil

    deadline, peak, low = time.monotonic() + timeout_s, 0, psutil.virtual_memory().available
    while time.monotonic() < deadline:
        rc = harness.wait_rc(proc, 2.0)
        total = 0
        for pid in harness.tagged_pids(tag):
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                continue
        peak, low = max(peak, total), min(low, psutil.virtual_memory().available)
        mem = {"peak_rss_bytes": peak, "min_available_bytes": low}
        if rc is not None:
            return rc, mem
        if low < MIN_FREE_BYTES:
            harness.kill_group(proc)
            return None, {**mem, "why": f"ended: {low / 2**30:.2f} GiB of memory left"}
    return None, {"peak_rss_bytes": peak, "min_available_bytes": low, "why": f"timed out after {timeout_s:.0f}s"}


def run_trial(kind: str, n: int, i: int, steps: int, logs: Path, snapshot_every: int = 1) -> dict[str, Any]:
    """One cold subprocess of ``kind`` at ``n`` ranks; its figures (``ok`` False with ``why``)."""
    name = f"scale-{kind}-{n}-{i}"
    trial = harness.Trial.new("rps-", logs / f"{name}.log", ("storage",))
    fig_path = trial.tmp / "figures.json"
    cmd = [sys.executable, "-m", "raypod.bench.scale", "--trial", kind, "--ranks", str(n), "--steps", str(steps),
           "--storage", str(trial.tmp / "storage"), "--name", name, "--snapshot-every", str(snapshot_every),
           "--trial-out", str(fig_path)]
    rec: dict[str, Any] = {"kind": kind, "n": n, "trial": i, "ok": False}
    with harness.launched(cmd, trial.env(), trial.log_path) as (proc, t0):
        rc, mem = _watch(proc, trial.tag, 240.0 + 12.0 * n + 3.0 * steps)
        rec["process_s"] = round(time.time() - t0, 2)
    rec.update(mem, exit_code=rc)
    try:
        fig = json.loads(fig_path.read_text())
        fig.pop("summary", None)
        rec.update(fig)
    except (OSError, ValueError) as e:
        rec.setdefault("why", f"no figures ({type(e).__name__}: {e})")
    if not rec["ok"]:
        rec["cause"] = harness.cause(trial.log_path)
        rec["log_tail"] = harness.tail(trial.log_path)
    rec["log"] = str(trial.log_path)
    return trial.finish(rec, QUIET_TIMEOUT_S, _log)


def fits_room(n: int, rank_bytes: float, available: float) -> str | None:
    """Why a configuration of ``n`` ranks (and spares) of ``rank_bytes`` each would not fit
    ``available`` bytes, or None."""
    need = (n + SPARES) * rank_bytes * 1.25 + BASE_BYTES + MIN_FREE_BYTES
    if need <= available:
        return None
    return (f"not run: {n} ranks need about {need / 2**30:.1f} GiB ({rank_bytes / 2**20:.0f} MiB per rank "
            f"process, x1.25, + Ray and the driver + {MIN_FREE_BYTES / 2**30:.0f} GiB kept free), "
            f"{available / 2**30:.1f} GiB available")


def run_configuration(n: int, trials: int, steps: int, logs: Path) -> list[dict[str, Any]]:
    """``trials`` interleaved rounds of raypod, no-driver and kill at ``n`` ranks."""
    recs = []
    for i in range(1, trials + 1):
        r = run_trial("raypod", n, i, steps, logs)
        every = int(r.get("snapshot_every") or 1)
        for rec in (r, run_trial("nodriver", n, i, steps, logs, every), run_trial("kill", n, i, steps, logs)):
            recs.append(rec)
            _log(f"N={n:>2} trial {i} {rec['kind']:>8}: {describe(rec)}")
    return recs


def describe(rec: dict[str, Any]) -> str:
    """A trial's progress line."""
    if not rec["ok"]:
        return f"FAILED ({rec.get('why')}; cause: {rec.get('cause')})"
    parts = [f"step {fmt(_ms(rec.get('step_s')), '.1f')} ms" if rec.get("step_s") else ""]
    if rec.get("driver_cpu_per_step_s") is not None:
        parts.append(f"driver CPU {rec['driver_cpu_per_step_s'] * 1e3:.2f} ms/step")
    if rec.get("gap_s") is not None:
        parts.append(f"gap {rec['gap_s']:.2f} s (rebuild {fmt(rec['phases_s'].get('rebuild'))} s)")
    if rec.get("ping_round_s") is not None:
        parts.append(f"ping round {rec['ping_round_s'] * 1e3:.1f} ms")
    parts.append(f"peak RSS {rec.get('peak_rss_bytes', 0) / 2**30:.1f} GiB, ran {rec['process_s']:.0f}s")
    return ", ".join(p for p in parts if p)


def _ms(s: float | None) -> float | None:
    return None if s is None else s * 1e3


def _us(s: float | None) -> float | None:
    return None if s is None else s * 1e6


def _mib(b: float | None) -> str:
    return fmt(None if b is None else b / 2**20, ".0f")


# ---- summary, calibration, acceptance ------------------------------------------------------
def _med(recs: list[dict[str, Any]], kind: str, key: str, digits: int = 6) -> float | None:
    return table.median((r[key] for r in recs if r["kind"] == kind and r["ok"] and r.get(key) is not None),
                        digits)


def figures_at(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """One rank count's medians over its trials (good trials only)."""
    rebuilds = [r["phases_s"]["rebuild"] for r in recs
                if r["kind"] == "kill" and r["ok"] and r.get("phases_s", {}).get("rebuild") is not None]
    phases: dict[str, list[float]] = {}
    for r in recs:
        if r["kind"] == "kill" and r["ok"]:
            for k, v in r.get("phases_s", {}).items():
                phases.setdefault(k, []).append(v)
    out = {"raypod_step_s": _med(recs, "raypod", "step_s"), "nodriver_step_s": _med(recs, "nodriver", "step_s"),
           "driver_cpu_per_step_s": _med(recs, "raypod", "driver_cpu_per_step_s"),
           "gap_s": _med(recs, "kill", "gap_s", 3), "regroup_s": table.median(rebuilds, 3),
           "regroup_cpu_s": table.median((r["phases_s"]["rebuild_rank_cpu_max"] for r in recs if r["kind"] == "kill"
                                          and r["ok"] and r.get("phases_s", {}).get("rebuild_rank_cpu_max")
                                          is not None), 3),
           "phases_s": {k: table.median(v, 3) for k, v in phases.items()},
           "actor_call_cpu_s": _med(recs, "nodriver", "actor_call_cpu_s"),
           "wait_cpu_s": _med(recs, "nodriver", "wait_cpu_s"), "ping_round_s": _med(recs, "nodriver", "ping_round_s"),
           "stream_item_cpu_s": _med(recs, "nodriver", "stream_item_cpu_s"),
           "rank_rss_bytes": _med(recs, "nodriver", "rank_rss_bytes", 0),
           "rank_uss_bytes": _med(recs, "nodriver", "rank_uss_bytes", 0),
           "peak_rss_bytes": max((r.get("peak_rss_bytes", 0) for r in recs), default=0),
           "good": {k: f"{sum(1 for r in recs if r['kind'] == k and r['ok'])}/"
                       f"{sum(1 for r in recs if r['kind'] == k)}" for k in KINDS}}
    out["step_ratio"] = table.ratio(out["raypod_step_s"], out["nodriver_step_s"])
    return out


FITTED = {"actor_call": "actor_call_cpu_s", "wait": "wait_cpu_s", "ping": "ping_round_s",
          "regroup": "regroup_s", "step_s": "nodriver_step_s", "regroup_cpu": "regroup_cpu_s",
          "stream_item": "stream_item_cpu_s"}
""":class:`Calibration` field -> the per-``N`` figure it is fitted to."""
OPTIONAL = frozenset({"regroup_cpu", "stream_item"})
"""Fits a calibration may go without (measured by newer code only; the simulator then falls back)."""


def fit_calibration(by_n: dict[int, dict[str, Any]], machine: dict[str, Any], date: str,
                    command: str) -> Calibration:
    """Least-squares lines through each figure's points over ``N``.

    Raises:
        ValueError: a figure was measured at no ``N`` (every trial of its kind failed).
    """
    fits = {}
    for name, key in FITTED.items():
        points = [(n, f[key]) for n, f in sorted(by_n.items()) if f.get(key) is not None]
        if not points and name in OPTIONAL:
            continue
        if not points:
            raise ValueError(f"no {key} measured at any rank count: no calibration of '{name}'")
        fits[name] = Fit.least_squares(points)
    return Calibration(**fits, machine=machine, date=date, command=command)


def acceptance(by_n: dict[int, dict[str, Any]], requested: Sequence[int]) -> list[dict[str, Any]]:
    """The two acceptance lines from the figures: step ratio at every ``N``, gap growth end to end.

    ``met`` is None when a figure is missing; a line names the rank counts it covers.
    """
    ratios = {n: f.get("step_ratio") for n, f in sorted(by_n.items())}
    worst = max((r for r in ratios.values() if r is not None), default=None)
    step = {"what": f"raypod step time <= {STEP_RATIO_MAX:g}x no-driver at every N", "ratios": ratios,
            "worst": worst, "met": None if not ratios or None in ratios.values() else worst <= STEP_RATIO_MAX}
    gaps = {n: f["gap_s"] for n, f in sorted(by_n.items()) if f.get("gap_s") is not None}
    lo, hi = (min(gaps), max(gaps)) if gaps else (None, None)
    growth = table.ratio(gaps[hi], gaps[lo]) if gaps and hi != lo else None
    gap = {"what": f"kill-recovery gap growth <= {GAP_GROWTH_MAX:g}x from N={lo} to N={hi}", "from_n": lo,
           "to_n": hi, "growth": growth, "met": None if growth is None else growth <= GAP_GROWTH_MAX,
           "covers_requested": (lo, hi) == (min(requested), max(requested))}
    return [step, gap]


def acceptance_lines(checks: list[dict[str, Any]]) -> list[str]:
    """One sentence per acceptance check, with its figure and verdict."""
    verdict = {True: "met", False: "NOT MET", None: "not measured"}
    step, gap = checks
    ratios = ", ".join(f"N={n} {fmt(r, '.3f')}" for n, r in step["ratios"].items())
    lines = [f"{step['what']}: {ratios}: {verdict[step['met']]}"]
    short = "" if gap["covers_requested"] else " (the requested range was not fully measured)"
    lines.append(f"{gap['what']}: {fmt(gap['growth'], '.2f')}x: {verdict[gap['met']]}{short}")
    return lines


# ---- the table --------------------------------------------------------------------------------
HEADER = ["N", "raypod step (ms)", "no-driver step (ms)", "ratio", "driver CPU/step (ms)", "kill gap (s)",
          "regroup (s)", "regroup CPU/rank (s)", "N no-op calls CPU (µs)", "ray.wait N CPU (µs)", "ping round (ms)", "rank RSS/USS (MiB)",
          "peak RSS (GiB)", "good trials r/n/k"]


def rows(by_n: dict[Any, dict[str, Any]]) -> list[list[str]]:
    """One row per rank count measured."""
    out = []
    for n, f in sorted(by_n.items(), key=lambda kv: int(kv[0])):
        out.append([str(n), fmt(_ms(f["raypod_step_s"]), ".1f"), fmt(_ms(f["nodriver_step_s"]), ".1f"),
                    fmt(f["step_ratio"], ".3f"), fmt(_ms(f["driver_cpu_per_step_s"]), ".2f"),
                    fmt(f["gap_s"], ".2f"), fmt(f["regroup_s"], ".2f"),
                    fmt(f.get("regroup_cpu_s"), ".3f"), fmt(_us(f["actor_call_cpu_s"]), ".0f"),
                    fmt(_us(f["wait_cpu_s"]), ".0f"), fmt(_ms(f["ping_round_s"]), ".2f"),
                    f"{_mib(f['rank_rss_bytes'])}/{_mib(f.get('rank_uss_bytes'))}",
                    fmt(f["peak_rss_bytes"] / 2**30, ".1f"),
                    "/".join(f["good"][k].split("/")[0] for k in KINDS) + f" of {f['good']['raypod'].split('/')[1]}"])
    return out


def fit_rows(cal: dict[str, Any] | None) -> list[list[str]]:
    """One row per fitted operation: base, per-rank cost and the points."""
    if not cal:
        return []
    return [[name, f"{cal[name]['base_s'] * 1e3:.3f}", f"{cal[name]['per_rank_s'] * 1e6:.1f}",
             ", ".join(f"{int(x)}: {y * 1e3:.3f}" for x, y in cal[name]["points"])] for name in FITTED
            if cal.get(name)]


FIT_HEADER = ["operation", "base (ms)", "per rank (µs)", "points N: ms"]
DEFINITIONS = {
    "raypod step": "median interval between the driver's step completions (an after_step callback) over "
                   "the steady window (the first max(5, steps/4) steps left out)",
    "no-driver step": "the same ranks (raypod's actor and Trainer, same resources, peers and snapshot "
                      "interval) each stepping in a loop inside its actor; a step completes when every rank "
                      "finished it",
    "driver CPU/step": "the raypod driver process's CPU time (getrusage, every thread) over the steady window "
                       "divided by its steps",
    "kill gap": "kill trial (memory snapshot every step, rank N-1 killed at the start of step steps/2): "
                "events[0].resumed_s - last_step_s; regroup is its recovery_phases_s.rebuild",
    "regroup CPU/rank": "the most CPU one rank's process spent in its rejoin of that recovery (leave, "
                        "rendezvous, build, restore; recovery_phases_s.rebuild_rank_cpu_max): the rebuild "
                        "where every rank has cores of its own, as on a cluster",
    "calibration": "medians of 30 rounds in the no-driver trial's Ray: CPU of N no-op calls to N num_cpus=0 "
                   "actors submitted and collected, CPU of one ray.wait over N ready refs, wall of a ping "
                   "round over the N idle ranks; CPU of collecting one streamed step result from each of N "
                   "calls (a step of step windows, medians of 6 rounds of 20 results each)",
}


def print_result(result: dict[str, Any]) -> None:
    table.print_table(f"scale: {result['workload_short']}", HEADER, rows(result["by_n"]), lambda k: k > 0)
    if result["calibration"]:
        table.print_table("calibration fits: seconds(N) = base + per_rank x N", FIT_HEADER,
                          fit_rows(result["calibration"]), lambda k: k in (1, 2))
    for line in acceptance_lines(result["acceptance"]):
        print(line)
    for s in result["skipped"]:
        print(s)


def markdown(result: dict[str, Any]) -> str:
    """``scale.md``: the table, the fits, the acceptance lines, definitions and what was left out."""
    m = result["machine"]
    failed = [f"N={r['n']} {r['kind']} trial {r['trial']}: {r.get('why')}"
              + (f"; cause: `{r['cause']}`" if r.get("cause") else "")
              for recs in result["trials"].values() for r in recs if not r["ok"]]
    return "\n".join([
        "# scale: raypod's driver at growing rank counts, and the simulator's calibration", "",
        f"{table.machine_line(result['date'], m)}; load average {m['loadavg_before'][0]} before, "
        f"{m['loadavg_after'][0]} after.",
        f"Command: `{result['command']}`. Per N, {result['trials_per_n']} round(s) of raypod, no-driver and "
        "kill, each a cold subprocess with its own local Ray.", "",
        f"Workload: {result['workload']}.", "",
        table.markdown_table(HEADER, rows(result["by_n"])), "",
        *[x for line in acceptance_lines(result["acceptance"]) for x in (f"**{line}**", "")],
        "Calibration (`scale_calibration.json`):" if result["calibration"] else
        f"Calibration not written: {result['calibration_error']}", "",
        *([table.markdown_table(FIT_HEADER, fit_rows(result["calibration"])), ""] if result["calibration"] else []),
        *[f"- **{k}**: {v}." for k, v in DEFINITIONS.items()], "",
        *table.problems_md("Rank counts left out:", result["skipped"]),
        *table.problems_md("Trials that failed:", failed),
    ])


# ---- the entry points -----------------------------------------------------------------------
def _workload(steps: int) -> str:
    return (f"{CONFIG} with recipe.args {RECIPE_ARGS} (FSDP2 per block, gloo, one torch thread per rank), "
            f"{CPU_PER_RANK:g} logical CPU per rank, {SPARES} spare, global batch {GLOBAL_BATCH} (one "
            f"micro-batch of {GLOBAL_BATCH}/N per rank), {steps} steps (steady window after step "
            f"{warmup_steps(steps)}), no persistent checkpoint before the end, MLflow off, memory snapshots "
            "at the auto cadence (kill trial: every step)")


def run_scale_bench(ranks: Sequence[int] | str = RANKS, steps: int = STEPS, trials: int = 1,
                    out: str | os.PathLike | None = "benchmarks/results") -> dict[str, Any]:
    """Run the suite over ``ranks`` (in order; stops growing when memory would not hold the next),
    write ``<out>/scale.json``, ``scale.md`` and ``scale_calibration.json``; returns the results."""
    import psutil

    ranks = check_ranks([int(x) for x in ranks.split(",")] if isinstance(ranks, str) else ranks)
    if steps < warmup_steps(steps) + 5 or trials < 1:
        raise ValueError(f"steps must leave at least 5 steady steps after {warmup_steps(steps)} (got {steps}), "
                         "trials at least 1")
    harness.warm_page_cache("torch, ray, raypod.api, raypod.worker.trainer")
    session = harness.Session.open("scale", lambda logs: f"ranks {ranks}, {steps} steps, {trials} round(s) per "
                                   f"N; subprocess logs in {logs}", _log, QUIET_TIMEOUT_S)
    trials_by_n: dict[int, list[dict[str, Any]]] = {}
    by_n: dict[int, dict[str, Any]] = {}
    skipped: list[str] = []
    rank_mem = float(RANK_MEMORY_GUESS)
    for k, n in enumerate(ranks):
        why = fits_room(n, rank_mem, psutil.virtual_memory().available)
        if why is not None:
            skipped = [f"N={m}: {why if m == n else 'not run (a smaller N did not fit)'}" for m in ranks[k:]]
            _log(f"stopping before N={n}: {why}")
            break
        trials_by_n[n] = run_configuration(n, trials, steps, session.logs)
        by_n[n] = figures_at(trials_by_n[n])
        rank_mem = max(rank_mem, by_n[n]["rank_uss_bytes"] or by_n[n]["rank_rss_bytes"] or 0)
    command = f"raypod bench scale --ranks {','.join(map(str, ranks))} --steps {steps} --trials {trials}"
    return _finish(session, ranks, steps, trials, trials_by_n, by_n, skipped, command, out)


def _finish(session: harness.Session, ranks: list[int], steps: int, trials: int,
            trials_by_n: dict[int, list[dict[str, Any]]], by_n: dict[int, dict[str, Any]], skipped: list[str],
            command: str, out: str | os.PathLike | None) -> dict[str, Any]:
    """Fit the calibration, print and write the results."""
    machine = session.machine()
    cal, cal_error = None, None
    try:
        cal = fit_calibration(by_n, machine, session.date, command)
    except ValueError as e:
        cal_error = str(e)
    result: dict[str, Any] = {
        "suite": "scale", "date": session.date, "machine": machine, "command": command,
        "workload": _workload(steps), "workload_short": f"light MLP ranks, {steps} steps, batch {GLOBAL_BATCH}",
        "ranks_requested": ranks, "steps": steps, "trials_per_n": trials, "definitions": DEFINITIONS,
        "by_n": {str(n): f for n, f in by_n.items()}, "acceptance": acceptance(by_n, ranks),
        "calibration": cal.to_json() if cal else None, "calibration_error": cal_error, "skipped": skipped,
        "trials": {str(n): recs for n, recs in trials_by_n.items()},
    }
    print_result(result)
    if out is not None:
        table.write_results(result, out, "scale", markdown(result), _log, default=str)
        if cal is not None:
            _log(f"wrote {calibration.save(cal, out)}")
    return result


def run(trials: int = 1, out: str | os.PathLike | None = "benchmarks/results", ranks: Sequence[int] | str = RANKS,
        steps: int = STEPS) -> dict[str, Any]:
    """Entry point for ``raypod bench scale`` (``trials``: rounds per rank count)."""
    return run_scale_bench(ranks, steps, trials, out)


def main(argv: list[str] | None = None) -> int:
    p = harness.suite_parser("raypod's driver at 2..32 ranks on real Ray, and the simulator's calibration", 1)
    p.add_argument("--ranks", default=",".join(map(str, RANKS)), help="comma-separated rank counts")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--trial", choices=KINDS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--storage", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--snapshot-every", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--trial-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.trial is not None:
        return trial_main(args.trial, int(args.ranks), args.steps, args.storage, args.name, args.snapshot_every,
                          args.trial_out)
    try:
        run_scale_bench(args.ranks, args.steps, args.trials, args.out)
    except ValueError as e:
        p.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
