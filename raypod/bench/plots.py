"""PNG plots of the benchmark suites' results, one per suite found.

    python -m raypod.bench.plots [--results benchmarks/results] [--out benchmarks/plots]

Reads ``<results>/<suite>.json`` for startup, recovery, node_loss, overhead, elastic,
goodput, goodput_model, scale and sim (a missing file is skipped) and writes ``<out>/<suite>.png``: each trial
as a dot, the median (or the single run) as a bar, with the system's label. The
goodput plot adds each system's step number over time with the kills marked.
Matplotlib runs on the Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen

from raypod.bench.goodput_model import plot as plot_goodput_model  # noqa: E402

COLORS = {"raypod": "#1f77b4", "raypod_nosnap": "#6baed6", "ray_train_v2": "#ff7f0e",
          "ray_train_v2_5s": "#fdae6b", "torchrun": "#2ca02c", "torchrun_snapshot": "#98df8a",
          "single": "#7f7f7f", "raypod_peer": "#17becf", "ray_train_torchft": "#d62728", "torchft": "#8c564b"}
NAMES = {"raypod": "raypod", "ray_train_v2": "Ray Train V2", "ray_train_v2_5s": "Ray Train V2\n(5 s poll)",
         "torchrun": "torchrun", "raypod_nosnap": "raypod\nno snapshots",
         "torchrun_snapshot": "torchrun +\nraypod snapshot", "single": "plain loop\n1 process",
         "raypod_peer": "raypod\npeer memory only", "ray_train_torchft": "Ray Train V2\n+ TorchftConfig",
         "torchft": "torchft"}


def _name(s: str) -> str:
    return NAMES.get(s, s)


def _dots_and_bars(ax: Any, values: dict[str, list[float]], ylabel: str, fmt: str = "{:.2f}",
                   failed: dict[str, int] | None = None) -> None:
    """One bar per system at the median of its values, each value as a dot on it."""
    systems = list(values)
    for i, s in enumerate(systems):
        vals = [v for v in values[s] if v is not None]
        color = COLORS.get(s.split(":")[0], "#9467bd")  # "system:fault" keys (recovery) by system
        if vals:
            med = statistics.median(vals)
            ax.bar(i, med, width=0.6, color=color, alpha=0.35, edgecolor=color)
            ax.scatter([i + (k - (len(vals) - 1) / 2) * 0.08 for k in range(len(vals))], vals,
                       color=color, zorder=3, s=28)
            ax.annotate(fmt.format(med), (i, max(vals)), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=9)
        n_failed = (failed or {}).get(s, 0)
        if n_failed:
            ax.annotate(f"{n_failed} failed", (i, 0), textcoords="offset points", xytext=(0, 4),
                        ha="center", fontsize=8, color="red")
    ax.set_xticks(range(len(systems)), ["\n".join([_name(s.split(":")[0]), *s.split(":")[1:]]) for s in systems])
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylim(bottom=0)


def _save(fig: Any, out: Path, suite: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{suite}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _subtitle(d: dict[str, Any]) -> str:
    date = str(d.get("date", ""))[:16].replace("T", " ")
    return f"{date} UTC" if date else ""


def plot_startup(d: dict[str, Any], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    _dots_and_bars(ax, {s: [t.get("seconds") for t in ts] for s, ts in d["trials"].items()},
                   "launch to first step (s)", "{:.1f}")
    ax.set_title(f"startup: launch to first step (dots: trials)\n{_subtitle(d)}", fontsize=10)
    return _save(fig, out, "startup")


def plot_recovery(d: dict[str, Any], out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    trials = d["trials"]
    _dots_and_bars(axes[0], {s: [t["gap_s"] for t in ts if t.get("recovered")] for s, ts in trials.items()},
                   "recovery gap (s)", failed={s: sum(1 for t in ts if not t.get("recovered"))
                                               for s, ts in trials.items()})
    axes[0].set_title("gap: last step before the fault to first after", fontsize=10)
    _dots_and_bars(axes[1], {s: [t["replayed"] for t in ts if t.get("recovered")] for s, ts in trials.items()},
                   "steps replayed", "{:.0f}")
    axes[1].set_title("steps replayed", fontsize=10)
    fig.suptitle(f"recovery: a rank killed or frozen (SIGSTOP) after step 25 (mlp.yaml), {_subtitle(d)}",
                 fontsize=11)
    return _save(fig, out, "recovery")


def plot_node_loss(d: dict[str, Any], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    ts = [t for t in d["trials"] if t.get("recovered")]
    xs = [t["trial"] for t in ts]
    ax.bar(xs, [t["gap_s"] for t in ts], width=0.5, color=COLORS["raypod"], alpha=0.35,
           edgecolor=COLORS["raypod"], label="gap")
    ax.bar(xs, [t.get("detect_s") or 0 for t in ts], width=0.5, color=COLORS["raypod"], alpha=0.8,
           label="of which detection")
    ax.axhline(2.0, color="red", ls="--", lw=1, label="target 2 s")
    ax.set_xticks(xs, [f"trial {x}" for x in xs])
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"node loss: raypod's in-place recovery gap (median {d.get('median_gap_s')} s)\n"
                 f"{_subtitle(d)}", fontsize=10)
    return _save(fig, out, "node_loss")


def plot_overhead(d: dict[str, Any], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4))
    _dots_and_bars(ax, {s: [t.get("median_ms") for t in ts if t.get("ok")] for s, ts in d["trials"].items()},
                   "median step (ms)", "{:.0f}")
    ax.set_title(f"overhead: steady-state step time per trial (dots) and median\n{_subtitle(d)}",
                 fontsize=10)
    return _save(fig, out, "overhead")


def plot_elastic(d: dict[str, Any], out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    trials = d["trials"]
    _dots_and_bars(axes[0], {s: [x for t in ts for x in (t.get("node_to_step_s") or [])]
                             for s, ts in trials.items()}, "seconds", "{:.1f}")
    axes[0].set_title("a node arrives: to the first step using it", fontsize=10)
    _dots_and_bars(axes[1], {s: [x for t in ts for x in (t.get("shrink_gap_s") or [])]
                             for s, ts in trials.items()}, "seconds", "{:.1f}")
    axes[1].set_title("a node goes: gap in training", fontsize=10)
    fig.suptitle(f"elastic (fake autoscaler), {_subtitle(d)}", fontsize=11)
    return _save(fig, out, "elastic")


def plot_goodput(d: dict[str, Any], out: Path) -> Path:
    """Samples goodput per system (bars; the step goodput of a suite that has none), ETTR
    (black ticks, target line at 0.97) and, when present, step number over time."""
    results = d["results"]
    timelines = {s: r.get("timeline") for s, r in results.items() if r.get("timeline")}
    fig, axes = plt.subplots(1, 2 if timelines else 1, figsize=(12 if timelines else 6, 4.2),
                             squeeze=False)
    ax = axes[0][0]
    _dots_and_bars(ax, {s: [r.get("sample_goodput", r.get("goodput"))] for s, r in results.items()},
                   "samples goodput (bars) / ETTR (ticks)", "{:.3f}",
                   failed={s: 0 if r.get("goodput") is not None else 1 for s, r in results.items()})
    ettr = [(i, r["ettr"]) for i, r in enumerate(results.values()) if r.get("ettr") is not None]
    ax.scatter([i for i, _ in ettr], [g for _, g in ettr], marker="_", s=600, color="black", zorder=4,
               label="ETTR")
    ax.axhline(0.97, color="red", ls="--", lw=1, label="raypod ETTR target 0.97")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"goodput: {d['duration_s']:.0f} s, a rank SIGKILLed every {d['kill_every_s']:.0f} s",
                 fontsize=10)
    if timelines:
        ax2 = axes[0][1]
        for s, tl in timelines.items():
            color = COLORS.get(s.split(":")[0], "#9467bd")  # "system:fault" keys (recovery) by system
            ax2.plot([p[0] for p in tl], [p[1] for p in tl], ".", ms=1.5, color=color, label=_name(s))
            for k in results[s].get("per_kill") or []:
                ax2.axvline(k["kill_t"] - results[s]["started"], color=color, alpha=0.35, lw=0.8)
        ax2.set_xlabel("seconds from launch (vertical lines: kills)")
        ax2.set_ylabel("step completed")
        ax2.legend(fontsize=8, markerscale=6)
        ax2.grid(alpha=0.3)
        ax2.set_title("step completions over time", fontsize=10)
    note = " (SHORT SMOKE RUN)" if d["duration_s"] < 600 else ""
    fig.suptitle(f"goodput{note}, {_subtitle(d)}", fontsize=11)
    return _save(fig, out, "goodput")


def plot_scale(d: dict[str, Any], out: Path) -> Path:
    """``raypod bench scale``: step time with and without the driver, and the kill gap, by N."""
    by_n = sorted(((int(n), f) for n, f in d["by_n"].items()), key=lambda x: x[0])
    ns = [n for n, _ in by_n]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    for key, label, color in (("raypod_step_s", "raypod", COLORS["raypod"]),
                              ("nodriver_step_s", "same ranks, no driver", "#7f7f7f")):
        pts = [(n, f[key] * 1e3) for n, f in by_n if f.get(key)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("ranks (one 2-core machine)")
    ax.set_ylabel("step (ms)")
    ratio = ax.twinx()
    pts = [(n, f["step_ratio"]) for n, f in by_n if f.get("step_ratio")]
    ratio.plot([p[0] for p in pts], [p[1] for p in pts], "s--", color="#d62728", label="ratio")
    ratio.axhline(1.05, color="#d62728", lw=0.8, ls=":")
    ratio.set_ylabel("raypod / no driver (target <= 1.05)", color="#d62728")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    ax.set_title("step time", fontsize=10)
    ax = axes[1]
    gap = [(n, f["gap_s"], f.get("regroup_s") or 0.0) for n, f in by_n if f.get("gap_s") is not None]
    ax.bar([str(n) for n, _, _ in gap], [g for _, g, _ in gap], color=COLORS["raypod"], alpha=0.35,
           edgecolor=COLORS["raypod"], label="kill gap")
    ax.bar([str(n) for n, _, _ in gap], [r for _, _, r in gap], color=COLORS["raypod"], alpha=0.8,
           label="of which the regroup")
    ax.set_xlabel("ranks")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("kill-recovery gap (last step before the kill to first after)", fontsize=10)
    fig.suptitle(f"scale: {d.get('workload_short', '')}, {_subtitle(d)}", fontsize=11)
    return _save(fig, out, "scale")


SIM_PANELS = (("driver_cores", "driver cores", "cores", 1.0),
              ("kill_p99_s", "kill detected, p99 (s)", "detect_p99_s", 1.0),
              ("gap_to_training_s", "detection to training again (s)", "gap_s", 5.0),
              ("gap_s", "the same, and the step redone (s)", None, None))


def plot_sim(d: dict[str, Any], out: Path, baseline: dict[str, Any] | None = None) -> Path:
    """``raypod bench sim``: the driver's cores, kill detection p99 and recovery gap by N, with the
    goals at 10,000 ranks; ``baseline`` (an earlier ``sim.json``) drawn beside, dashed."""
    fig, axes = plt.subplots(1, len(SIM_PANELS), figsize=(19, 4.3))
    runs = [(d, "now", "-", COLORS["raypod"])]
    if baseline is not None:
        runs.append((baseline, baseline.get("label", f"before ({baseline.get('date', '')})"), "--", "#7f7f7f"))
    for ax, (key, label, goal_key, goal) in zip(axes, SIM_PANELS, strict=True):
        drawn = False
        for run, name, style, color in runs:
            pts = [(p["ranks"], p[key]) for p in run["points"] if p.get(key) is not None and p[key] > 0]
            if pts:  # an earlier run may not have this figure
                ax.plot([x for x, _ in pts], [y for _, y in pts], "o" + style, color=color, label=name)
                drawn = True
        if goal_key is not None:
            ax.axhline(d.get("goals_at_10k", {}).get(goal_key, goal), color="#d62728", lw=0.8, ls=":",
                       label="goal at 10,000")
        if drawn:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlabel("ranks (simulated)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"sim: the real driver against simulated ranks, {_subtitle(d)}", fontsize=11)
    return _save(fig, out, "sim")


PLOTS: dict[str, Callable[[dict[str, Any], Path], Path]] = {
    "startup": plot_startup,
    "recovery": plot_recovery,
    "node_loss": plot_node_loss,
    "overhead": plot_overhead,
    "elastic": plot_elastic,
    "goodput": plot_goodput,
    "goodput_model": plot_goodput_model,
    "scale": plot_scale,
    "sim": plot_sim,
}
SIM_BASELINE = "sim_baseline*.json"
"""An earlier ``sim.json`` kept beside the results, drawn dashed in the sim plot (the newest)."""


def plot_all(results: Path, out: Path) -> dict[str, Path]:
    """One PNG per suite whose ``<suite>.json`` is in ``results``; returns suite -> PNG path."""
    done = {}
    for suite, fn in PLOTS.items():
        path = results / f"{suite}.json"
        if not path.exists():
            continue
        try:
            if suite == "sim" and (older := sorted(results.glob(SIM_BASELINE))):
                done[suite] = plot_sim(json.loads(path.read_text()), out, json.loads(older[-1].read_text()))
                continue
            done[suite] = fn(json.loads(path.read_text()), out)
        except (KeyError, TypeError, ValueError) as e:
            print(f"plots: {suite}: skipped ({type(e).__name__}: {e})", file=sys.stderr)
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="benchmarks/results", help="folder of <suite>.json files")
    p.add_argument("--out", default="benchmarks/plots", help="folder for <suite>.png")
    args = p.parse_args(argv)
    done = plot_all(Path(args.results), Path(args.out))
    for suite, path in done.items():
        print(f"{suite}: {path}")
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
