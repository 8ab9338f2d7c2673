"""The driver's CPU to collect a step's streamed results (step windows), two ways.

``old``: one ``ray.wait([stream])`` and one ``ray.get`` per result (285e551's
``InFlight._collect_stream``); ``new``: ``InFlight.poll`` as it is (one ``ray.get`` for every
result ready in a poll, ``next_ready`` instead of a wait per item). N no-op actors
(:class:`raypod.bench.scale.NoOp`) each stream :data:`raypod.bench.scale.STREAM_ITEMS` step
results; the figure is the driver's CPU (``time.process_time``) per step of N results, the
median of 6 rounds, two alternating rounds per way.

    .venv/bin/python benchmarks/stream_collect_probe.py 16 32
"""

from __future__ import annotations

import statistics
import sys

import ray

from raypod.bench.scale import NoOp, stream_collect_s
from raypod.driver.inflight import InFlight


def _per_item(calls: InFlight) -> None:
    """285e551's collection: a ``ray.wait`` and a ``ray.get`` per result."""
    while len(calls):
        ready, _ = ray.wait(list(calls._pending), num_returns=len(calls._pending), timeout=1.0)
        for gen in ready:
            rank, what, _ = calls._pending[gen]
            while ray.wait([gen], timeout=0)[0]:
                try:
                    ref = next(gen)
                except StopIteration:
                    del calls._pending[gen]
                    break
                value = ray.get(ref)
                calls._pending[gen] = (rank, what, value.step + 1)


def main(ranks: list[int]) -> None:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    for n in ranks:
        noops = [ray.remote(NoOp).options(num_cpus=0).remote() for _ in range(n)]
        ray.get([a.noop.remote() for a in noops])
        out: dict[str, list[float]] = {}
        for way in ("old", "new", "old", "new"):
            collect = _per_item if way == "old" else None
            out.setdefault(way, []).append(statistics.median(stream_collect_s(noops, collect) for _ in range(6)))
        print(f"N={n}: " + "; ".join(f"{w} " + " / ".join(f"{v * 1e3:.2f}" for v in vs) for w, vs in out.items())
              + " ms of driver CPU per step of N results")
        for a in noops:
            ray.kill(a)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [16, 32])
