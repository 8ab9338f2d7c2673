"""Logging overhead: a training step loop with the MLflow callback on against off.

The step is real CPU work (a torch matmul loop calibrated to ``step_ms``, about 50 ms),
run in the same process as the callback, so its thread competes with the step for
the CPU and the GIL: a pessimistic setting, since in a real job the step runs in the
worker actors and only the driver hosts the callback. Steps run in interleaved blocks,
off then on, so drift on the machine hits both sides alike. One callback lives through
the whole bench (its run setup, once per job, is timed apart); before every block an
untimed pause of one flush interval lets the previous block's last batch go out, and
the CPU time of the logging threads (raypod's sender, MLflow's system-metrics monitor)
is read from ``/proc`` over the timed part, so the full cost of logging is reported
even where it ran on the other core. The anchor is what the issue measured: a
synchronous MLflow call per step (``log_batch`` of the step's metrics) on the same store.

    python -m raypod.bench.logging --steps 600
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from raypod.bench.table import loadavg, module_versions, write_results

JOB = "bench-logging"


def _work(n: int, reps: int, a: Any, b: Any) -> None:
    for _ in range(reps):
        a = (a @ b).tanh_()


def _calibrate(step_ms: float, n: int = 256) -> tuple[int, Any, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g) / n ** 0.5
    _work(n, 20, a, b)  # warm up
    reps = 20
    while True:
        t = time.perf_counter()
        _work(n, reps, a, b)
        dt = time.perf_counter() - t
        if dt > 0.02:
            break
        reps *= 2
    per = dt / reps
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        _work(n, reps, a, b)
        samples.append((time.perf_counter() - t) / reps)
    per = statistics.median(samples)
    return max(1, round(step_ms / 1000 / per)), a, b


def _metrics(step: int, dt: float) -> dict[str, float]:
    return {"loss": 5.5 * 0.999 ** step, "lr": 3e-3, "grad_norm": 1.0, "step_time_s": dt,
            "compute_s": dt * 0.9, "samples_per_s": 16 / dt, "tokens_per_s": 2048 / dt,
            "world_size": 2.0, "data_wait_frac": 0.01, "goodput": 0.97, "failures": 0.0}


def _threads_cpu_s(tids: list[int]) -> float | None:
    """User + system CPU seconds of these threads of this process (Linux /proc)."""
    if not tids:
        return None
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for tid in tids:
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _sync_anchor(uri: str, run_id: str, calls: int = 30) -> float:
    """Mean seconds of one synchronous ``log_batch`` of a step's metrics on the store."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    times = []
    base = 10_000_000
    for i in range(calls):
        now = int(time.time() * 1000)
        metrics = [Metric(f"anchor/{k}", v, now, base + i) for k, v in _metrics(i, 0.05).items()]
        t = time.perf_counter()
        client.log_batch(run_id, metrics=metrics, synchronous=True)
        times.append(time.perf_counter() - t)
    return statistics.mean(times)


