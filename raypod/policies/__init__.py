"""The driver's policies: they decide, the driver acts; none of them touches a worker.

- :mod:`~raypod.policies.failures`: retry a failure or fail the job (``fault.max_failures``).
- :mod:`~raypod.policies.scaling`: how many ranks a group gets; shrink and grow while running.
- :mod:`~raypod.policies.health`: hung ranks, bad losses, stragglers, throughput collapse.
- :mod:`~raypod.policies.cadence`: which steps take an in-memory snapshot.
- :mod:`~raypod.policies.recovery_source`: memory or checkpoint, whichever resumes soonest.

:func:`policies_for` builds them from a job's config; the :class:`~raypod.driver.controller.Driver`
is handed them (a test can hand it others).
"""

from __future__ import annotations

from dataclasses import dataclass

from raypod.config import JobConfig
from raypod.policies.cadence import SnapshotCadence
from raypod.policies.failures import FailurePolicy
from raypod.policies.health import LossRule, StragglerTracker, ThroughputWatch
from raypod.policies.scaling import ScalingPolicy


@dataclass
class Policies:
    """Every policy one job's driver consults (stateful ones hold this job's history)."""

    failure: FailurePolicy
    scaling: ScalingPolicy
    cadence: SnapshotCadence
    loss: LossRule
    stragglers: StragglerTracker
    throughput: ThroughputWatch


def policies_for(config: JobConfig) -> Policies:
    """The policies ``config`` asks for (``fault``, ``scaling``, ``checkpoint`` sections)."""
    f, c = config.fault, config.checkpoint
    replicas = config.parallel.replicas if config.parallel.strategy == "hsdp" else 1
    return Policies(
        failure=FailurePolicy(f.max_failures),
        scaling=ScalingPolicy(config.scaling, replicas),
        cadence=SnapshotCadence(c.memory_every_steps, c.memory_stall_budget, c.memory_max_every),
        loss=LossRule(f.loss_spike_factor),
        stragglers=StragglerTracker(f.straggler_factor, f.straggler_steps),
        throughput=ThroughputWatch(f.throughput_alert_ratio),
    )
