"""Spares on a real local Ray: one still starting up is kept, one whose process died is dropped."""

from __future__ import annotations

import time

import pytest
from support import tiny_job

pytestmark = pytest.mark.slow


def test_a_starting_spare_is_kept_and_a_dead_one_dropped(ray_connected, tmp_path):
    import ray

    from raypod.driver.spares import SparePool
    from raypod.recipe import Recipe

    @ray.remote(num_cpus=0)
    class Spare:
        def __init__(self, start_s: float) -> None:
            time.sleep(start_s)  # a process still importing torch on a busy host: no answer yet

        def warm(self, config, recipe, rehearse):  # noqa: ANN001, ANN201
            return {}

        def ping(self) -> int:
            return 0

    starts = iter([8.0, 0.0])
    pool = SparePool(tiny_job(tmp_path), Recipe(), {"CPU": 0}, lambda pg, i: Spare.remote(next(starts)),
                     lambda: set())
    pool._add_spare(("pg", 0))  # starting: its warm-up and pings wait 8 s
    pool._add_spare(("pg", 1))  # up
    slow, quick = (a for a, _ in pool.spares)
    ray.get(quick.ping.remote())
    assert pool.live() == 2  # the starting one is not taken for dead
    ray.kill(quick)
    time.sleep(1.0)
    assert pool.live() == 1 and pool.spares[0][0] is slow
    pool.shutdown()
