"""How many ranks, spares and joiners: the driver's bookkeeping of the group's membership.

- A new group gets as many ranks as the cluster has room for, between
  ``scaling.min_workers`` and ``max_workers`` (:meth:`Membership.decide_world_size`).

- Spares are warm actors that replace lost ranks in place; the slots of replaced ranks
  become spares again once the group trained a step after the recovery (so a recovery's
  start-up never competes with a new spare's).
- Joiners are actors started while the job runs below ``scaling.max_workers`` and the
  cluster has room; once warm they join at a step boundary (the state is resharded in
  memory). After a shrink, the lost ranks' slots come back as joiners.

The scaling policy decides how many (:mod:`raypod.policies.scaling`); the group starts and
places them (:class:`raypod.protocol.WorkerGroupProtocol`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from raypod.config import ScalingConfig
from raypod.policies.scaling import ResizeDecision, ScalingPolicy
from raypod.protocol import WorkerGroupProtocol

log = logging.getLogger("raypod.driver")

_SCALE_CHECK_S = 0.5
"""How often a running job looks for room to grow."""


class Membership:
    """When to start joiners, add them, and turn replaced ranks' slots into spares.

    Args:
        scaling: the job's ``scaling`` section.
        policy: the scaling policy (how many joiners the free resources allow).
    """

    def __init__(self, scaling: ScalingConfig, policy: ScalingPolicy) -> None:
        self.cfg = scaling
        self.policy = policy
        self.growing = False
        """The job grows at the next step boundary: no step is submitted until then."""
        self.ready: list[Any] = []
        """Joiners that are warm and wait for the next step boundary."""
        self.next_check = 0.0
        self.refill_after = 0
        """Replaced ranks' slots become spares once a step after this one completed."""

    def decide_world_size(self, available: Callable[[], dict[str, float]]) -> int | str:
        """Ranks for the next group, or why there is no room (after ``scaling.schedule_timeout_s``)."""
        deadline = time.monotonic() + self.cfg.schedule_timeout_s
        best, reason = 0, ""
        settle = time.monotonic() + 2.0  # resources of a group just torn down come back
        note = settle + 1.0  # say what it waits for once the wait is more than a hiccup
        while True:
            free = available()
            decision = self.policy.decide(free)
            if isinstance(decision, ResizeDecision):
                best = decision.num_workers
                if best == self.cfg.max_workers or time.monotonic() > settle:
                    return best
            else:
                reason = decision.reason
                if time.monotonic() >= note:
                    note = time.monotonic() + 30.0
                    bundle = self.policy.bundle
                    log.warning("waiting for capacity: %d x %s for scaling.min_workers; the cluster has "
                                "%s free; giving up in %.0f s (scaling.schedule_timeout_s)",
                                self.cfg.min_workers, bundle, {k: round(free.get(k, 0.0), 2) for k in bundle},
                                max(0.0, deadline - time.monotonic()))
            if time.monotonic() > deadline:
                return best or reason
            time.sleep(0.1)

    def new_group(self) -> None:
        """A group was started from scratch: no joiner of the old one is waiting."""
        self.ready, self.growing = [], False

    def request_capacity(self, group: WorkerGroupProtocol) -> None:
        """Ask the Ray autoscaler for room for every rank up to ``max_workers`` (and spares)."""
        if group.world_size >= self.cfg.max_workers:
            return
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[dict(self.policy.bundle)] * (self.cfg.max_workers + self.cfg.spares))
        except Exception as e:  # noqa: BLE001 - a cluster without an autoscaler
            log.info("could not ask the autoscaler for more nodes: %s", e)

    def wants_to_grow(self, group: WorkerGroupProtocol, available: Callable[[], dict[str, float]]) -> bool:
        """Start joiners when the cluster has room; True once one is warm (grow at a step boundary)."""
        if group.world_size >= self.cfg.max_workers:
            return False
        now = time.monotonic()
        if now < self.next_check:
            return False
        self.next_check = now + _SCALE_CHECK_S
        for _ in range(self.policy.joiners_wanted(group.world_size, group.joining(), available())):
            group.add_joiner()
        self.ready += group.ready_joiners()
        return bool(self.ready)

    def take_ready(self, group: WorkerGroupProtocol) -> list[Any]:
        """The warm joiners the group has room for; the others are stopped."""
        room = self.cfg.max_workers - group.world_size
        added, extra = self.ready[:room], self.ready[room:]
        self.ready, self.growing = [], False
        if extra:
            group.drop_joiners(extra)
        return added

    def rejoin(self, group: WorkerGroupProtocol, freed: list[Any]) -> None:
        """After a shrink: the lost ranks' slots come back as joiners (up to ``max_workers``)."""
        for slot in freed[: self.cfg.max_workers - group.world_size]:
            group.add_joiner(slot)

    def refill(self, group: WorkerGroupProtocol, done_step: int) -> None:
        """Once the group trains again after a recovery, start the replaced ranks' spares."""
        if group.freed and done_step > self.refill_after:
            group.refill_spares()
