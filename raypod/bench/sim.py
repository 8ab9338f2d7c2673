"""``raypod bench sim``: the real driver against a simulated group of 1,000 to 100,000 ranks.

The :class:`~raypod.driver.controller.Driver` runs unchanged (its state machine, ledger,
completion, diagnosis, recovery plan and policies); only its group
(:class:`~raypod.bench.simgroup.SimGroup`) and its clock
(:class:`~raypod.bench.simgroup.VirtualClock`) are simulated, and Ray is never initialised.
Every cost the group charges comes from the calibration that ``raypod bench scale`` measured
(``<calibration>/scale_calibration.json``); the driver's own Python work is its real CPU time.

Per rank count the suite reports, over the steady steps before a rank is killed: the driver's
CPU per step (real Python plus modelled Ray calls) and the cores that makes at the step rate,
the latency the driver adds to a step, the driver's memory (tracemalloc peak, and what it keeps
per step); for the kill: the detection latency, the real CPU of the recovery decision
(``plan_recovery``) and the modelled recovery gap in phases (drain, plan, rebuild).
"""

from __future__ import annotations

import contextlib
import cProfile
import dataclasses
import math
import pstats
import random
import statistics
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

from raypod.bench import calibration
from raypod.bench.calibration import Calibration, Fit
from raypod.bench.goodput_model import llama3_step_s
from raypod.bench.simgroup import (
    FaultPlan,
    SimGroup,
    VirtualClock,
    driver_clock,
    liveness_round,
)
from raypod.bench.table import markdown_table, print_table, write_results
from raypod.callbacks import Callback, FailureEvent, StepReport
from raypod.config import JobConfig
from raypod.driver import recovery as recovery_mod
from raypod.driver.controller import Driver
from raypod.recipe import Recipe

RANKS = (1_000, 10_000, 100_000)
SOURCES = {
    "calibration": "raypod bench scale (scale_calibration.json): actor_call, wait, ping, regroup; the rebuild "
                   "is regroup_cpu (the most CPU one rank spent rejoining: each rank has cores of its own on "
                   "a cluster) where the calibration has it, else regroup (the wall time of N ranks sharing "
                   "the measuring machine's 2 cores). Not in it: network round trips of gloo's full-mesh "
                   "connections (loopback here)",
    "step_time": "a rank's step: Llama 3 405B's at 16K H100s, 6 x 405e9 params x 16M tokens / (16,384 GPUs "
                 "x 400 TFLOP/s) = 5.93 s (Llama Team, arXiv:2407.21783), the same at every N (weak "
                 "scaling); --step-s sets another. The light ranks' measured step (2..32 ranks sharing 2 "
                 "cores) does not extrapolate",
    "nccl_shrink": "NCCL 2.27 ncclCommShrink: 1.4-2.0 s to shrink a communicator at 32-1,024 GPUs "
                   "(NVIDIA, 'NCCL 2.27' blog, 2025)",
    "gloo_start": "gloo process group start-up: 85 s at 8k ranks (PyTorch distributed scaling reports)",
    "meta_mttf": "Meta, 'Revisiting Reliability in Large-Scale ML Research Clusters' (2024): MTTF 1.8 h at "
                 "16,384 GPUs, ~14 min projected at 131,072",
    "ray_envelope": "Ray's scalability envelope: 20,000+ actors in one cluster (ray-project/ray "
                    "release/benchmarks/README.md)",
}
"""What the model rests on, named in every result."""
GOALS = {"cores": 1.0, "memory_gib": 1.0, "detect_p99_s": 1.0, "decision_s": 0.1, "gap_s": 5.0}
"""The acceptance at 10,000 ranks."""


class _SimRecipe(Recipe):
    """No model: the simulated ranks train nothing."""


