"""The ``overhead`` suite: steady-state step time of raypod beside torchrun and a plain loop.

Every system trains ``jobs/configs/mlp.yaml``'s workload: a 4-block MLP
(512→2048→GELU→512, 8.4 M parameters), FSDP2 ``fully_shard`` per block then the root
on gloo, 2 CPU ranks, global batch 32 (16 per rank, one micro-batch), AdamW lr 1e-3,
the same seeded sample order; nothing else (no persistent checkpoint inside the
measured window, MLflow off):

* ``raypod``: raypod with its defaults: in-memory snapshots of every rank's shard,
  replicated to the peer rank, at the ``auto`` cadence (every step while that costs at
  most 1% of the step time, else every ``k`` steps; :mod:`raypod.policies.cadence`).
* ``raypod_every``: the same with a snapshot after every step (``checkpoint.memory_every_steps=1``).
* ``raypod_nosnap``: the same with ``checkpoint.memory_every_steps=0``, so the cost
  of the snapshot shows as the difference.
* ``torchrun``: :mod:`raypod.bench.anchors.mlp_steps` under ``python -m
  torch.distributed.run --standalone --nproc-per-node 2`` (the exact step code of the
  recovery anchors).
* ``torchrun_snapshot``: the same plus raypod's own snapshot code after every step
  (``snapshot.take`` and the ``PeerReplicator`` exchange), without Ray or the driver:
  the snapshot's cost on its own.
* ``single``: the same model unsharded in one plain process (no process group,
  2 torch threads, the batch as 2 micro-batches of 16), a floor for the work itself.

**Step time**: the wall time between consecutive step completions, over steps
``warmup``..``steps`` (the first ``warmup`` steps are excluded); the trial's figure is
the median of those intervals (the mean is reported too). A step completes when rank 0
returns from ``optimizer.step()`` (anchors) or when the driver holds every rank's
result of the step (raypod, an ``after_step`` callback; with 2 steps in flight the
ranks never wait for the driver, so in steady state the interval is the ranks' step
time plus whatever raypod adds to it).

Trials are interleaved (each system once, then again ...), each a cold subprocess
with its own ``RAY_TMPDIR`` and an environment tag; after each, every process it
started is waited for (killed by pid if it lingers) and the harness waits for no
raylet to be up (bounded), as in the other suites.

    python -m raypod.bench.overhead --trials 3 --steps 60
"""

from __future__ import annotations

import os
import sys
from typing import Any

from raypod.bench.steptime import (  # noqa: F401 - intervals, read_steps: their old home
    MLP_WORKLOAD,
    System,
    intervals,
    medians,
    ms,
    named_systems,
    page_md,
    paired_ratios,
    parser,
    print_rows,
    read_steps,
    run_interleaved,
    systems_record,
    write_results,
)
from raypod.bench.table import ratio

STEPS = 120
WARMUP = 15


# ---- the overhead suite --------------------------------------------------------------
SYSTEMS = [
    System("raypod", "raypod (defaults: snapshot cadence auto, 1% budget)", "raypod",
           ("checkpoint.every_steps=0",)),
    System("raypod_cap60", "raypod, cadence auto with memory_max_every 60 (default 20)", "raypod",
           ("checkpoint.every_steps=0", "checkpoint.memory_max_every=60")),
    System("raypod_every", "raypod, snapshot + replica every step", "raypod",
           ("checkpoint.every_steps=0", "checkpoint.memory_every_steps=1")),
    System("raypod_nosnap", "raypod, snapshots off", "raypod",
           ("checkpoint.every_steps=0", "checkpoint.memory_every_steps=0")),
    System("torchrun", "torchrun", "torchrun"),
    System("torchrun_snapshot", "torchrun + raypod's snapshot code", "torchrun", ("--snapshot",)),
    System("single", "plain loop, 1 process, no FSDP", "single"),
]