def run_logging_bench(steps: int = 600, out: str | os.PathLike | None = "benchmarks/results",
                      block: int = 50, step_ms: float = 50.0, threads: int = 1,
                      tracking_uri: str | None = None, flush_interval_s: float = 1.0) -> dict[str, Any]:
    """Measure wall time per step with MLflow logging on and off, interleaved.

    Args:
        steps: Steps per side (on and off each run this many).
        out: Folder for ``logging.json`` and ``logging.md`` (None: write nothing).
        block: Steps per interleaved block.
        step_ms: Target CPU work per step, in milliseconds.
        threads: torch intra-op threads for the step (1 leaves a core to the driver's
            other threads, as on a driver whose ranks run elsewhere).
        tracking_uri: Store to log to (default: a fresh local SQLite store, the demo's).
        flush_interval_s: The callback's seconds between metric batches.

    Returns:
        The figures written to ``logging.json``.
    """
    import torch

    from raypod.callbacks import JobInfo, StepReport
    from raypod.config import JobConfig
    from raypod.tracking import MLflowCallback

    torch.set_num_threads(threads)
    tmp = tempfile.TemporaryDirectory(prefix="raypod-bench-logging-")
    root = Path(tmp.name)
    uri = tracking_uri or f"sqlite:///{root}/mlflow.db"
    cfg = JobConfig.model_validate({
        "name": JOB, "recipe": {"target": "raypod.recipes.gpt:GPTRecipe", "args": {}},
        "checkpoint": {"storage": str(root / "runs")},
        "mlflow": {"tracking_uri": uri, "experiment": "raypod-bench"},
    })
    reps, a, b = _calibrate(step_ms)
    load_before = loadavg()
    times: dict[str, list[float]] = {"off": [], "on": []}
    hook_s: list[float] = []
    step = 0
    run_id = None
    rounds = max(1, -(-steps // block))

    def one_step(cb: MLflowCallback | None, start: float) -> None:
        nonlocal step
        step += 1
        t = time.perf_counter()
        _work(256, reps, a, b)
        if cb is not None:
            dt = time.perf_counter() - t
            h = time.perf_counter()
            cb.after_step(StepReport(step=step, metrics=_metrics(step, dt),
                                     time_s=time.time() - start))
            hook_s.append(time.perf_counter() - h)
        times["on" if cb is not None else "off"].append(time.perf_counter() - t)

    t_bench = time.perf_counter()
    try:
        start = time.time()
        cb = MLflowCallback(flush_interval_s=flush_interval_s)
        t = time.perf_counter()
        cb.before_job(JobInfo(config=cfg, job_dir=cfg.job_dir, start_time=start))
        run_id = cb.wait_run_id(120)
        setup_s = time.perf_counter() - t
        pause = cb.flush_interval_s + 0.3
        time.sleep(pause)  # the run's params and the system-metrics monitor are in
        tids = [th.native_id for th in threading.enumerate()
                if th.name in ("raypod-mlflow", "SystemMetricsMonitor") and th.native_id]
        cpu0 = _threads_cpu_s(tids)
        for r in range(rounds):
            n = min(block, steps - r * block)
            for side in ("off", "on"):
                time.sleep(pause)  # the last batch of the block before goes out untimed
                for _ in range(n):
                    one_step(cb if side == "on" else None, start)
        time.sleep(pause)
        cpu1 = _threads_cpu_s(tids)
        summary = {"status": "succeeded", "final_step": step}
        cb.before_summary(summary)
        cb.after_job(summary, str(root / "runs" / JOB / "summary.json"))
        sync_s = _sync_anchor(uri, run_id) if run_id else None
    finally:
        tmp.cleanup()
    wall = time.perf_counter() - t_bench
    logging_cpu_s = None if cpu0 is None or cpu1 is None else cpu1 - cpu0

    off, on = times["off"], times["on"]
    mean_off, mean_on = statistics.mean(off), statistics.mean(on)
    med_off, med_on = statistics.median(off), statistics.median(on)
    result: dict[str, Any] = {
        "suite": "logging",
        "steps_per_side": len(off),
        "block": block,
        "torch_threads": threads,
        "flush_interval_s": flush_interval_s,
        "store": "local SQLite (the demo's default)" if tracking_uri is None else tracking_uri,
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "off": {"mean_ms": round(mean_off * 1e3, 3), "median_ms": round(med_off * 1e3, 3)},
        "on": {"mean_ms": round(mean_on * 1e3, 3), "median_ms": round(med_on * 1e3, 3)},
        "overhead_mean_pct": round((mean_on / mean_off - 1) * 100, 3),
        "overhead_median_pct": round((med_on / med_off - 1) * 100, 3),
        "after_step_us": {"mean": round(statistics.mean(hook_s) * 1e6, 1),
                          "p99": round(sorted(hook_s)[int(len(hook_s) * 0.99)] * 1e6, 1)},
        "setup_s": round(setup_s, 3),
        "logging_threads_cpu_ms_per_step": None if logging_cpu_s is None
        else round(logging_cpu_s / len(on) * 1e3, 3),
        "logging_threads_cpu_pct_of_step": None if logging_cpu_s is None
        else round(logging_cpu_s / len(on) / mean_off * 100, 3),
        "sync_log_batch_ms": None if sync_s is None else round(sync_s * 1e3, 3),
        "sync_overhead_pct": None if sync_s is None else round(sync_s / mean_off * 100, 2),
        "bench_wall_s": round(wall, 1),
        "versions": module_versions("mlflow", "torch"),
    }
    _print(result)
    write_results(result, out, "logging", markdown(result))
    return result


def markdown(r: dict[str, Any]) -> str:
    """The results as a Markdown section."""
    return "\n".join([
        "# Logging overhead: MLflow callback on vs off",
        "",
        f"{r['steps_per_side']} steps per side of ~50 ms CPU work (torch matmul, "
        f"{r['torch_threads']} thread), interleaved in blocks of {r['block']}; store: {r['store']}; "
        f"{r['cpu_count']} CPUs, load average {r['loadavg_before']} -> {r['loadavg_after']}.",
        "",
        "| | mean step (ms) | median step (ms) |",
        "|---|---:|---:|",
        f"| logging off | {r['off']['mean_ms']:.2f} | {r['off']['median_ms']:.2f} |",
        f"| MLflow callback on | {r['on']['mean_ms']:.2f} | {r['on']['median_ms']:.2f} |",
        f"| **on / off** | **{1 + r['overhead_mean_pct'] / 100:.4f}** "
        f"({r['overhead_mean_pct']:+.2f}%) | {1 + r['overhead_median_pct'] / 100:.4f} "
        f"({r['overhead_median_pct']:+.2f}%) |",
        "",
        f"- The logging threads (raypod's sender and MLflow's system-metrics monitor) used "
        f"{r['logging_threads_cpu_ms_per_step']} ms of CPU per logged step "
        f"({r['logging_threads_cpu_pct_of_step']}% of a step), wherever it ran.",
        f"- Run setup (once per job, in the background): {r['setup_s']} s.",
        f"- `after_step` itself: mean {r['after_step_us']['mean']} µs, p99 {r['after_step_us']['p99']} µs.",
        f"- Anchor, a synchronous `log_batch` of one step's metrics on the same store: "
        f"{r['sync_log_batch_ms']} ms, i.e. {r['sync_overhead_pct']}% of a step if done inline.",
        "",
        "Command: `python -m raypod.bench.logging` (or `raypod bench logging`).",
        "",
    ])


def _print(r: dict[str, Any]) -> None:
    print(f"logging bench: off {r['off']['mean_ms']:.2f} ms/step, on {r['on']['mean_ms']:.2f} ms/step "
          f"-> overhead {r['overhead_mean_pct']:+.2f}% (median {r['overhead_median_pct']:+.2f}%); "
          f"after_step {r['after_step_us']['mean']} µs; a synchronous log_batch would cost "
          f"{r['sync_log_batch_ms']} ms ({r['sync_overhead_pct']}% of a step)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600, help="steps per side")
    p.add_argument("--block", type=int, default=50, help="steps per interleaved block")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the step")
    p.add_argument("--tracking-uri", default=None, help="log to this store instead of a local SQLite one")
    p.add_argument("--flush-interval", type=float, default=1.0, help="seconds between batches")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    run_logging_bench(steps=args.steps, out=args.out, block=args.block, threads=args.threads,
                      tracking_uri=args.tracking_uri, flush_interval_s=args.flush_interval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def run(trials: int = 3, out: str | os.PathLike | None = "benchmarks/results") -> dict[str, Any]:
    """Entry point for ``raypod bench logging`` (``trials`` sets the length: 200 steps each)."""
    return run_logging_bench(steps=200 * max(1, trials), out=out)
