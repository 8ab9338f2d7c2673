"""Goodput at 1k, 16k and 131k GPUs: a model fed by the recovery costs the suites measured.

    python -m raypod.bench.goodput_model [--out benchmarks/results] [--plot benchmarks/plots]

The suites measure what one failure costs on 2 ranks (``recovery.json``); this module
asks what those costs would mean for a job of 1,024, 16,384 or 131,072 GPUs failing as
often as Meta reports such jobs fail. It is arithmetic only (no Ray, no torch): each
input is printed with its source, and the result lands in ``goodput_model.json``/``.md``
and ``goodput_model.png``. Three ways to recover are modelled:

* **in-memory snapshot** (raypod): every failure costs raypod's measured gap plus the
  work since the last snapshot (half a snapshot interval on average); snapshots cost a
  share of the step time.
* **restart from checkpoint** (Ray Train V2 with ``FailureConfig``, torchrun
  ``--max-restarts``): every failure costs the measured restart time plus the work
  since the last persistent checkpoint (half a checkpoint interval on average); each
  checkpoint stalls training. Both use Daly's higher-order model (J. T. Daly, "A higher
  order estimate of the optimum checkpoint interval for restart dumps", FGCS 22, 2006)
  with exponentially distributed failures, so a failure during a restart or a replay
  costs again.
* **replica groups** (torchft, Ray Train V2 with ``TorchftConfig``): the surviving
  groups keep training; the failed group restarts and rejoins, the job losing
  ``1/replica_groups`` of its throughput meanwhile, plus the in-flight step, a quorum
  change and a heal. No torchft anchor has been measured yet: these rows are modelled.

Goodput is the fraction of the wall time spent on work that is kept, next to a job that
never fails and never checkpoints.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import statistics
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from raypod.bench import table
from raypod.config import CheckpointConfig

SUITE = "goodput_model"
SCALES = (1024, 16384, 131072)
HOUR_S = 3600.0
DAY_S = 24 * HOUR_S

META_PAPER = ("Kokolis et al. (Meta), \"Revisiting Reliability in Large-Scale Machine Learning "
              "Research Clusters\", HPCA 2025, arXiv:2410.21680")
META_MTTF_S = {16384: 1.8 * HOUR_S, 131072: 14 * 60.0}
"""Meta's mean time to failure of a job of this many GPUs: 1.8 h at 16,384 (from the
clusters' data), about 14 min (0.23 h) at 131,072 (the paper's projection)."""
META_REF_GPUS = 16384
"""Scales Meta gives no figure for are scaled from this one, failures proportional to GPUs."""

LLAMA3_PAPER = "Llama Team (Meta), \"The Llama 3 Herd of Models\", arXiv:2407.21783, section 3.3.4"
LLAMA3_GPUS = 16384
LLAMA3_INTERRUPTIONS = 419
"""Unexpected interruptions of Llama 3 405B pre-training (47 planned ones not counted)."""
LLAMA3_DAYS = 54
LLAMA3_PARAMS = 405e9
LLAMA3_BATCH_TOKENS = 16e6
"""The last and largest of Llama 3 405B's global batches (4M, 8M, then 16M tokens)."""
LLAMA3_FLOPS_PER_GPU = 400e12
"""Llama 3 405B's achieved BF16 throughput per H100 at 16K GPUs (38-43% MFU)."""


def llama3_step_s() -> float:
    """One Llama 3 405B optimizer step at 16K GPUs: 6 x params x tokens / (GPUs x FLOP/s)."""
    return 6 * LLAMA3_PARAMS * LLAMA3_BATCH_TOKENS / (LLAMA3_GPUS * LLAMA3_FLOPS_PER_GPU)


