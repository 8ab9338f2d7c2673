"""Warm spares and joiners: actors started ahead of time so that a rank is replaced or
added without waiting for a process to start, import torch and load the data.

A spare waits (warm, rehearsed) to take a lost rank's place in an in-place recovery; a
joiner starts in the background and joins the group at a step boundary once it is warm
(growing the job, or bringing a shrunk job back to size). The :class:`SparePool` owns
both, with the placement groups they occupy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import placement_group, remove_placement_group

from raypod.config import JobConfig
from raypod.driver.rank_calls import describe, kill_quietly, remove_pg_quietly, unresponsive
from raypod.driver.topology import avoid_nodes
from raypod.recipe import Recipe

log = logging.getLogger("raypod.driver")


def node_of(placement: Placement) -> str | None:
    """The node id a placement's bundle is on (None when the GCS cannot say)."""
    pg, index = placement
    try:
        return ray.util.placement_group_table(pg).get("bundles_to_node_id", {}).get(index)
    except Exception:  # noqa: BLE001 - an unknown node only loses the preference
        return None

Placement = tuple[Any, int]
"""(placement group, bundle index) an actor occupies."""


class SparePool:
    """The group's warm spares, its joiners and the placements waiting to become spares.

    Args:
        config: the job config (``scaling.spares``).
        recipe: the recipe every actor warms up with.
        bundle: the resources of one rank.
        new_actor: starts a rank actor in a placement.
        excluded_nodes: returns the nodes no actor may be placed on (the group's set).
    """

    def __init__(self, config: JobConfig, recipe: Recipe, bundle: dict[str, float],
                 new_actor: Callable[[Any, int], Any], excluded_nodes: Callable[[], set[str]]) -> None:
        self.cfg, self.recipe, self.bundle = config, recipe, bundle
        self._new_actor, self._excluded = new_actor, excluded_nodes
        self.spares: list[tuple[Any, Placement]] = []
        """Warm actors ready to take a rank, with their placement."""
        self.warming: dict[int, Any] = {}
        """``id(actor) -> ref`` of each spare's warm-up call still running (its process may still be
        starting: it cannot answer a ping yet, and is not taken for dead for that)."""
        self.freed: list[Placement] = []
        """Placements that become spares at :meth:`refill` (once the group trains: after its
        first step, or again after a recovery), so that a spare's start slows neither the
        job's start nor a recovery down: the slots reserved by :meth:`place` and those of
        replaced ranks."""
        self.joiners: list[tuple[Any, Placement, Any]] = []
        """Actors starting in the background to join at a step boundary: (actor, placement, warm ref)."""
        self.spare_pg: Any = None
        self.extra_pgs: list[Any] = []
        """Single-bundle placement groups reserved for ranks added after the start."""

    # ---- spares --------------------------------------------------------------------
    def place(self) -> None:
        """Reserve ``scaling.spares`` slots, if the cluster has room right now; their actors
        start once the group has completed its first step (:meth:`refill`, as after a
        recovery), so that a spare's start (a process importing torch, its data, a rehearsal
        step) never competes with the ranks' own start for the node's CPUs."""
        n = self.cfg.scaling.spares
        if n <= 0:
            return
        # Placed like the ranks: spread ranks get spread spares (one node's loss leaves some,
        # and a replacement can come from the lost rank's own node).
        strategy = self.cfg.scaling.placement_strategy.removeprefix("STRICT_")  # spares fit where they can
        self.spare_pg = placement_group([dict(self.bundle)] * n, strategy=strategy,
                                        bundle_label_selector=avoid_nodes(self._excluded(), n))
        try:
            ray.get(self.spare_pg.ready(), timeout=2.0)
        except GetTimeoutError:
            log.warning("no room for %d spare worker(s) of %s; recovering with new actors instead",
                        n, self.bundle)
            remove_placement_group(self.spare_pg)
            self.spare_pg = None
            return
        self.freed.extend((self.spare_pg, i) for i in range(n))

    def _add_spare(self, placement: Placement) -> None:
        actor = self._new_actor(*placement)
        # Data and a rehearsal step, in the background.
        self.warming[id(actor)] = actor.warm.remote(self.cfg, self.recipe, True)
        self.spares.append((actor, placement))

    def _still_warming(self) -> tuple[set[int], set[int]]:
        """``(ids of spares still warming up, ids whose warm-up failed)``; forgets finished ones."""
        refs = {ref: key for key, ref in self.warming.items()}
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0) if refs else ([], [])
        failed: set[int] = set()
        for ref in done:
            key = refs[ref]
            del self.warming[key]
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 - its process or node is gone
                log.info("a spare's warm-up failed: %s", describe(e)[1])
                failed.add(key)
        return set(self.warming), failed

    def live(self) -> int:
        """Drop spares whose warm-up failed or that, warm, no longer answer a ping (their node is
        gone); a spare still starting up (a refill, importing torch on a busy host) is kept.
        Returns how many are left."""
        if not self.spares:
            return 0
        warming, failed = self._still_warming()
        asked = [i for i, (a, _) in enumerate(self.spares) if id(a) not in warming and id(a) not in failed]
        silent = {asked[j] for j in unresponsive([self.spares[i][0] for i in asked])}
        gone = silent | {i for i, (a, _) in enumerate(self.spares) if id(a) in failed}
        for i in sorted(gone, reverse=True):
            actor, _ = self.spares.pop(i)
            self.warming.pop(id(actor), None)
            log.warning("a spare worker does not answer (its node may be gone); not using it")
            kill_quietly(actor)
        return len(self.spares)

    def take(self, n: int, crowd: dict[str, int] | None = None) -> list[tuple[Any, Placement]]:
        """Pop up to ``n`` spares (with their placements), oldest first; with ``crowd`` (ranks
        per node that stay), those on the least crowded nodes first, each taken spare counting
        on its node (``crowd`` is updated). A replacement then keeps the ranks spread over the nodes, so every rank's
        replica stays on another node than the rank (a spare taken on the survivors' node
        would put a rank and the holder of its copy together: one node loss takes both)."""
        if crowd is None or n <= 0 or len(self.spares) <= 1:
            taken, self.spares = self.spares[:n], self.spares[n:]
            return taken
        taken: list[tuple[Any, Placement]] = []
        nodes = {id(actor): node_of(placement) for actor, placement in self.spares}
        for _ in range(min(n, len(self.spares))):
            # The least crowded node first; among equals, a spare that finished warming up.
            best = min(self.spares, key=lambda sp: (crowd.get(nodes[id(sp[0])] or "", 0),
                                                   id(sp[0]) in self.warming))
            self.spares.remove(best)
            taken.append(best)
            node = nodes[id(best[0])]
            if node:
                crowd[node] = crowd.get(node, 0) + 1
        return taken

    def refill(self) -> None:
        """Start spares in the placements of replaced ranks."""
        freed, self.freed = self.freed, []
        for placement in freed:
            self._add_spare(placement)

    # ---- joiners -------------------------------------------------------------------
    def add_joiner(self, placement: Placement | None = None) -> None:
        """Start an actor in the background (in ``placement``, or in a new one-bundle
        placement group) that joins the group at a step boundary once it is warm."""
        if placement is not None and placement[0] in self.extra_pgs:
            # A lost rank's own one-bundle group: when its node is gone Ray reschedules it,
            # and the GCS retries that in a busy loop for as long as it stays pending. A new
            # group goes wherever there is room now, or waits without that cost.
            self.release_pg(placement[0])
            placement = None
        if placement is None:
            pg = placement_group([dict(self.bundle)], strategy="PACK",
                                 bundle_label_selector=avoid_nodes(self._excluded(), 1))
            self.extra_pgs.append(pg)
            placement = (pg, 0)
        actor = self._new_actor(*placement)
        self.joiners.append((actor, placement, actor.warm.remote(self.cfg, self.recipe, True)))

    def ready_joiners(self) -> list[tuple[Any, Placement]]:
        """Joiners that are warm now (failed ones are dropped)."""
        if not self.joiners:
            return []
        refs = [ref for _, _, ref in self.joiners]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        out, keep = [], []
        for actor, placement, ref in self.joiners:
            if ref not in ready:
                keep.append((actor, placement, ref))
                continue
            try:
                ray.get(ref)
                out.append((actor, placement))
            except Exception as e:  # noqa: BLE001 - a joiner that failed to start is dropped
                log.warning("a joining worker failed to start: %s", describe(e)[1])
                self.release_pg(placement[0])
        self.joiners = keep
        return out

    def drop(self, joiners: list[tuple[Any, Placement]]) -> None:
        """Stop warm joiners the group has no room for and give back their own placement
        groups (kept, each would hold a bundle for nothing)."""
        for actor, (pg, _) in joiners:
            kill_quietly(actor)
            self.release_pg(pg)

    def release_pg(self, pg: Any) -> None:
        """Give back a joiner's or a lost rank's own placement group. Kept, it would stay
        pending once its node is gone, and Ray's GCS retries a pending group in a busy loop
        (measured: 2.3 million scheduling passes in 60 s, the GCS at 80% of a core, on a
        2-core machine a 50x slower step)."""
        if pg in self.extra_pgs:
            self.extra_pgs.remove(pg)
            remove_pg_quietly(pg)

    def shutdown(self) -> None:
        """Kill every spare and joiner and free their placement groups."""
        for a in [sp for sp, _ in self.spares] + [j for j, _, _ in self.joiners]:
            kill_quietly(a)
        for pg in (self.spare_pg, *self.extra_pgs):
            if pg is not None:
                remove_pg_quietly(pg)
        self.spares, self.spare_pg, self.joiners, self.extra_pgs, self.freed = [], None, [], [], []
        self.warming = {}
