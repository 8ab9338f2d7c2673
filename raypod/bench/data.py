"""Data pipeline: what the Ray Data stream delivers against what training consumes.

For each config (``jobs/configs/tiny.yaml``, ``small.yaml`` and ``hf_llama.yaml``, 2 ranks
on a local Ray):

1. **Preparation**: the recipe's Ray Data pass (``read_parquet → map_batches``
   tokenising) into a fresh cache; tokens per second, and samples per second (tokens/s
   over the sample length) against the samples per second training consumes. The GPT
   configs tokenise UTF-8 bytes; ``hf_llama.yaml`` a byte-level BPE tokenizer (vocabulary
   512, trained here on the demo corpus first) through ``tokenizers``' ``encode_batch``.
2. **Pipeline**: one rank's stream (:meth:`raypod.data.stream.TokenWindows.stream`,
   the same Ray Data pipeline a rank runs) iterated as fast as it goes, alone: time
   to its first row and samples per second after it.
3. **Training**: the job itself for a few steps; samples per second consumed per rank
   and ``data_wait_frac`` (the longest wait of any rank for its batch / step time) of
   every step after the first.

The pipeline's samples/s over training's is the headroom: above 1 the stream keeps
ahead and steps do not wait. ``small.yaml`` runs at 2 ranks here (its config allows
2 to 4) and for fewer steps, since a step of its 10M-parameter GPT takes seconds on CPU.

    raypod bench data            # or: python -m raypod.bench.data
    python -m raypod.bench.data --configs tiny,hf_llama --no-recovery --out DIR   # some rows only
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from raypod.bench.table import loadavg, module_versions, write_results
from raypod.bench.trials import REPO

CONFIGS = {"tiny": 60, "small": 8, "hf_llama": 40}
"""Config name (``jobs/configs/<name>.yaml``) -> training steps timed."""
STREAM_STEPS = 400
FEED_STEPS = {"tiny": 60, "small": 40, "hf_llama": 60}
"""Steps of the rank-like consumer of a :class:`StepFeed` (after the training run)."""


def _seq_len(recipe: Any) -> int:
    """Tokens per sample of the GPT (``model_cfg.seq_len``) or the HF recipe (``seq_len``)."""
    return recipe.model_cfg.seq_len if hasattr(recipe, "model_cfg") else recipe.seq_len


def _windows(recipe: Any) -> Any:
    """The recipe's training windows (without a held-out eval share)."""
    from raypod.data.stream import TokenWindows

    return TokenWindows(recipe.corpus, _seq_len(recipe), 0, getattr(recipe, "num_train", None))


def _pipeline(recipe: Any, cfg: Any, world: int) -> dict[str, Any]:
    """Iterate rank 0's stream alone: first-row latency and steady samples/s."""
    from raypod.data.order import SampleOrder

    source = _windows(recipe)
    order = SampleOrder(len(source), cfg.train.global_batch, cfg.train.seed)
    t0 = time.perf_counter()
    first = None
    rows = samples = 0
    ds = source.stream(0, world, order, 1, STREAM_STEPS)
    for b in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=2):
        if first is None:
            first = time.perf_counter()
        else:
            rows += 1
            samples += int(b["ids"].shape[1])
    dt = time.perf_counter() - first
    return {"first_row_s": round(first - t0, 3), "rows": rows,
            "samples_per_s": round(samples / dt, 1), "steps_per_s": round(rows / dt, 1)}


def _feed(recipe: Any, cfg: Any, world: int, step_s: float, steps: int) -> dict[str, Any]:
    """A :class:`StepFeed` consumed like a rank that computes for ``step_s`` a step."""
    from raypod.data.order import SampleOrder
    from raypod.data.stream import StepFeed

    source = _windows(recipe)
    order = SampleOrder(len(source), cfg.train.global_batch, cfg.train.seed)
    feed = StepFeed(source, order, last_step=steps)
    waits = []
    try:
        feed.seek(1, world, 1)
        for step in range(1, steps + 1):
            time.sleep(step_s)
            t = time.perf_counter()
            feed.take(step, 1, world)
            waits.append(time.perf_counter() - t)
    finally:
        feed.close()
    later = waits[10:]
    return {"steps": steps, "step_s": round(step_s, 3), **feed.stats,
            "wait_ms_mean_after_10": round(statistics.mean(later) * 1e3, 3),
            "wait_ms_max_after_10": round(max(later) * 1e3, 3)}