@dataclass
class _Record(Callback):
    """The driver's own hooks, noted without charging the driver: step completions (virtual
    time, driver CPU, modelled CPU, traced memory) and the failure event."""

    clock: VirtualClock
    group: list[SimGroup]
    steps: list[tuple[int, float, float, float, int]] = field(default_factory=list)
    events: list[FailureEvent] = field(default_factory=list)
    states: list[tuple[str, str]] = field(default_factory=list)

    def after_step(self, report: StepReport) -> None:
        with self.clock.outside():
            mem = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0
            modelled = sum(self.group[0].costs.cpu.values()) if self.group else 0.0
            self.steps.append((report.step, self.clock.t, self.clock.driver_cpu_s, modelled, mem))

    def after_failure(self, event: FailureEvent) -> None:
        self.events.append(event)

    def after_state_change(self, previous: str, new: str, time_s: float) -> None:
        self.states.append((previous, new))


def job_config(ranks: int, steps: int, storage: str, stragglers: bool = True) -> JobConfig:
    """The simulated job: ``ranks`` ranks, one warm spare, a snapshot each step replicated to
    a peer, no persistent checkpoint (nothing is written), one sample per rank; straggler
    tracking as configured by default, or off (``stragglers=False``)."""
    return JobConfig.model_validate({
        "fault": {} if stragglers else {"straggler_factor": 0.0},
        "name": f"sim{ranks}", "recipe": {"target": "raypod.recipe:Recipe"},
        "checkpoint": {"storage": storage, "every_steps": 0, "memory_every_steps": 1},
        "train": {"max_steps": steps, "global_batch": ranks, "micro_batch": 1},
        "scaling": {"min_workers": ranks, "max_workers": ranks, "spares": 1},
        "mlflow": {"enabled": False}})


def build(cal: Calibration, ranks: int, steps: int, storage: str, plan: FaultPlan,
          clock: VirtualClock, stragglers: bool = True) -> tuple[Driver, _Record]:
    """A production :class:`Driver` whose group is a :class:`SimGroup` (built inside
    :func:`driver_clock`, so its start time is virtual)."""
    holder: list[SimGroup] = []
    rec = _Record(clock, holder)
    d = Driver(job_config(ranks, steps, storage, stragglers), callbacks=[rec], recipe=_SimRecipe())

    def make_group(config: JobConfig, recipe: Recipe) -> SimGroup:
        holder[:] = [SimGroup(config, recipe, cal, clock, plan)]
        return holder[0]

    d.worker_group_cls = make_group
    d.available_resources = lambda: {"CPU": float(ranks + 1)}
    d.alive_nodes = lambda: set(holder[0].nodes) if holder else set()
    d.draining_nodes = set  # Ray drains no node in the simulation
    return d, rec


