"""The ``gpu`` suite: raypod against a plain PyTorch loop on one GPU (tokens/s, MFU).

Every system trains the same job config (default ``jobs/configs/350m.yaml``: a
GPT-2-medium-shaped model, bf16, per-block ``torch.compile``) on one device:

* ``raypod``: ``raypod run`` with its defaults (one rank, FSDP2 over NCCL, in-memory
  snapshots at the ``auto`` cadence, copied to pinned host memory beside compute).
* ``raypod_nosnap``: the same with ``checkpoint.memory_every_steps=0``.
* ``plain``: :mod:`raypod.bench.anchors.plain_steps`: the recipe's model, optimizer,
  loss and batches in one plain process (``torch.autocast`` bf16, no FSDP, no Ray).

Common overrides: one worker, no spare, no persistent checkpoint inside the window,
MLflow off, a smaller prepared corpus shared by all trials. Step time: wall time
between consecutive step completions after ``warmup`` steps (the mean per trial, then
the median over trials; the mean carries any periodic cost). tokens/s = global batch
x sequence length / step time; MFU = tokens/s x the recipe's training FLOPs per token
/ the GPU's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s).

    raypod bench gpu --trials 1
    python -m raypod.bench.gpu --config jobs/configs/tiny.yaml --steps 12 --warmup 4  # CPU check
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from raypod.bench import steptime
from raypod.bench.steptime import System, ms
from raypod.bench.table import ratio

CONFIG = "jobs/configs/350m.yaml"
STEPS = 40
WARMUP = 15

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12,
                   "B200": 2250e12}
"""Dense bf16 peak per GPU by name (SXM parts; a PCIe H100 is lower, 756 TFLOP/s)."""


def peak_flops(name: str) -> float | None:
    if "H100" in name and "PCIe" in name:
        return 756e12
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def systems(config: str, shared: Path) -> list[System]:
    common = ("scaling.spares=0", "scaling.min_workers=1", "scaling.max_workers=1",
              "checkpoint.every_steps=0", f"data.path={shared / 'corpus.parquet'}",
              f"recipe.args.demo_corpus={shared / 'corpus.parquet'}",
              f"recipe.args.cache_dir={shared / 'tokens'}", "recipe.args.corpus_bytes=8000000")
    return [  # raypod first: it prepares the shared token cache the plain loop reads
        System("raypod", "raypod (defaults: FSDP2, snapshots auto)", "raypod", common, config=config),
        System("plain", "plain PyTorch loop (same model, autocast)", "plain", common, config=config),
        System("raypod_nosnap", "raypod, snapshots off", "raypod",
               (*common, "checkpoint.memory_every_steps=0"), config=config),
    ]


def workload(config: str) -> dict[str, Any]:
    import torch

    from raypod.config import load_config
    from raypod.recipe import RankContext, build_recipe

    cfg = load_config(config, [])
    recipe = build_recipe(cfg)
    ctx = RankContext(rank=0, world_size=1, device=torch.device("cpu"), config=cfg)
    with torch.device("meta"):
        model = recipe.build_model(ctx)
    return {"config": config, "params": sum(p.numel() for p in model.parameters()),
            "tokens_per_step": cfg.train.global_batch * recipe.tokens_per_sample(),
            "flops_per_token": recipe.flops_per_token(model),
            "global_batch": cfg.train.global_batch, "micro_batch": cfg.train.micro_batch,
            "mixed_precision": cfg.parallel.mixed_precision, "compile": cfg.parallel.compile}


def run_gpu_bench(trials: int = 1, steps: int = STEPS, warmup: int = WARMUP, config: str = CONFIG,
                  out: str | os.PathLike | None = "benchmarks/results") -> dict[str, Any]:
    """Run every system ``trials`` times; print and write ``gpu.json`` / ``gpu.md``."""
    shared = Path(tempfile.mkdtemp(prefix="raypod-gpu-bench-"))
    chosen = systems(config, shared)
    w = workload(config)
    name = device_name()
    peak = peak_flops(name)
    by_system, machine = steptime.run_interleaved(chosen, trials, steps, warmup, "gpu")
    machine["gpu"] = name
    mean = steptime.medians(by_system, "mean_ms")
    tokens = {s: (round(w["tokens_per_step"] / (ms / 1e3)) if ms else None) for s, ms in mean.items()}
    mfu = {s: (round(tok * w["flops_per_token"] / peak, 4) if tok and peak and w["flops_per_token"] else None)
           for s, tok in tokens.items()}
    result: dict[str, Any] = {
        "suite": "gpu",
        "date": machine["date"],
        "machine": machine,
        "command": f"raypod bench gpu --trials {trials} (config={config}, steps={steps}, warmup={warmup})",
        "workload": w,
        "ranks": "one rank on one GPU (world size 1, NCCL process group)",
        "peak_flops": peak,
        "systems": steptime.systems_record(chosen),
        "trials": by_system,
        "mean_step_ms": mean,
        "median_step_ms": steptime.medians(by_system, "median_ms"),
        "tokens_per_s": tokens,
        "mfu": mfu,
        "ratio_vs_plain": {s: ratio(tokens[s], tokens.get("plain")) for s in tokens},
        "targets": "MFU >= 0.45 on an H100; raypod tokens/s / plain >= 0.98",
    }
    steptime.print_rows(table(result))
    steptime.write_results(result, out, "gpu", markdown)
    return result


def table(r: dict[str, Any]) -> list[str]:
    rows = ["| system | step time, mean (ms) | tokens/s | MFU | tokens/s vs plain |",
            "|---|---:|---:|---:|---:|"]
    for s, info in r["systems"].items():
        m = r["mfu"][s]
        rows.append(f"| {info['label']} | {ms(r['mean_step_ms'][s])} | {ms(r['tokens_per_s'][s], ',.0f')} | "
                    f"{'—' if m is None else f'{m:.1%}'} | {ms(r['ratio_vs_plain'][s], '.3f')} |")
    return rows


def markdown(r: dict[str, Any]) -> str:
    m, w = r["machine"], r["workload"]
    peak = f"{r['peak_flops'] / 1e12:.0f} TFLOP/s" if r["peak_flops"] else "unknown (no GPU)"
    return "\n".join([
        "# gpu: raypod vs a plain PyTorch loop on one GPU",
        "",
        f"Date: {r['date']}. Machine: {m['gpu']}, {m['platform']}, {m['nproc']} CPUs, Python {m['python']}, "
        f"torch {m['torch']}, Ray {m['ray']}.",
        f"Command: `{r['command']}`. {r['ranks']}.",
        "",
        f"Workload: `{w['config']}`: {w['params'] / 1e6:.0f} M parameters, {w['tokens_per_step']} tokens a step "
        f"(global batch {w['global_batch']}, micro-batch {w['micro_batch']}), mixed precision "
        f"{w['mixed_precision']}, compile {w['compile']}; {w['flops_per_token'] / 1e9:.2f} GFLOP a token.",
        "",
        *table(r),
        "",
        f"Targets: {r['targets']}. Peak used for MFU: {peak}.",
        "",
    ])


run = run_gpu_bench
"""Entry point for ``raypod bench gpu`` (called with ``trials=`` and ``out=``)."""


def main(argv: list[str] | None = None) -> int:
    p = steptime.parser("raypod vs a plain loop on one GPU: tokens/s and MFU", 1, STEPS, WARMUP)
    p.add_argument("--config", default=CONFIG)
    a = p.parse_args(argv)
    run_gpu_bench(a.trials, a.steps, a.warmup, a.config, None if a.out == "-" else a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