def bench_config(name: str, steps: int, root: Path) -> dict[str, Any]:
    """Prepare, stream and train ``jobs/configs/<name>.yaml``; the figures of one row."""
    from raypod.api import connect_ray, run
    from raypod.callbacks import Callback, StepReport
    from raypod.config import load_config
    from raypod.recipe import build_recipe

    class Recorder(Callback):
        def __init__(self) -> None:
            self.metrics: list[dict[str, float]] = []

        def after_step(self, report: StepReport) -> None:
            self.metrics.append(dict(report.metrics, step=report.step))

    overrides = [f"checkpoint.storage={root / 'runs'}", f"name=bench-data-{name}", "mlflow.enabled=false",
                 f"train.max_steps={steps}", "checkpoint.every_steps=0", "checkpoint.memory_every_steps=0",
                 "scaling.min_workers=2", "scaling.max_workers=2", "scaling.spares=0",
                 f"recipe.args.cache_dir={root / f'cache-{name}'}"]
    if name.startswith("hf_"):  # the HF recipe's tokenizer, trained here (not timed)
        from raypod.data.corpus import build_stdlib_corpus
        from raypod.recipes.hf import build_tokenizer

        demo = Path(os.path.expanduser("~/.cache/raypod/data/stdlib_corpus.parquet"))
        if not demo.exists():
            build_stdlib_corpus(str(demo))
        build_tokenizer(str(demo), 512, str(root / "tokenizer"))
        overrides += [f"recipe.args.tokenizer={root / 'tokenizer'}", "train.eval_every_steps=0"]
    cfg = load_config(REPO / "jobs" / "configs" / f"{name}.yaml", overrides)
    recipe = build_recipe(cfg)
    recipe.check_data(cfg)  # builds the demo corpus on first use (not timed)
    connect_ray(cfg)
    t = time.perf_counter()
    recipe.prepare_data(cfg)
    prepare_s = time.perf_counter() - t
    world = cfg.scaling.max_workers
    pipe = _pipeline(recipe, cfg, world)
    rec = Recorder()
    summary = run(cfg, callbacks=[rec])
    later = [m for m in rec.metrics if m["step"] > 1]
    step_s = statistics.median(m["step_time_s"] for m in later)
    feed = _feed(recipe, cfg, world, min(step_s, 0.5), FEED_STEPS[name])
    waits = [m["data_wait_frac"] for m in later]
    consumed = statistics.median(m["samples_per_s"] for m in later) / world
    return {
        "config": f"jobs/configs/{name}.yaml",
        "model": {k: v for k, v in cfg.recipe.args.items() if k not in ("demo_corpus", "cache_dir", "tokenizer")},
        "tokenizer": getattr(getattr(recipe, "tokens", None), "name", "utf8-bytes/v1"),
        "world_size": world,
        "global_batch": cfg.train.global_batch,
        "samples": recipe.corpus.num_samples(_seq_len(recipe)),
        "seq_len": _seq_len(recipe),
        "tokens": recipe.corpus.num_tokens,
        "prepare_s": round(prepare_s, 2),
        "prepare_tokens_per_s": round(recipe.corpus.num_tokens / prepare_s),
        "prepare_samples_per_s": round(recipe.corpus.num_tokens / prepare_s / _seq_len(recipe), 1),
        "train_samples_per_s": round(consumed * world, 2),
        "prepare_headroom": round(recipe.corpus.num_tokens / prepare_s / _seq_len(recipe) / (consumed * world), 1),
        "stream": pipe,
        "train_steps": len(rec.metrics),
        "train_samples_per_s_per_rank": round(consumed, 2),
        "step_time_s_median": round(statistics.median(m["step_time_s"] for m in later), 3),
        "headroom": round(pipe["samples_per_s"] / consumed, 1),
        "feed": feed,
        "data_wait_frac": {"mean": round(statistics.mean(waits), 5), "median": round(statistics.median(waits), 5),
                           "max": round(max(waits), 5), "first_step": round(rec.metrics[0]["data_wait_frac"], 5)},
        "ledger": summary["samples"],
    }


