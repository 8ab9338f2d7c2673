"""The ``checkpoint`` suite: the stall a checkpoint adds to training, raypod beside Ray Train V2.

Every system trains ``jobs/configs/mlp.yaml``'s workload (see :mod:`raypod.bench.overhead`:
the 4-block MLP, FSDP2 on 2 CPU ranks over gloo, AdamW) for ``steps`` steps, once
without checkpoints and once with each kind of checkpoint it has:

* raypod (MLflow off, ``python raypod/bench/anchors/raypod_steps.py``):
  ``raypod_none`` (``checkpoint.memory_every_steps=0``, ``checkpoint.every_steps=0``),
  ``raypod_snapshot`` (the in-memory snapshot + peer replica after every step,
  ``checkpoint.memory_every_steps=1``) and ``raypod_persist`` (an async DCP save every ``every`` steps,
  ``checkpoint.every_steps``, snapshots off).
* Ray Train V2 (:mod:`raypod.bench.anchors.mlp_ray_train_steps`): ``ray_train_none``
  (no report, no checkpoint) and ``ray_train_ckpt`` (every ``every`` steps each worker
  ``dcp.save``\\ s its shards to a temporary directory and calls
  ``ray.train.report(metrics, checkpoint=Checkpoint.from_directory(dir))``). The
  report is part of the stall: Ray Train V2's report is a synchronisation of every
  worker through its controller (a ``report(metrics)`` after every step made a step
  take about 2 s on the loaded 2-core machine, so the baseline does not report).
* torchrun (:mod:`raypod.bench.anchors.mlp_steps`, only with ``--systems``):
  ``torchrun_none`` and ``torchrun_dcp`` (a blocking ``dcp.save`` every ``every``
  steps), the floor of a synchronous DCP save of this state with no framework around it.

Step intervals are measured as in the overhead suite (wall time between consecutive
step completions after ``warmup``). A checkpoint's cost shows up as a spike in one or
a few intervals, so this suite uses the **mean** interval: the **stall per
checkpoint** of a variant is ``(mean interval with it - mean interval of the same
system without checkpoints) x intervals / checkpoints`` in the window, computed per
trial against the same trial round's no-checkpoint run (the rounds are interleaved),
then the median over trials. For the snapshot, taken after every step, that is the
mean step time it adds.

    python -m raypod.bench.checkpoint --trials 3 --steps 50 --every 10
"""

from __future__ import annotations

import os
import statistics
import sys
from typing import Any

from raypod.bench.steptime import (
    MLP_WORKLOAD,
    System,
    medians,
    ms,
    named_systems,
    page_md,
    parser,
    print_rows,
    run_interleaved,
    systems_record,
    write_results,
)

EVERY = 10
STEPS_CKPT = 50
WARMUP_CKPT = 10
QUIET_S = 5.0
"""Seconds to wait for other programs' raylets to go after a trial (they rarely do on a shared box)."""
DEFAULT_SYSTEMS = ["raypod_none", "raypod_snapshot", "raypod_persist", "ray_train_none", "ray_train_ckpt"]
"""What ``raypod bench checkpoint`` runs; the torchrun pair is there with ``--systems``."""


def systems(every: int) -> list[System]:
    return [
        System("raypod_none", "raypod, no checkpoints", "raypod",
               ("checkpoint.every_steps=0", "checkpoint.memory_every_steps=0")),
        System("raypod_snapshot", "raypod, in-memory snapshot every step", "raypod",
               ("checkpoint.every_steps=0", "checkpoint.memory_every_steps=1")),
        System("raypod_persist", f"raypod, async DCP save every {every} steps", "raypod",
               (f"checkpoint.every_steps={every}", "checkpoint.memory_every_steps=0")),
        System("ray_train_none", "Ray Train V2, no checkpoints", "ray_train"),
        System("ray_train_ckpt", f"Ray Train V2, report(checkpoint=DCP) every {every} steps", "ray_train",
               ("--ckpt-every", str(every))),
        System("torchrun_none", "torchrun, no checkpoints", "torchrun"),
        System("torchrun_dcp", f"torchrun, dcp.save every {every} steps", "torchrun",
               ("--ckpt-every", str(every), "--ckpt-dir", "<tmp>/ckpt")),
    ]


BASELINE = {"raypod_snapshot": "raypod_none", "raypod_persist": "raypod_none",
            "ray_train_ckpt": "ray_train_none", "torchrun_dcp": "torchrun_none"}


def checkpoints_in_window(name: str, every: int, warmup: int, steps: int) -> int:
    """Checkpoints whose cost falls in the measured intervals (after step k, warmup <= k < steps)."""
    if name == "raypod_snapshot":
        return steps - warmup
    return sum(1 for k in range(warmup, steps) if k % every == 0)