@dataclass(frozen=True, kw_only=True)
class Params:
    """What the model assumes beyond the failure rate and the measured gaps."""

    step_s: float = llama3_step_s()
    """Seconds per optimizer step, the same at every scale (weak scaling)."""
    ckpt_interval_s: float = 30 * 60.0
    """Restart-from-checkpoint: seconds of training between persistent checkpoints."""
    ckpt_stall_s: float = 10.0
    """Restart-from-checkpoint: seconds one checkpoint stalls training (the blocking part
    of an async save at scale; sets Young's and Daly's optimum interval)."""
    snapshot_overhead: float = CheckpointConfig().memory_stall_budget
    """raypod: share of the step time in-memory snapshots cost (its default budget)."""
    replica_groups: int = 8
    """Replica groups: how many groups the job's data parallelism is split into."""
    quorum_s: float = 1.0
    """Replica groups: seconds every group pauses to agree on a new quorum after a failure."""
    heal_s: float = 10.0
    """Replica groups: seconds of full stall while the rejoining group fetches live weights."""
    replica_overhead: float = 0.0
    """Replica groups: share of the step time per-step quorum and commit checks cost."""

    def __post_init__(self) -> None:
        for name in ("step_s", "ckpt_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("ckpt_stall_s", "quorum_s", "heal_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("snapshot_overhead", "replica_overhead"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.replica_groups < 2:
            raise ValueError(f"replica_groups must be >= 2, got {self.replica_groups}")


def mttf_s(gpus: int) -> tuple[float, str]:
    """Mean seconds between failures of a ``gpus``-GPU job, and where the figure comes from."""
    if gpus in META_MTTF_S:
        return META_MTTF_S[gpus], f"{META_PAPER}: {META_MTTF_S[gpus] / HOUR_S:.2f} h at {gpus:,} GPUs"
    m = META_MTTF_S[META_REF_GPUS] * META_REF_GPUS / gpus
    return m, (f"scaled from {META_PAPER}'s 1.8 h at {META_REF_GPUS:,} GPUs, assuming failures "
               f"proportional to GPU count: 1.8 h x {META_REF_GPUS:,}/{gpus:,} = {m / HOUR_S:.1f} h")


def llama3_mttf_s() -> float:
    """Llama 3 405B's mean seconds between unexpected interruptions (the cross-check)."""
    return LLAMA3_DAYS * DAY_S / LLAMA3_INTERRUPTIONS


# --- the three recovery models -----------------------------------------------------------


def daly_goodput(mttf: float, work_s: float, stall_s: float, restart_s: float) -> float:
    """Useful share of the wall time when ``work_s`` of training alternate with a ``stall_s``
    save, and a failure (exponential, mean ``mttf``) costs ``restart_s`` plus the work since
    the last save: ``work / (M e^(R/M) (e^((work+stall)/M) - 1))`` (Daly 2006, eq. 14)."""
    if math.isinf(mttf):
        return work_s / (work_s + stall_s)
    return work_s / (mttf * math.exp(restart_s / mttf) * math.expm1((work_s + stall_s) / mttf))


def young_interval_s(mttf: float, stall_s: float) -> float:
    """Young's optimum checkpoint interval, ``sqrt(2 stall M)``."""
    return math.sqrt(2 * stall_s * mttf)


def daly_interval_s(mttf: float, stall_s: float) -> float:
    """Daly's first-order optimum interval, ``sqrt(2 stall M) - stall`` (``M`` when ``stall >= 2M``)."""
    return young_interval_s(mttf, stall_s) - stall_s if stall_s < 2 * mttf else mttf


def replica_group_costs(p: Params, rejoin_s: float) -> dict[str, float]:
    """Seconds of whole-job training one failure costs a replica-group job, by cause."""
    return {"in-flight step (half a step)": p.step_s / 2, "quorum change": p.quorum_s,
            "heal (weights from a peer)": p.heal_s,
            f"rejoin at 1/{p.replica_groups} width lost": rejoin_s / p.replica_groups}


def replica_group_goodput(mttf: float, p: Params, rejoin_s: float) -> float:
    """``(1 - overhead) (1 - cost / M)``: each failure's costs add up (a second group down
    while one rejoins loses its own share), so the first-order form is the expectation."""
    lost = sum(replica_group_costs(p, rejoin_s).values()) / mttf
    return (1 - p.replica_overhead) * max(0.0, 1 - lost)


@dataclass(frozen=True)
class System:
    """One line of the table: how it recovers and what its recovery costs are drawn from."""

    key: str
    label: str
    kind: str
    """``snapshot``, ``checkpoint``, ``checkpoint_opt`` (Daly-optimal interval) or ``replica``."""
    anchor: str
    """The ``recovery.json`` system whose measured gap is the restart (or rejoin) time."""


SYSTEMS = (
    System("raypod", "raypod (in-memory snapshot)", "snapshot", "raypod"),
    System("ray_train_v2", "Ray Train V2 + FailureConfig", "checkpoint", "ray_train_v2"),
    System("torchrun", "torchrun --max-restarts", "checkpoint", "torchrun"),
    System("ray_train_v2_opt", "Ray Train V2 + FailureConfig, Daly-optimal interval", "checkpoint_opt",
           "ray_train_v2"),
    System("torchrun_opt", "torchrun, Daly-optimal interval", "checkpoint_opt", "torchrun"),
    System("torchft", "torchft replica groups (modelled)", "replica", "torchrun"),
    System("ray_train_v2_torchft", "Ray Train V2 + TorchftConfig (modelled)", "replica", "ray_train_v2"),
)


# --- measured inputs -----------------------------------------------------------------------


def _trial_dicts(node: Any) -> Iterator[dict[str, Any]]:
    """Every trial record under ``recovery.json``'s ``trials`` (a dict of lists, or nested by fault)."""
    if isinstance(node, dict):
        if "system" in node and "gap_s" in node:
            yield node
            return
        for v in node.values():
            yield from _trial_dicts(v)
    elif isinstance(node, list):
        for v in node:
            yield from _trial_dicts(v)


def measured_gaps(recovery: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``system -> {gap_s, replayed, recovered}``: medians over the recovered trials in which
    a rank was killed (trials of other fault kinds, where the file has them, are left out)."""
    out: dict[str, dict[str, Any]] = {}
    trials = [t for t in _trial_dicts(recovery.get("trials", {})) if t.get("fault", "kill") == "kill"]
    for system in dict.fromkeys(t["system"] for t in trials):
        mine = [t for t in trials if t["system"] == system]
        ok = [t for t in mine if t.get("recovered") and t.get("gap_s") is not None]
        out[system] = {"gap_s": table.median(t["gap_s"] for t in ok),
                       "replayed": table.median(t["replayed"] for t in ok if t.get("replayed") is not None),
                       "recovered": f"{len(ok)}/{len(mine)}"}
    return out


def _sim_points(node: Any) -> Iterator[tuple[int, float]]:
    """``(ranks, raypod gap)`` pairs anywhere in ``sim.json``: records with a rank count
    (``gpus``, ``ranks`` or ``world_size``) and a gap (``gap_s`` or ``median_gap_s``)."""
    if isinstance(node, dict):
        n = next((node[k] for k in ("gpus", "ranks", "world_size") if isinstance(node.get(k), int)), None)
        gap = next((node[k] for k in ("gap_s", "median_gap_s") if isinstance(node.get(k), int | float)), None)
        if n and gap is not None and node.get("system", "raypod") == "raypod":
            yield n, float(gap)
        for v in node.values():
            yield from _sim_points(v)
    elif isinstance(node, list):
        for v in node:
            yield from _sim_points(v)


def sim_gap_fit(sim: dict[str, Any]) -> tuple[float, float, list[tuple[int, float]]] | None:
    """``(a, b, points)`` of the least-squares fit ``gap = a + b log2(ranks)`` over sim.json's
    raypod gaps (``b = 0`` from one rank count); None when it holds none."""
    pts = sorted(_sim_points(sim))
    if not pts:
        return None
    by_n = {n: statistics.median(g for m, g in pts if m == n) for n, _ in pts}
    xs, ys = [math.log2(n) for n in by_n], list(by_n.values())
    if len(xs) == 1:
        return ys[0], 0.0, sorted(by_n.items())
    b, a = statistics.linear_regression(xs, ys)
    return a, b, sorted(by_n.items())


@dataclass(frozen=True)
class Inputs:
    """The measured side of the model: median gaps per anchor, and raypod's gap per scale."""

    gaps: dict[str, dict[str, Any]]
    recovery_source: str
    raypod_gap_at: dict[int, float]
    raypod_gap_source: str
    stand_ins: dict[str, str]
    """``anchor -> why`` for an anchor with no measured gap and the one standing in for it."""

    def restart_s(self, anchor: str) -> float:
        """The measured median gap of ``anchor`` (or of its stand-in)."""
        return self.gaps[self.stand_ins.get(anchor, anchor)]["gap_s"]


def load_inputs(results: Path) -> Inputs:
    """Read ``recovery.json`` (required) and ``sim.json`` (optional) from ``results``."""
    path = results / "recovery.json"
    recovery = json.loads(path.read_text())
    gaps = measured_gaps(recovery)
    if gaps.get("raypod", {}).get("gap_s") is None:
        raise ValueError(f"{path}: no recovered raypod trial to take a gap from")
    stand_ins = {}
    for anchor in ("ray_train_v2", "torchrun"):
        if gaps.get(anchor, {}).get("gap_s") is None:
            other = "torchrun" if anchor == "ray_train_v2" else "ray_train_v2"
            if gaps.get(other, {}).get("gap_s") is None:
                raise ValueError(f"{path}: neither restart-from-checkpoint anchor recovered")
            stand_ins[anchor] = other
    source = f"{path} ({recovery.get('date', 'undated')}): median gap over recovered trials, rank killed"
    raypod_gap = gaps["raypod"]["gap_s"]
    fit = sim_gap_fit(json.loads((results / "sim.json").read_text())) if (results / "sim.json").exists() else None
    if fit is None:
        return Inputs(gaps, source, dict.fromkeys(SCALES, raypod_gap),
                      f"recovery.json's {raypod_gap} s at every scale: measured at 2 ranks only", stand_ins)
    a, b, pts = fit
    at = {n: max(raypod_gap, a + b * math.log2(n)) for n in SCALES}
    return Inputs(gaps, source, at, f"sim.json: gap = {a:.3g} + {b:.3g} log2(ranks) fitted over "
                  f"{', '.join(f'{n:,}: {g:.3g} s' for n, g in pts)} (at least the 2-rank {raypod_gap} s)",
                  stand_ins)


# --- the model at each scale ---------------------------------------------------------------


def _interval(system: System, m: float, inputs: Inputs, p: Params) -> tuple[float, float, float]:
    """``(work_s, stall_s, restart_s)`` of a snapshot or checkpoint system at mean time to failure ``m``."""
    if system.kind == "snapshot":
        every = max(1.0, inputs.gaps["raypod"]["replayed"] or 1.0)
        work = p.step_s * every
        return work, work * p.snapshot_overhead / (1 - p.snapshot_overhead), math.nan
    work = p.ckpt_interval_s if system.kind == "checkpoint" else daly_interval_s(m, p.ckpt_stall_s)
    return work, p.ckpt_stall_s, inputs.restart_s(system.anchor)


def evaluate(system: System, gpus: int, inputs: Inputs, p: Params) -> dict[str, Any]:
    """Goodput of ``system`` at ``gpus`` GPUs, with the first-order share of time each cause loses."""
    m, _ = mttf_s(gpus)
    if system.kind == "replica":
        rejoin = inputs.restart_s(system.anchor)
        costs = replica_group_costs(p, rejoin)
        losses = {"per-step quorum/commit overhead": p.replica_overhead} | {k: v / m for k, v in costs.items()}
        return {"goodput": replica_group_goodput(m, p, rejoin), "restart_s": rejoin, "interval_s": None,
                "losses": losses}
    work, stall, restart = _interval(system, m, inputs, p)
    if system.kind == "snapshot":
        restart = inputs.raypod_gap_at[gpus]
    name = "snapshot" if system.kind == "snapshot" else "checkpoint"
    losses = {f"{name} stall": stall / (work + stall), f"lost work (half a {name} interval)": (work + stall) / 2 / m,
              "restart gap" if name == "checkpoint" else "recovery gap": restart / m}
    return {"goodput": daly_goodput(m, work, stall, restart), "restart_s": restart, "interval_s": work,
            "losses": losses}


def break_even_gap_s(results: dict[str, dict[str, Any]], gpus: int, inputs: Inputs, p: Params) -> dict[str, Any]:
    """The raypod gap at which raypod's goodput at ``gpus`` falls to the best other system's:
    ``M ln(G(0) / G_best)``, since the gap enters Daly's goodput as ``e^(-gap/M)``."""
    m, _ = mttf_s(gpus)
    work, stall, _ = _interval(SYSTEMS[0], m, inputs, p)
    g0 = daly_goodput(m, work, stall, 0.0)
    best = max((s for s in results if s != "raypod"), key=lambda s: results[s]["by_scale"][str(gpus)]["goodput"])
    g_best = results[best]["by_scale"][str(gpus)]["goodput"]
    return {"gpus": gpus, "best_other": best, "best_other_goodput": round(g_best, 4),
            "gap_s": round(m * math.log(g0 / g_best), 1) if g_best < g0 else 0.0,
            "raypod_gap_used_s": inputs.raypod_gap_at[gpus]}


def failure_inputs() -> dict[str, Any]:
    """The failure rate per scale with its source, and the Llama 3 cross-check."""
    rows = {str(n): {"mttf_s": round(m, 1), "mttf_h": round(m / HOUR_S, 3), "source": src}
            for n in SCALES for m, src in [mttf_s(n)]}
    llama = llama3_mttf_s()
    return {"mttf": rows, "llama3_cross_check": {
        "gpus": LLAMA3_GPUS, "interruptions": LLAMA3_INTERRUPTIONS, "days": LLAMA3_DAYS,
        "mttf_h": round(llama / HOUR_S, 2),
        "vs_meta": round(llama / META_MTTF_S[LLAMA3_GPUS], 2),
        "source": f"{LLAMA3_PAPER}: {LLAMA3_INTERRUPTIONS} unexpected interruptions in {LLAMA3_DAYS} days "
                  f"on {LLAMA3_GPUS:,} H100s"}}


def model(inputs: Inputs, p: Params) -> dict[str, Any]:
    """Every system at every scale, the largest loss at the largest scale, and the break-even gap."""
    results: dict[str, dict[str, Any]] = {}
    for s in SYSTEMS:
        by_scale = {}
        for n in SCALES:
            e = evaluate(s, n, inputs, p)
            by_scale[str(n)] = {"goodput": round(e["goodput"], 4), "restart_s": e["restart_s"],
                                "interval_s": None if e["interval_s"] is None else round(e["interval_s"], 1),
                                "losses": {k: round(v, 5) for k, v in e["losses"].items()}}
        top = max(SCALES)
        losses = by_scale[str(top)]["losses"]
        results[s.key] = {"label": s.label, "kind": s.kind, "anchor": s.anchor,
                          "measured": s.kind != "replica", "by_scale": by_scale,
                          "largest_loss_at_top": {"gpus": top, "cause": max(losses, key=losses.get),
                                                  "share_of_loss": round(max(losses.values())
                                                                         / sum(losses.values()), 3)}}
    m_by = {n: mttf_s(n)[0] for n in SCALES}
    return {"results": results, "break_even": break_even_gap_s(results, max(SCALES), inputs, p),
            "optimal_intervals_s": {str(n): {"young": round(young_interval_s(m, p.ckpt_stall_s), 1),
                                             "daly": round(daly_interval_s(m, p.ckpt_stall_s), 1)}
                                    for n, m in m_by.items()}}


# --- the result, its page and its plot -----------------------------------------------------


def assumptions(inputs: Inputs, p: Params) -> list[str]:
    """What the table rests on, in the words its page prints under it."""
    g = inputs.gaps
    lines = [
        "Failures arrive one at a time, exponentially distributed, at the rate of the MTTF row; every "
        "failure interrupts the whole job (restart from checkpoint) or one replica group (replica groups).",
        f"Step time {p.step_s:.2f} s at every scale (weak scaling): Llama 3 405B's "
        f"6 x {LLAMA3_PARAMS:.3g} params x {LLAMA3_BATCH_TOKENS:.3g} tokens / ({LLAMA3_GPUS:,} GPUs x "
        f"{LLAMA3_FLOPS_PER_GPU / 1e12:.0f} TFLOP/s) ({LLAMA3_PAPER}).",
        f"raypod: a failure costs {inputs.raypod_gap_source}, plus half a snapshot interval of lost work; "
        f"the snapshot interval is the steps it replayed ({g['raypod']['replayed']}, snapshot every step as "
        f"in the recovery suite); snapshots cost {p.snapshot_overhead:.0%} of the step time (raypod's "
        "memory_stall_budget). Failures that take a snapshot's holders with them are not modelled.",
        f"Restart from checkpoint: a failure costs the anchor's measured restart gap plus half a checkpoint "
        f"interval of lost work; checkpoints every {p.ckpt_interval_s / 60:.0f} min (or Daly's optimum), "
        f"each stalling training {p.ckpt_stall_s:g} s. The measured gaps are of 2 CPU ranks and a 100 MB "
        "state: at scale, scheduling, NCCL setup and checkpoint loading make restarts longer, so these "
        "goodputs are upper bounds (raypod's too: its detection and regroup at scale are not measured).",
        f"Replica groups: MODELLED, not measured (no torchft anchor yet): {p.replica_groups} groups; a failure "
        f"costs half a step, a {p.quorum_s:g} s quorum change, a {p.heal_s:g} s heal stall, and the failed "
        f"group's rejoin (its anchor's measured restart gap) at 1/{p.replica_groups} of the throughput; "
        f"per-step overhead {p.replica_overhead:.0%}.",
        "Spare hardware is assumed to be at hand for every system (no waiting for a replacement node).",
    ]
    for anchor, other in inputs.stand_ins.items():
        lines.append(f"{anchor} recovered {g.get(anchor, {}).get('recovered', '0/0')} trials in recovery.json: "
                     f"its rows use {other}'s measured gap ({g[other]['gap_s']} s) as a stand-in.")
    return lines


def build(results_dir: Path, p: Params) -> dict[str, Any]:
    """The whole ``goodput_model.json`` record from the suites' results in ``results_dir``."""
    inputs = load_inputs(results_dir)
    return {"suite": SUITE, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": "python -m raypod.bench.goodput_model " + " ".join(sys.argv[1:]),
            "scales": list(SCALES), "params": asdict(p),
            "inputs": {"failures": failure_inputs(), "recovery_source": inputs.recovery_source,
                       "measured_gaps": inputs.gaps, "stand_ins": inputs.stand_ins,
                       "raypod_gap_s": {str(n): g for n, g in inputs.raypod_gap_at.items()},
                       "raypod_gap_source": inputs.raypod_gap_source},
            **model(inputs, p), "assumptions": assumptions(inputs, p)}


def _scale_name(n: int) -> str:
    return f"{n / 1000:.0f}k GPUs"


def table_rows(r: dict[str, Any]) -> list[list[str]]:
    """One row per system: its restart (or rejoin) time, goodput per scale, largest loss at the top."""
    rows = []
    for s in r["results"].values():
        top = s["largest_loss_at_top"]
        restarts = dict.fromkeys(table.fmt(s["by_scale"][str(n)]["restart_s"], ".2f") for n in SCALES)
        rows.append([s["label"], " / ".join(restarts),
                     *[table.fmt(s["by_scale"][str(n)]["goodput"], ".3f") for n in SCALES],
                     f"{top['cause']} ({top['share_of_loss']:.0%} of the loss)"])
    return rows


HEADER = ["system", "restart / rejoin (s)", *[f"goodput {_scale_name(n)}" for n in SCALES],
          f"largest loss at {_scale_name(max(SCALES))}"]


def markdown(r: dict[str, Any]) -> str:
    """``goodput_model.md``: the table, its inputs with their sources, its assumptions."""
    f = r["inputs"]["failures"]
    llama = f["llama3_cross_check"]
    be = r["break_even"]
    return "\n".join([
        "# goodput model: 1k, 16k and 131k GPUs", "",
        f"Date: {r['date']}. Command: `{r['command']}`. A model, not a run: the recovery costs are "
        f"measured ({r['inputs']['recovery_source']}), the failure rates published.", "",
        table.markdown_table(HEADER, table_rows(r), "|---|---:|" + "---:|" * len(SCALES) + "---|"), "",
        "Failure rate (mean time to failure of the job):", "",
        *[f"- {_scale_name(int(n))}: {x['mttf_h']:.2f} h ({x['source']})" for n, x in f["mttf"].items()],
        f"- Cross-check: {llama['source']}: one every {llama['mttf_h']} h, {llama['vs_meta']}x Meta's "
        f"{META_MTTF_S[LLAMA3_GPUS] / HOUR_S} h at {LLAMA3_GPUS:,} GPUs.", "",
        "Optimum checkpoint intervals (Young / Daly, s): " + "; ".join(
            f"{_scale_name(int(n))} {x['young']:g} / {x['daly']:g}" for n, x in r["optimal_intervals_s"].items())
        + ".", "",
        f"At {_scale_name(be['gpus'])} raypod stays ahead of the best other row ({be['best_other']}, "
        f"goodput {be['best_other_goodput']}) while its per-failure gap stays under {be['gap_s']} s "
        f"(the model uses {be['raypod_gap_used_s']:.1f} s).", "",
        "Assumptions:", "", *[f"- {a}" for a in r["assumptions"]], "",
        "- **goodput**: share of the wall time whose work is kept, against a job that never fails "
        "and never saves state. **largest loss**: at the largest scale, the cause (stall, lost work, "
        "restart or rejoin) with the largest first-order share of the time, as a share of all the causes' "
        "time lost; the JSON gives each cause's share of the time.", "",
        "Parameters: " + ", ".join(f"{k}={v:g}" for k, v in r["params"].items()) + ".", ""])


STYLES = {"snapshot": "-", "checkpoint": "-", "checkpoint_opt": "--", "replica": ":"}


def _lines(r: dict[str, Any]) -> list[tuple[str, str, list[float]]]:
    """``(system key, legend label, goodputs)`` per line; systems with the same figures (a
    stand-in gap) share one line and one label."""
    lines: dict[tuple[str, tuple[float, ...]], tuple[str, str, list[float]]] = {}
    for key, s in r["results"].items():
        ys = [s["by_scale"][str(n)]["goodput"] for n in SCALES]
        k = (s["kind"], tuple(ys))
        lines[k] = (lines[k][0], f"{lines[k][1]}\n  = {s['label']}", ys) if k in lines else (key, s["label"], ys)
    return list(lines.values())


def plot(r: dict[str, Any], out: Path) -> Path:
    """``<out>/goodput_model.png``: goodput against GPUs, one line per system, and a close-up of the top."""
    from raypod.bench import plots  # matplotlib on Agg, the suites' colours

    fig, axes = plots.plt.subplots(1, 2, figsize=(13, 5))
    colors = {"ray_train_v2_opt": plots.COLORS["ray_train_v2"], "torchrun_opt": plots.COLORS["torchrun"],
              "torchft": "#9467bd", "ray_train_v2_torchft": "#d62728"}
    ticks = [f"{n:,}\nMTTF {r['inputs']['failures']['mttf'][str(n)]['mttf_h']:.2f} h" for n in SCALES]
    for ax, bottom in zip(axes, (0.0, 0.95), strict=True):
        for key, label, ys in _lines(r):
            ax.plot(SCALES, ys, STYLES[r["results"][key]["kind"]], marker="o",
                    color=plots.COLORS.get(key, colors.get(key)), label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(SCALES, ticks)
        ax.set_ylim(bottom, 1.002 if bottom else 1.02)
        ax.set_xlabel("GPUs in the job")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("goodput (share of wall time kept)")
    axes[0].legend(fontsize=7, loc="lower left")
    axes[1].set_title("close-up: goodput >= 0.95", fontsize=9)
    fig.suptitle(f"goodput model: measured recovery costs at Meta's failure rates (dashed: Daly-optimal "
                 f"interval, dotted: modelled, not measured), {plots._subtitle(r)}", fontsize=10)
    return plots._save(fig, out, SUITE)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="benchmarks/results", help="folder holding recovery.json (sim.json)")
    ap.add_argument("--out", default="benchmarks/results", help="folder for goodput_model.json/.md ('-': none)")
    ap.add_argument("--plot", default="benchmarks/plots", help="folder for goodput_model.png ('-': none)")
    defaults = Params()
    for name, value in asdict(defaults).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value,
                        help=f"model parameter (default {value:g})")
    args = ap.parse_args(argv)
    p = replace(defaults, **{k: getattr(args, k) for k in asdict(defaults)})
    r = build(Path(args.results), p)
    table.print_table("goodput model", HEADER, table_rows(r), right=lambda k: 0 < k < len(HEADER) - 1)
    table.write_results(r, None if args.out == "-" else args.out, SUITE, markdown(r), log=print)
    if args.plot != "-":
        print(f"wrote {plot(r, Path(args.plot))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