def bench_recovery(root: Path, steps: int = 40, kill_at: int = 20) -> dict[str, Any]:
    """``tiny.yaml`` with a spare and a rank killed at ``kill_at``: the data waits around the recovery.

    The survivor rewinds to its last in-memory snapshot and takes the replayed steps'
    batches from memory; the spare (a new rank 1) assembles its first batches itself
    while its Ray Data stream starts.
    """
    from raypod.api import run
    from raypod.callbacks import Callback, StepReport
    from raypod.config import load_config

    class Recorder(Callback):
        def __init__(self) -> None:
            self.rows: list[tuple[int, bool, float, float, float]] = []

        def after_step(self, report: StepReport) -> None:
            m = report.metrics
            self.rows.append((report.step, report.replayed, m["data_wait_frac"] * m["step_time_s"],
                              m["step_time_s"], report.time_s))

    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", [
        f"checkpoint.storage={root / 'runs'}", "name=bench-data-recovery", "mlflow.enabled=false",
        f"train.max_steps={steps}", "checkpoint.every_steps=0", "scaling.spares=1",
        f"recipe.args.cache_dir={root / 'cache-tiny'}", f"fault.inject=[{{step: {kill_at}, rank: 1, kind: kill}}]"])
    rec = Recorder()
    summary = run(cfg, callbacks=[rec])
    ev = summary["events"][0]
    after = [r for r in rec.rows if r[4] >= ev["resumed_s"] - 1e-3][:5]  # from the step that resumed
    steady = [r[2] for r in rec.rows[1:] if r[4] < ev["detected_s"]]
    return {"restored_from": ev["restored_from"], "lost_steps": ev["lost_steps"],
            "gap_s": round(ev["resumed_s"] - ev["detected_s"], 3),
            "steps_after": [{"step": s, "replayed": rp, "data_wait_ms": round(w * 1e3, 2),
                             "step_time_s": round(t, 3)} for s, rp, w, t, _ in after],
            "steady_data_wait_ms_median": round(statistics.median(steady) * 1e3, 2),
            "ledger": summary["samples"]}


def run_data_bench(configs: dict[str, int] | None = None,
                   out: str | os.PathLike | None = "benchmarks/results", recovery_run: bool = True) -> dict[str, Any]:
    """Run the data bench; write ``<out>/data.json`` and ``data.md``."""
    import ray

    configs = configs or CONFIGS
    started_ray = not ray.is_initialized()
    load_before, t0 = loadavg(), time.perf_counter()
    rows = []
    recovery = None
    with tempfile.TemporaryDirectory(prefix="raypod-bench-data-") as tmp:
        try:
            for name, steps in configs.items():
                rows.append(bench_config(name, steps, Path(tmp)))
                print(_line(rows[-1]), flush=True)
            if recovery_run:
                recovery = bench_recovery(Path(tmp))
                print(f"data bench recovery: {recovery}", flush=True)
        finally:
            if started_ray:
                ray.shutdown()
    result = {"suite": "data", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "cpu_count": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": loadavg(),
              "rows": rows, "recovery": recovery, "bench_wall_s": round(time.perf_counter() - t0, 1),
              "versions": module_versions("ray", "pyarrow", "torch")}
    write_results(result, out, "data", markdown(result))
    return result


def _line(r: dict[str, Any]) -> str:
    w = r["data_wait_frac"]
    return (f"data bench {r['config']}: stream {r['stream']['samples_per_s']} samples/s per rank vs training "
            f"{r['train_samples_per_s_per_rank']} (x{r['headroom']}); data_wait_frac mean {w['mean']:.4f}, "
            f"max {w['max']:.4f}; prepare {r['prepare_s']} s")