def stalls(by_system: dict[str, list[dict[str, Any]]], every: int, warmup: int, steps: int
           ) -> dict[str, dict[str, Any]]:
    """Per checkpointing variant: per-trial stalls per checkpoint (ms) and their median."""
    out: dict[str, dict[str, Any]] = {}
    n_int = steps - warmup
    for name, base in BASELINE.items():
        if name not in by_system or base not in by_system:
            continue
        n_ck = checkpoints_in_window(name, every, warmup, steps)
        per = []
        for a, b in zip(by_system[name], by_system[base], strict=False):
            if a["ok"] and b["ok"] and n_ck:
                per.append(round((a["mean_ms"] - b["mean_ms"]) * n_int / n_ck, 1))
        out[name] = {"per_trial_ms": per, "median_ms": round(statistics.median(per), 1) if per else None,
                     "checkpoints_in_window": n_ck}
    return out


def run_checkpoint_bench(trials: int = 3, steps: int = STEPS_CKPT, warmup: int = WARMUP_CKPT, every: int = EVERY,
                         out: str | os.PathLike | None = "benchmarks/results",
                         only: list[str] | None = None) -> dict[str, Any]:
    """Measure the stall per checkpoint of raypod's and the anchors' checkpoints; print and write it."""
    only = DEFAULT_SYSTEMS if only is None else only
    chosen = [s for s in systems(every) if s.name in only]
    by_system, machine = run_interleaved(chosen, trials, steps, warmup, "checkpoint", QUIET_S)
    st = stalls(by_system, every, warmup, steps)
    rt = (st.get("ray_train_ckpt") or {}).get("median_ms")

    def vs_rt(name: str) -> float | None:
        v = (st.get(name) or {}).get("median_ms")
        return round(v / rt, 3) if v is not None and rt else None

    result: dict[str, Any] = {
        "suite": "checkpoint",
        "date": machine["date"],
        "machine": machine,
        "command": f"raypod bench checkpoint --trials {trials} (steps={steps}, warmup={warmup}, "
                   f"every={every})",
        "workload": MLP_WORKLOAD + "; checkpointed state: model + AdamW state, 100 MB in all "
                                   "(50 MB per rank)",
        "definition": "stall per checkpoint = (mean step interval with checkpoints - mean without, same "
                      f"system, same trial round) x intervals / checkpoints in the window (steps {warmup}.."
                      f"{steps}); median over trials",
        "systems": systems_record(chosen),
        "trials": by_system,
        "median_step_ms": medians(by_system, "median_ms"),
        "mean_step_ms": medians(by_system, "mean_ms"),
        "stall_per_checkpoint": st,
        "ratios_vs_ray_train": {n: vs_rt(n) for n in st},
    }
    print_rows(table(result))
    write_results(result, out, "checkpoint", markdown)
    return result


def table(r: dict[str, Any]) -> list[str]:
    rows = ["| system | mean step (ms) | median step (ms) | stall per checkpoint (ms) | "
            "stall / Ray Train's |", "|---|---:|---:|---:|---:|"]
    for s in r["trials"]:
        st = r["stall_per_checkpoint"].get(s)
        stall = "—" if st is None else f"{ms(st['median_ms'])} ({', '.join(ms(x) for x in st['per_trial_ms'])})"
        rows.append(f"| {r['systems'][s]['label']} | {ms(r['mean_step_ms'][s])} | "
                    f"{ms(r['median_step_ms'][s])} | {stall} | "
                    f"{ms(r['ratios_vs_ray_train'].get(s), '.3f')} |")
    return rows


def markdown(r: dict[str, Any]) -> str:
    return page_md("checkpoint: the stall a checkpoint adds to training", r, table(r), [
        f"- **stall per checkpoint**: {r['definition']}; per-trial values in brackets.",
        "- The snapshot is taken after every step, so its stall is the mean step time it adds.",
        "",
    ])


run = run_checkpoint_bench
"""Entry point for ``raypod bench checkpoint`` (called with ``trials=`` and ``out=``)."""


def main(argv: list[str] | None = None) -> int:
    p = parser("raypod vs Ray Train V2: the stall a checkpoint adds", 3, STEPS_CKPT, WARMUP_CKPT,
               [s.name for s in systems(EVERY)])
    p.add_argument("--every", type=int, default=EVERY, help="persistent checkpoint interval")
    args = p.parse_args(argv)
    run_checkpoint_bench(trials=args.trials, steps=args.steps, warmup=args.warmup, every=args.every,
                         out=None if args.out == "-" else args.out, only=named_systems(args.systems))
    return 0


if __name__ == "__main__":
    sys.exit(main())