def run_overhead_bench(trials: int = 3, steps: int = STEPS, warmup: int = WARMUP,
                       out: str | os.PathLike | None = "benchmarks/results",
                       systems: list[str] | None = None) -> dict[str, Any]:
    """Measure steady-state step time of every system; print and write the table.

    Args:
        trials: trials per system (interleaved).
        steps: steps per trial.
        warmup: steps excluded at the start.
        out: folder for ``overhead.json`` / ``overhead.md`` (None: write nothing).
        systems: run only these (names of :data:`SYSTEMS`).
    """
    chosen = [s for s in SYSTEMS if systems is None or s.name in systems]
    by_system, machine = run_interleaved(chosen, trials, steps, warmup, "overhead")
    med, mean = medians(by_system, "median_ms"), medians(by_system, "mean_ms")
    rp, rp1, rp0 = mean.get("raypod"), mean.get("raypod_every"), mean.get("raypod_nosnap")
    tr, snap_tr = mean.get("torchrun"), mean.get("torchrun_snapshot")
    result: dict[str, Any] = {
        "suite": "overhead",
        "date": machine["date"],
        "machine": machine,
        "command": f"raypod bench overhead --trials {trials} (steps={steps}, warmup={warmup})",
        "workload": MLP_WORKLOAD,
        "definition": f"wall time between consecutive step completions over steps "
                      f"{warmup}..{steps}, per trial its median and its mean (the mean carries the "
                      "amortised cost of snapshots taken every k steps), then the median over trials; "
                      "ratios are of the means; anchors: rank 0 after optimizer.step(); raypod: the "
                      "driver holding every rank's result",
        "systems": systems_record(chosen),
        "trials": by_system,
        "median_step_ms": med,
        "mean_step_ms": mean,
        "ratios_vs_torchrun": {s: ratio(v, tr) for s, v in mean.items()},
        "paired_ratios_vs_torchrun": paired_ratios(by_system, "torchrun", "mean_ms"),
        "target": "raypod / torchrun <= 1.03",
        "breakdown_ms": {
            "snapshot_in_raypod": None if rp is None or rp0 is None else round(rp - rp0, 2),
            "snapshot_every_step_in_raypod": None if rp1 is None or rp0 is None else round(rp1 - rp0, 2),
            "snapshot_without_ray": None if snap_tr is None or tr is None else round(snap_tr - tr, 2),
            "ray_and_driver": None if rp0 is None or tr is None else round(rp0 - tr, 2),
        },
    }
    print_table(result)
    write_results(result, out, "overhead", markdown)
    return result


def table(result: dict[str, Any]) -> list[str]:
    trials = max(len(v) for v in result["trials"].values())
    head = "| system | " + " | ".join(f"trial {i} (ms)" for i in range(1, trials + 1)) + \
        " | median (ms) | mean (ms) | / torchrun |"
    rows = [head, "|---|" + "---:|" * (trials + 3)]
    for s, recs in result["trials"].items():
        cells = [ms(r["median_ms"]) if r["ok"] else "failed" for r in recs]
        rows.append(f"| {result['systems'][s]['label']} | " + " | ".join(cells) +
                    f" | {ms(result['median_step_ms'][s])} | {ms(result['mean_step_ms'][s])} | "
                    f"{ms(result['ratios_vs_torchrun'][s], '.3f')} |")
    return rows


def print_table(result: dict[str, Any]) -> None:
    print_rows(table(result))


def markdown(r: dict[str, Any]) -> str:
    b = r["breakdown_ms"]
    return page_md("overhead: steady-state step time", r, table(r), [
        "Per trial round, each system's mean over torchrun's in the same round (the rounds ran "
        "back to back, so these compare systems under about the same load; the load average before "
        "each round's torchrun trial is given):",
        "",
        "| system | " + " | ".join(f"round {i + 1} (load {t['loadavg_before']})"
                                  for i, t in enumerate(r["trials"].get("torchrun", []))) + " |",
        "|---|" + "---:|" * len(r["trials"].get("torchrun", [])),
        *[f"| {r['systems'][s]['label']} | " + " | ".join(ms(x, ".3f") for x in xs) + " |"
          for s, xs in r.get("paired_ratios_vs_torchrun", {}).items()],
        "",
        f"- **step time**: {r['definition']}.",
        f"- Target: {r['target']}.",
        f"- Breakdown (means): snapshots cost {ms(b['snapshot_in_raypod'])} ms a step in raypod at its "
        f"default cadence and {ms(b.get('snapshot_every_step_in_raypod'))} ms when taken every step "
        f"(minus snapshots off), {ms(b['snapshot_without_ray'])} ms every step with the same code "
        f"under torchrun; Ray and the driver add {ms(b['ray_and_driver'])} ms "
        "(raypod with snapshots off minus torchrun).",
        "",
    ])


run = run_overhead_bench
"""Entry point for ``raypod bench overhead`` (called with ``trials=`` and ``out=``)."""


def main(argv: list[str] | None = None) -> int:
    p = parser("raypod vs torchrun vs a plain loop: steady-state step time", 3, STEPS, WARMUP,
               [s.name for s in SYSTEMS])
    args = p.parse_args(argv)
    run_overhead_bench(trials=args.trials, steps=args.steps, warmup=args.warmup,
                       out=None if args.out == "-" else args.out, systems=named_systems(args.systems))
    return 0


if __name__ == "__main__":
    sys.exit(main())