@contextlib.contextmanager
def _timed_method(obj: Any, name: str, out: list[float]) -> Iterator[None]:
    """Note the real CPU seconds of each call of ``obj.name`` (the object's own method runs)."""
    real = getattr(obj, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.process_time()
        try:
            return real(*args, **kwargs)
        finally:
            out.append(time.process_time() - t0)

    with mock.patch.object(obj, name, timed):
        yield


def simulate(cal: Calibration, ranks: int, steps: int = 12, kill_step: int | None = None,
             kind: str = "kill", trace_memory: bool = False, profile: cProfile.Profile | None = None,
             stragglers: bool = True, max_iterations: int = 100_000) -> dict[str, Any]:
    """Run the real driver over ``ranks`` simulated ranks for ``steps`` steps, rank 1 killed
    (or frozen: ``kind``) half-way through ``kill_step`` (default: two thirds in); returns
    the raw record (see :func:`figures`)."""
    kill_step = kill_step if kill_step is not None else max(2, (2 * steps) // 3)
    clock, plan, decisions = VirtualClock(), FaultPlan(kind=kind, rank=1, step=kill_step), []
    iterations: list[tuple[str, float, float]] = []
    straggler_cpu: list[float] = []
    with contextlib.ExitStack() as stack:
        storage = stack.enter_context(tempfile.TemporaryDirectory())
        stack.enter_context(driver_clock(clock))
        stack.enter_context(_timed_method(recovery_mod, "plan_recovery", decisions))
        if trace_memory:
            tracemalloc.start()
        t_built = clock.monotonic()
        d, rec = build(cal, ranks, steps, storage, plan, clock, stragglers)
        stack.enter_context(_timed_method(d.policies.stragglers, "update", straggler_cpu))
        wall0 = time.perf_counter()
        try:
            for _ in range(max_iterations):
                kind_now, t0, c0 = d.state.kind, clock.monotonic(), clock.driver_cpu_s
                if profile is not None:
                    profile.enable()
                prev, nxt = d.step()
                if profile is not None:
                    profile.disable()
                iterations.append((kind_now.value, clock.monotonic() - t0, clock.driver_cpu_s - c0))
                if nxt.is_terminal:
                    break
            peak = tracemalloc.get_traced_memory()[1] if trace_memory else 0
        finally:
            if trace_memory:
                tracemalloc.stop()
        return {"ranks": ranks, "state": d.state.name, "steps": rec.steps, "events": rec.events,
                "states": rec.states, "iterations": iterations, "decisions": decisions, "plan": plan,
                "t_built": t_built, "costs": d_costs(rec), "peak_bytes": peak, "straggler_cpu": straggler_cpu,
                "stragglers": stragglers, "silent_s": d.cfg.fault.silent_s,
                "node_agents": d.cfg.fault.node_agents, "agent_zones_from": d.cfg.fault.agent_zones_from,
                "real_s": time.perf_counter() - wall0, "step_s": cal.step_s.at(ranks)}


def d_costs(rec: _Record) -> dict[str, dict[str, float]]:
    """The modelled costs the group charged, by term."""
    if not rec.group:
        return {"cpu": {}, "wall": {}}
    costs = rec.group[0].costs
    return {"cpu": dict(costs.cpu), "wall": dict(costs.wall)}


# ---- figures ----------------------------------------------------------------------------
def _steady(raw: dict[str, Any]) -> list[tuple[float, float, float, int]]:
    """Per steady step (after the first, before the fault): virtual seconds, driver CPU,
    modelled driver CPU and traced bytes gained since the step before."""
    fault = raw["plan"].step
    marks = [s for s in raw["steps"] if s[0] < fault]
    marks = marks[:next((i for i in range(1, len(marks)) if marks[i][0] <= marks[i - 1][0]), len(marks))]
    return [(b[1] - a[1], b[2] - a[2], b[3] - a[3], b[4] - a[4]) for a, b in zip(marks[1:], marks[2:], strict=False)]


def _detection(raw: dict[str, Any], cal: Calibration, samples: int = 20_000, seed: int = 0) -> dict[str, float]:
    """Detection latency p50/p99 by Monte Carlo over when the fault strikes.

    A kill: Ray's notice of the dead process (a one-rank round trip), then the rest of the
    driver's loop iteration in progress (sampled from the real RUNNING iterations, by length).
    A freeze: the first ping the frozen rank misses is sent up to ``every`` =
    ``min(0.25, silent_s / 4)`` after it froze (by its node's agent; without agents by the
    driver, whose rounds of N come every ``max(every, ping(N))``); its silence reaches
    ``fault.silent_s`` that long after the ping was sent. With agents the driver sees it in an
    agent's reply to a request sent after that ping (requests every ``max(every, round)``, the
    reply ``round`` = ``ping(nodes) + ping(ranks per node)`` later, its age counted from the
    request), then at the end of the loop iteration in progress.
    """
    rng = random.Random(seed)
    loops = [dt for kind, dt, _ in raw["iterations"] if kind == "running" and dt > 0] or [0.0]
    total = sum(loops)
    silent, every = raw["silent_s"], min(0.25, raw["silent_s"] / 4)
    agents = raw.get("node_agents", True)
    _, round_s, zoned = liveness_round(cal, raw["ranks"], agents, raw.get("agent_zones_from", 64))
    period = max(every, round_s)

    def rest_of_loop() -> float:
        return rng.uniform(0, rng.choices(loops, weights=loops)[0]) if total > 0 else 0.0

    def freeze_latency() -> float:
        missed = rng.uniform(0, every if agents else period)  # the first unanswered ping, after the freeze
        seen = missed + silent
        if agents:
            request = missed + rng.uniform(0, period)  # the driver's first request after that ping
            if zoned:  # its zone's leader asks the member's agent first, once every interval
                request = missed + rng.uniform(0, every) + rng.uniform(0, period)
            seen = max(seen, request + round_s)
        return seen + rest_of_loop()

    kill = sorted(cal.ping.at(1) + rest_of_loop() for _ in range(samples))
    freeze = sorted(freeze_latency() for _ in range(samples))
    pick = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"kill_p50_s": pick(kill, 0.5), "kill_p99_s": pick(kill, 0.99),
            "freeze_p50_s": pick(freeze, 0.5), "freeze_p99_s": pick(freeze, 0.99)}


def figures(raw: dict[str, Any], cal: Calibration, memory: dict[str, Any] | None = None) -> dict[str, Any]:
    """The suite's figures of one simulation (``memory``: the tracemalloc pass of the same N)."""
    steady = _steady(raw)
    med = lambda k: statistics.median(s[k] for s in steady) if steady else None  # noqa: E731
    period, cpu, modelled = med(0), med(1), med(2)
    ev = raw["events"][0] if raw["events"] else None
    phases = dict(ev.extra.get("recovery_phases_s", {})) if ev else {}
    gap = (ev.resumed_s - ev.detected_s) if ev and ev.resumed_s is not None else None
    n_steps = max(1, len(raw["steps"]))
    straggler = statistics.median(raw["straggler_cpu"]) if raw["straggler_cpu"] else 0.0
    out = {
        "ranks": raw["ranks"], "state": raw["state"], "stragglers_tracked": raw["stragglers"],
        "step_s_model": raw["step_s"], "step_period_s": period,
        "driver_cpu_per_step_s": cpu, "straggler_cpu_per_step_s": straggler,
        "modelled_ray_cpu_per_step_s": modelled,
        "driver_cores": (cpu + modelled) / period if period else None,
        "added_latency_s": period - raw["step_s"] if period is not None else None,
        # None when the planned kill never fired (the job failed first: see "state" and "events").
        "detected_kill_s": (ev.detected_s + raw["t_built"] - raw["plan"].at_s
                            if ev and raw["plan"].at_s is not None else None),
        **_detection(raw, cal),
        "decision_cpu_s": max(raw["decisions"], default=None),
        "recovering_driver_cpu_s": sum(c for kind, _, c in raw["iterations"] if kind == "recovering"),
        "gap_s": gap, "gap_phases_s": {**phases, "first_step": gap - sum(phases.get(k, 0.0) for k in
                                                                         ("drain", "plan", "rebuild"))}
        if gap is not None else {},
        # Until every rank trains again: the gap less the first step after it, which redoes the
        # step the fault cut short (lost work, as the goodput model counts it, not waiting).
        "gap_to_training_s": gap - raw["step_s"] if gap is not None else None,
        # The rebuild as this machine's cores measured it (N ranks sharing 2 cores), for comparison.
        "rebuild_shared_cores_s": cal.regroup.at(raw["ranks"]),
        "rebuild_model": "regroup_cpu" if cal.regroup_cpu is not None else "regroup",
        "modelled_cpu_s": raw["costs"]["cpu"], "modelled_wall_s": raw["costs"]["wall"],
        "real_s": raw["real_s"], "transitions": raw["states"],
        "per_step_terms_s": {"driver Python: StragglerTracker.update": straggler,
                             "driver Python: the rest": (cpu or 0.0) - straggler,
                             **{f"Ray: {k}": v / n_steps for k, v in raw["costs"]["cpu"].items()
                                if k in ("submit_step", "open_window", "stream_results", "submit_replica_wait",
                                         "poll_wait", "probe_wait", "probe_send")}},
    }
    if memory is not None:
        grow = [s[3] for s in _steady(memory)]
        out["memory_peak_gib"] = memory["peak_bytes"] / 2**30
        out["memory_kept_per_step_mib"] = statistics.median(grow) / 2**20 if grow else None
    terms = out["per_step_terms_s"]
    out["limiting"] = max(terms, key=lambda k: terms[k])
    if not steady:  # the job never trained steadily: what stopped it is the limit
        out["limiting"] = _why_no_steady(raw, cal)
    return out


def _why_no_steady(raw: dict[str, Any], cal: Calibration) -> str:
    """A job with no steady steps: its failures, and whether the liveness round itself (per-node,
    as :meth:`SimGroup.probe` models it) outlasts ``fault.silent_s``, making healthy ranks silent."""
    kinds = Counter(ev.kind for ev in raw["events"])
    calls, round_s, zoned = liveness_round(cal, raw["ranks"], raw.get("node_agents", True),
                                           raw.get("agent_zones_from", 64))
    why = (f"no steady step (job {raw['state'].lower()}, {sum(kinds.values())} failures: "
           + ", ".join(f"{k} x{n}" for k, n in kinds.most_common()) + ")")
    if round_s >= raw["silent_s"]:
        who = f"{calls:,} zone leaders" if zoned else f"{calls:,} node agents"
        why += (f"; the liveness round over {who} takes {round_s:.2g} s, longer than "
                f"fault.silent_s = {raw['silent_s']:g} s, so healthy ranks look silent")
    return why


def profile_driver(cal: Calibration, ranks: int, steps: int = 4, top: int = 8) -> list[dict[str, Any]]:
    """cProfile of the driver's iterations at ``ranks``: the raypod functions (not the
    simulation's) with the most time of their own, per step."""
    prof = cProfile.Profile()
    simulate(cal, ranks, steps=steps, kill_step=steps + 1, profile=prof)
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    rows = [(f"{path.split('raypod/', 1)[-1]}:{line}({name})", cc, tt, ct)
            for (path, line, name), (cc, _nc, tt, ct, _callers) in stats.items()
            if "/raypod/" in path and "/raypod/bench/" not in path]
    rows.sort(key=lambda r: -r[2])
    return [{"function": f, "calls": cc, "own_s_per_step": tt / steps, "cumulative_s_per_step": ct / steps}
            for f, cc, tt, ct in rows[:top]]


def _point(cal: Calibration, ranks: int, steps: int, track_up_to: int,
           base: dict[str, Any] | None) -> dict[str, Any]:
    """One rank count: the timed run, the tracemalloc run, and (above ``track_up_to`` ranks,
    where straggler tracking is left off to save simulation time) its cost
    scaled from ``base``'s measured one by ``N log N`` (one sort a step)."""
    track = ranks <= track_up_to
    raw = simulate(cal, ranks, steps=steps, stragglers=track)
    mem = simulate(cal, ranks, steps=steps, stragglers=False, trace_memory=True)
    out = figures(raw, cal, mem)
    if not track and base is not None and out["driver_cpu_per_step_s"] is not None:
        # One sort of N per step (StragglerTracker.update): N log N from the largest N tracked.
        scaled = base["straggler_cpu_per_step_s"] * (ranks * math.log(ranks)) / (base["ranks"] * math.log(base["ranks"]))
        out["straggler_cpu_per_step_s"] = scaled
        out["straggler_extrapolated_from"] = base["ranks"]
        out["per_step_terms_s"]["driver Python: StragglerTracker.update"] = scaled
        out["driver_cpu_per_step_s"] += scaled
        out["driver_cores"] = (out["driver_cpu_per_step_s"] + out["modelled_ray_cpu_per_step_s"]) / max(
            out["step_period_s"] + scaled, 1e-9)
        out["added_latency_s"] += scaled
        out["limiting"] = max(out["per_step_terms_s"], key=lambda k: out["per_step_terms_s"][k])
    return out


def acceptance(point: dict[str, Any]) -> list[str]:
    """The acceptance lines at one rank count, each computed."""
    gib = point.get("memory_peak_gib")
    checks = [
        ("driver cores", point["driver_cores"], GOALS["cores"], "<="),
        ("driver memory GiB (tracemalloc peak)", gib, GOALS["memory_gib"], "<"),
        ("detection p99 s (kill)", point["kill_p99_s"], GOALS["detect_p99_s"], "<"),
        ("decision s (plan_recovery CPU)", point["decision_cpu_s"], GOALS["decision_s"], "<"),
        ("modelled recovery gap s (detection to every rank training again)", point.get("gap_to_training_s"),
         GOALS["gap_s"], "<="),
    ]
    lines = []
    for name, value, goal, op in checks:
        ok = value is not None and (value <= goal if op == "<=" else value < goal)
        shown = "n/a" if value is None else f"{value:.3g}"
        lines.append(f"{'PASS' if ok else 'FAIL'} at {point['ranks']:,} ranks: {name} = {shown} (goal {op} {goal:g})")
    if point.get("gap_s") is not None:
        lines.append(f"with the step it redoes (detection to its end): {point['gap_s']:.3g} s; with the rebuild "
                     f"as N ranks sharing this machine's cores took it ({point['rebuild_shared_cores_s']:.3g} s "
                     f"instead of {point['gap_phases_s'].get('rebuild', 0.0):.3g} s): "
                     f"{point['gap_s'] - point['gap_phases_s'].get('rebuild', 0.0) + point['rebuild_shared_cores_s']:.3g} s")
    return lines


def run(trials: int | None = None, out: str | None = "benchmarks/results", ranks: tuple[int, ...] | str = RANKS,
        steps: int | None = None, calibration_dir: str | None = None, cal: Calibration | None = None,
        track_up_to: int = 100_000, profile_at: int | None = 10_000, step_s: float | None = None) -> dict[str, Any]:
    """Simulate each rank count, print the table, write ``<out>/sim.json`` and ``.md``.

    Args:
        trials: unused (one simulation per rank count is deterministic but for CPU noise).
        out: where results go (and, without ``calibration_dir``, where the calibration is read).
        ranks: the rank counts (or them comma-separated, as ``--ranks`` gives them).
        steps: steps per simulation (default 24 up to 1,000 ranks, 9 up to 10,000, 12 beyond:
            at 100,000 a window's first steps come in bunches, and 6 steps left one step
            interval before the kill to measure the period from; a rank is killed two thirds in).
        calibration_dir: folder of ``scale_calibration.json``.
        cal: a calibration given in code (tests); then no file is read.
        track_up_to: the largest N simulated with straggler tracking on (see :func:`_point`).
        profile_at: the N profiled with cProfile (None: none).
        step_s: a rank's step time at every N (default :func:`~raypod.bench.goodput_model.llama3_step_s`).
    """
    if cal is None:
        try:
            cal = calibration.load(calibration_dir or out or ".")
        except FileNotFoundError as e:
            raise SystemExit(f"raypod bench sim: {e}") from None
    if isinstance(ranks, str):
        ranks = tuple(int(x) for x in ranks.split(",") if x.strip())
    cal = dataclasses.replace(cal, step_s=Fit(base_s=step_s if step_s is not None else llama3_step_s(),
                                              per_rank_s=0.0))
    points: list[dict[str, Any]] = []
    for n in ranks:
        base = next((p for p in reversed(points) if p["stragglers_tracked"]), None)
        points.append(_point(cal, n, steps or (24 if n <= 1_000 else 9 if n <= 10_000 else 12), track_up_to, base))
    result: dict[str, Any] = {"suite": "sim", "date": time.strftime("%Y-%m-%d"), "points": points,
                              "calibration": cal.to_json(), "sources": SOURCES, "goals_at_10k": GOALS}
    at = {p["ranks"]: p for p in points}
    result["acceptance"] = acceptance(at[10_000]) if 10_000 in at else []
    big = at[max(at)]
    result["limiting"] = {"ranks": big["ranks"], "term": big["limiting"],
                          "seconds_per_step": big["per_step_terms_s"].get(big["limiting"])}
    if profile_at is not None:
        result["profile"] = {"ranks": profile_at, "top": profile_driver(cal, profile_at)}
    report(result, out)
    return result


COLUMNS = ("ranks", "step period s", "driver CPU/step s", "of it stragglers s", "Ray CPU/step s", "cores",
           "added s", "mem peak GiB", "kept MiB/step", "detect kill p50/p99 s", "detect freeze p50/p99 s",
           "decision ms", "to training s", "gap s (drain/plan/rebuild/first step)")


def _row(p: dict[str, Any]) -> list[str]:
    ph = p["gap_phases_s"]
    f = lambda x, spec=".3g": "n/a" if x is None else format(x, spec)  # noqa: E731
    extra = "*" if p.get("straggler_extrapolated_from") else ""
    return [f"{p['ranks']:,}", f(p["step_period_s"]), f(p["driver_cpu_per_step_s"]) + extra,
            f(p["straggler_cpu_per_step_s"]) + extra, f(p["modelled_ray_cpu_per_step_s"]), f(p["driver_cores"]),
            f(p["added_latency_s"]), f(p.get("memory_peak_gib")), f(p.get("memory_kept_per_step_mib")),
            f"{f(p['kill_p50_s'])}/{f(p['kill_p99_s'])}", f"{f(p['freeze_p50_s'])}/{f(p['freeze_p99_s'])}",
            f((p["decision_cpu_s"] or 0) * 1e3), f(p.get("gap_to_training_s")), f"{f(p['gap_s'])} ({'/'.join(f(ph.get(k)) for k in ('drain', 'plan', 'rebuild', 'first_step'))})"]


def report(result: dict[str, Any], out: str | None) -> None:
    """Print the table, the acceptance lines, the limiting term and the profile; write the files."""
    rows = [_row(p) for p in result["points"]]
    print_table("raypod bench sim: the real driver, simulated ranks (virtual time)", COLUMNS, rows,
                right=lambda k: True)
    lim = result["limiting"]
    lines = [*result["acceptance"],
             f"limiting at {lim['ranks']:,} ranks: {lim['term']}"
             + (f" ({lim['seconds_per_step']:.3g} s per step)" if lim["seconds_per_step"] is not None else "")]
    prof = result.get("profile")
    if prof:
        lines.append(f"cProfile at {prof['ranks']:,} ranks, own seconds per step:")
        lines += [f"  {r['own_s_per_step']:.4f} s  {r['function']} ({r['calls']} calls)" for r in prof["top"]]
    for line in lines:
        print(line)
    md = ["# raypod bench sim", "", f"Date: {result['date']}. The production `Driver` (state machine, ledger, "
          "completion, diagnosis, recovery plan, policies) against a simulated group in virtual time; its "
          "CPU is real, Ray's costs are the calibration's.", "",
          markdown_table(COLUMNS, rows), "",
          "`*`: straggler tracking scaled from the largest N simulated with it on, by N log N (one sort a step).", "",
          *[f"- {x}" for x in lines], "", "Sources:", "", *[f"- {k}: {v}" for k, v in result["sources"].items()], "",
          "Command: `raypod bench sim`", ""]
    write_results(result, out, "sim", "\n".join(md), log=print)