def markdown(r: dict[str, Any]) -> str:
    """The results as a Markdown section."""
    lines = [
        "# Data: Ray Data stream vs training consumption",
        "",
        f"{r['date']}; {r['cpu_count']} CPUs (shared), load average {r['loadavg_before']} -> "
        f"{r['loadavg_after']}; Ray {r['versions']['ray']}, CPU-only torch; 2 ranks on a local Ray.",
        "",
        "| config | tokenizer | samples/step | tokenise (Ray Data) | tokenised samples/s vs training "
        "(all ranks) | stream first row | stream samples/s per rank "
        "| training samples/s per rank | headroom | step time | data_wait_frac mean / max |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["rows"]:
        w = x["data_wait_frac"]
        lines.append(
            f"| `{x['config']}` | {x.get('tokenizer', 'utf8-bytes/v1')} | {x['global_batch']} "
            f"| {x['tokens'] / 1e6:.2f} M tokens in {x['prepare_s']} s "
            f"| {x.get('prepare_samples_per_s', 0):.0f} vs {x.get('train_samples_per_s', 0):.1f} "
            f"({x.get('prepare_headroom', 0):.0f}x) "
            f"| {x['stream']['first_row_s']} s | {x['stream']['samples_per_s']:.0f} "
            f"| {x['train_samples_per_s_per_rank']:.1f} | {x['headroom']:.0f}x | {x['step_time_s_median']:.2f} s "
            f"| {w['mean'] * 100:.3f}% / {w['max'] * 100:.3f}% |")
    rec = r.get("recovery")
    if rec:
        after = ", ".join(f"step {x['step']}: {x['data_wait_ms']} ms" for x in rec["steps_after"])
        lines += [
            "",
            f"Recovery (`tiny.yaml`, 1 spare, rank 1 killed mid-run; restored from {rec['restored_from']}, "
            f"{rec['lost_steps']} steps lost, gap {rec['gap_s']} s): data wait of the steps from the one that "
            f"resumed: {after} (steady state before the failure: median {rec['steady_data_wait_ms_median']} ms); "
            f"ledger {rec['ledger']}.",
        ]
    lines += ["", "| config | rank-like consumer: steps at | from the stream | assembled in the rank "
              "(warm-up / late) | wait mean / max (steps 11+) |", "|---|---:|---:|---:|---:|"]
    for x in r["rows"]:
        f = x["feed"]
        lines.append(f"| `{x['config']}` | {f['step_s']} s | {f['streamed']} | {f['local'] - f['late']} / "
                     f"{f['late']} | {f['wait_ms_mean_after_10']} ms / {f['wait_ms_max_after_10']} ms |")
    lines += [
        "",
        "- Stream: one rank's Ray Data pipeline alone (ids of its share per step, windows cut from the "
        f"token file), {STREAM_STEPS} steps; samples/s after its first row.",
        "- data_wait_frac: per step, the longest wait of any rank for its batch over the step time, "
        "steps 2 onward (a new stream's first batches are assembled in the rank while Ray Data starts). "
        "Goal: under 2%.",
        "- Training samples/s: median over steps 2 onward, per rank.",
        "- Rank-like consumer: a `StepFeed` (what a rank uses) taking one step every median step time of "
        "the job (at most 0.5 s), counting where each batch came from.",
        "",
        "Command: `raypod bench data` (or `python -m raypod.bench.data`).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny-steps", type=int, default=CONFIGS["tiny"])
    p.add_argument("--small-steps", type=int, default=CONFIGS["small"])
    p.add_argument("--hf-steps", type=int, default=CONFIGS["hf_llama"])
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated rows to run (default: all)")
    p.add_argument("--no-recovery", action="store_true", help="skip the recovery run")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    steps = {"tiny": args.tiny_steps, "small": args.small_steps, "hf_llama": args.hf_steps}
    run_data_bench({c: steps[c] for c in args.configs.split(",") if c}, out=args.out,
                   recovery_run=not args.no_recovery)
    return 0


def run(trials: int = 3, out: str | os.PathLike | None = "benchmarks/results") -> dict[str, Any]:
    """Entry point for ``raypod bench data`` (``trials`` scales the training steps)."""
    scale = max(1, trials) / 3
    return run_data_bench({k: max(4, round(v * scale)) for k, v in CONFIGS.items()}, out=out)


if __name__ == "__main__":
    raise SystemExit(main())
