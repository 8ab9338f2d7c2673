"""The group of Ray actors that hosts the ranks: placement, rendezvous, calls, polling.

The driver talks to the group only through this class, so unit tests swap in a fake
(``Driver.worker_group_cls``) and drive the state machine one iteration at a time.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raypod.checkpoint import CommittedCheckpoint
from raypod.config import FaultInjection, JobConfig, recipe_pythonpath
from raypod.driver.scaling import worker_bundle
from raypod.recipe import Recipe
from raypod.worker.actor import remote_worker_class

log = logging.getLogger("raypod.driver")

# After the first error, every rank is pinged (on a thread of its actor's own, which
# answers even inside a collective); a rank that does not answer within this time is
# taken for dead, so that a dead rank (or a lost node) is blamed rather than the peer
# whose collective broke because of it.
_PING_TIMEOUT_S = 0.5
# After a failure, calls still running this long are interrupted (a live rank waiting on a
# peer that gave up returns at once); a call still running ``drain``'s timeout after that
# is hung, and its rank lost.
_INTERRUPT_AFTER_S = 1.0
# How long a rank may take to replicate a step's snapshot before the driver stops
# waiting for it (the step still completes; its replica is just not there).
_REPLICA_WAIT_S = 60.0


@dataclass
class WorkerError:
    """An error raised by one rank's call."""

    rank: int
    step: int
    kind: str
    """``worker_died``, ``exception`` (the rank's code raised), ``injected`` or ``storage``
    (a write to ``checkpoint.storage`` failed for good: full, over quota, read-only)."""
    message: str


@dataclass
class PollResult:
    """What arrived from the ranks since the last poll."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    """Per-rank ``train_step`` results."""
    saved: list[tuple[int, list[int]]] = field(default_factory=list)
    """``(rank, [steps whose save finished])``."""
    errors: list[WorkerError] = field(default_factory=list)
    replicated: list[tuple[int, int, bool]] = field(default_factory=list)
    """``(rank, step, ok)``: the rank's snapshot of ``step`` reached its replica holder."""


class GroupStartError(RuntimeError):
    """The group could not be placed or set up."""

    def __init__(self, message: str, kind: str = "setup_failed", rank: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.rank = rank


def _describe(e: BaseException) -> tuple[str, str]:
    """``(kind, one line)`` for an exception from a rank call."""
    if isinstance(e, RayActorError):
        return "worker_died", "the worker process died"
    if isinstance(e, RayTaskError):
        cause = e.cause if e.cause is not None else e
        if type(cause).__name__ == "StorageError":  # raypod.checkpoint.fs: one sentence already
            return "storage", str(cause)
        kind = "injected" if type(cause).__name__ == "InjectedFault" else "exception"
        return kind, f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
    return "exception", f"{type(e).__name__}: {e}"


def hsdp_twins(strategy: str, replicas: int, world_size: int) -> list[int | None] | None:
    """With HSDP, the rank of the next replica that holds the same shard as each rank.

    HSDP replicas hold identical shards (same gradients, same update), so a lost rank's
    state is already in its twin's own snapshot and nothing needs replicating. ``None``
    when the job is not HSDP with two or more replicas (mesh as in ``build_mesh``).
    """
    if strategy != "hsdp" or replicas < 2 or world_size % replicas:
        return None
    shard = world_size // replicas
    return [(r + shard) % world_size for r in range(world_size)]


def peer_ring(nodes: list[str]) -> list[int | None]:
    """Who holds each rank's replica: the rank ``k`` places on, ``k`` = most ranks on a node.

    With ranks contiguous per node and two or more nodes, that is always a rank on
    another node, so a whole node can go; on one node it is the next rank. A single
    rank has no peer.
    """
    n = len(nodes)
    if n < 2:
        return [None] * n
    per_node = max(nodes.count(x) for x in set(nodes))
    k = per_node if len(set(nodes)) > 1 and per_node < n else 1
    return [(r + k) % n for r in range(n)]


def avoid_nodes(excluded: set[str], bundles: int) -> list[dict[str, str]] | None:
    """A placement-group label selector that keeps every bundle off the ``excluded`` nodes."""
    if not excluded:
        return None
    return [{"ray.io/node-id": f"!in({','.join(sorted(excluded))})"}] * bundles


class WorkerGroup:
    """One placement group and one actor per rank.

    Args:
        config: the job config.
        recipe: the recipe instance every rank receives.
    """

    def __init__(self, config: JobConfig, recipe: Recipe) -> None:
        self.cfg = config
        self.recipe = recipe
        path = recipe_pythonpath(config)
        self.runtime_env: dict[str, Any] | None = None
        """The ranks' runtime env: ``PYTHONPATH`` holds the folder of a recipe module that the
        driver imported from ``recipe.import_dirs`` (the ranks unpickle the recipe from it)."""
        if path:
            old = os.environ.get("PYTHONPATH")
            self.runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join([*path, *([old] if old else [])])}}
        self.bundle = worker_bundle(config.scaling)
        self.actors: list[Any] = []
        self.placement: list[tuple[Any, int]] = []
        """Per rank: (placement group, bundle index) its actor occupies."""
        self.spares: list[tuple[Any, tuple[Any, int]]] = []
        """Warm actors ready to take a rank, with their placement."""
        self.freed: list[tuple[Any, int]] = []
        """Placements of replaced ranks that become spares at :meth:`refill_spares` (once the
        group trains again, so that a new spare's start does not slow the recovery down)."""
        self.pg = None
        self.spare_pg = None
        self.world_size = 0
        self.nodes: list[str] = []
        self.node_ips: list[str] = []
        self.peer_to: list[int | None] = []
        """Per rank: the rank its snapshots are replicated to (``None``: no replication)."""
        self.twins: list[int | None] | None = None
        """HSDP: per rank, the rank whose own snapshots equal it (see :func:`hsdp_twins`)."""
        self._pending: dict[Any, tuple[int, str, int]] = {}
        self.joiners: list[tuple[Any, tuple[Any, int], Any]] = []
        """Actors starting in the background to join at a step boundary: (actor, placement, warm ref)."""
        self.extra_pgs: list[Any] = []
        """Single-bundle placement groups reserved for ranks added after the start."""
        self.excluded_nodes: set[str] = set()
        """Nodes the ranks must not be placed on (failed a pre-flight check, or lost ranks repeatedly)."""

    # ---- lifecycle ---------------------------------------------------------------
    def _new_actor(self, pg: Any, index: int) -> Any:
        extra = {k: v for k, v in self.bundle.items() if k not in ("CPU", "GPU")}
        return remote_worker_class().options(
            num_cpus=self.bundle.get("CPU", 0), num_gpus=self.bundle.get("GPU", 0),
            resources=extra or None, runtime_env=self.runtime_env,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index),
        ).remote(int(self.bundle.get("CPU", 1)) or 1)

    def _place_spares(self) -> None:
        """Reserve and warm ``scaling.spares`` actors, if the cluster has room right now."""
        n = self.cfg.scaling.spares
        if n <= 0:
            return
        self.spare_pg = placement_group([dict(self.bundle)] * n, strategy="PACK",
                                        bundle_label_selector=avoid_nodes(self.excluded_nodes, n))
        try:
            ray.get(self.spare_pg.ready(), timeout=2.0)
        except GetTimeoutError:
            log.warning("no room for %d spare worker(s) of %s; recovering with new actors instead",
                        n, self.bundle)
            remove_placement_group(self.spare_pg)
            self.spare_pg = None
            return
        for i in range(n):
            self._add_spare(self.spare_pg, i)

    def _add_spare(self, pg: Any, index: int) -> None:
        actor = self._new_actor(pg, index)
        actor.warm.remote(self.cfg, self.recipe, True)  # data and a rehearsal step, in the background
        self.spares.append((actor, (pg, index)))

    def start(self, world_size: int, attempt: int, restore: CommittedCheckpoint | None,
              injections: list[tuple[int, FaultInjection]]) -> dict[str, Any]:
        """Place ``world_size`` ranks, rendezvous, build, and restore ``restore``.

        Raises:
            GroupStartError: placement timed out or a rank failed to set up.
        """
        timeout = self.cfg.scaling.schedule_timeout_s
        self.pg = placement_group([dict(self.bundle)] * world_size,
                                  strategy=self.cfg.scaling.placement_strategy,
                                  bundle_label_selector=avoid_nodes(self.excluded_nodes, world_size))
        try:
            ray.get(self.pg.ready(), timeout=timeout)
        except GetTimeoutError:
            raise GroupStartError(f"could not place {world_size} ranks of {self.bundle} within "
                                  f"{timeout:.0f} s (scaling.schedule_timeout_s)",
                                  kind="scheduling") from None
        self.actors = [self._new_actor(self.pg, i) for i in range(world_size)]
        self.placement = [(self.pg, i) for i in range(world_size)]
        self.world_size = world_size
        self._place_spares()
        try:
            infos = ray.get([a.node_info.remote() for a in self.actors], timeout=timeout)
            # Ranks on one node are contiguous (HSDP shards within a node).
            order = sorted(range(world_size), key=lambda i: (infos[i]["node_id"] != infos[0]["node_id"],
                                                           infos[i]["node_id"], i))
            self.actors = [self.actors[i] for i in order]
            self.placement = [self.placement[i] for i in order]
            self.nodes = [infos[i]["node_id"] for i in order]
            self.node_ips = [infos[i]["ip"] for i in order]
            self._plan_peers()
            init_method = self._rendezvous(infos[order[0]]["ip"], timeout)
            restore_arg = (restore.path, restore.step, restore.metadata_sha256) if restore else None
            refs = [a.setup.remote(self.cfg, self.recipe, r, world_size, init_method, injections,
                                   attempt, restore_arg, self._peers(r))
                    for r, a in enumerate(self.actors)]
            results = self._get_all(refs, timeout=max(timeout, self.cfg.fault.pg_timeout_s))
        except GroupStartError:
            raise
        except Exception as e:  # noqa: BLE001 - any setup failure is reported as one
            kind, msg = _describe(e)
            raise GroupStartError(f"a rank failed to start: {msg}", kind=kind) from None
        loads = [r["load_s"] for r in results if r.get("load_s") is not None]
        return {"num_samples": results[0]["num_samples"],
                "setup_s": max(r["setup_s"] for r in results),
                "load_s": max(loads) if loads else None,
                "doctor": [r["doctor"] for r in results if r.get("doctor")]}

    def _rendezvous(self, ip: str, timeout: float) -> str:
        port = ray.get(self.actors[0].open_rendezvous.remote(len(self.actors), self.cfg.fault.pg_timeout_s),
                       timeout=timeout)
        return f"tcp://{ip}:{port}"

    def _plan_peers(self) -> None:
        """Where each rank's in-memory state survives its loss: an HSDP twin or a peer replica."""
        p = self.cfg.parallel
        self.twins = hsdp_twins(p.strategy, p.replicas, self.world_size)
        self.peer_to = [None] * self.world_size if self.twins else peer_ring(self.nodes)

    def holder_of(self, rank: int) -> int | None:
        """The rank that can give ``rank``'s state back: its HSDP twin or its replica holder."""
        if self.twins:
            return self.twins[rank]
        return self.peer_to[rank] if self.peer_to else None

    def _peers(self, rank: int) -> tuple[int | None, int | None]:
        """(rank this one replicates to, rank that replicates to this one)."""
        to = self.peer_to[rank] if self.peer_to else None
        frm = self.peer_to.index(rank) if to is not None else None
        return to, frm

    # ---- in-place recovery -------------------------------------------------------
    def drain(self, timeout: float, attempt: int | None = None) -> set[int]:
        """After a failure: let every call in flight finish or fail; return the lost ranks.

        A rank is lost when its actor died, or when its call is still running after
        ``timeout`` (hung, even though its peers' collectives broke). ``attempt`` (the
        attempt the ranks are in) keeps a late interrupt from reaching a rejoined rank.
        """
        lost: set[int] = set()
        # A replica wait may hang on an exchange with the dead peer until its own timeout;
        # it says nothing about its rank, which the regroup releases (not waited for).
        work = lambda: [ref for ref, (_, what, _) in self._pending.items() if what != "replica"]  # noqa: E731
        busy = lambda: {rank for rank, what, _ in self._pending.values() if what != "replica"}  # noqa: E731
        first = min(timeout, _INTERRUPT_AFTER_S)

        def settle(deadline: float) -> None:
            while work() and time.monotonic() < deadline:
                refs = work()
                ready, _ = ray.wait(refs, num_returns=len(refs),
                                    timeout=max(0.0, deadline - time.monotonic()))
                if not ready:
                    break
                out = PollResult()
                self._collect(ready, out)
                lost.update(e.rank for e in out.errors if e.kind == "worker_died")

        settle(time.monotonic() + first)
        stuck = sorted(busy() - lost)
        if stuck:
            # Still running: hung, or alive but waiting on something the failure broke (its
            # peers at the start of a step, when one of them gave up the collective because
            # of the lost rank; a replica round with the lost peer). A live rank is told to
            # give up its call; a rank that then returns keeps its process and its copies.
            refs = {self.actors[r].interrupt.remote(attempt): r for r in stuck}
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=_PING_TIMEOUT_S)
            for ref in ready:
                try:
                    where = ray.get(ref)
                except Exception:  # noqa: BLE001 - the actor is gone
                    continue
                log.info("rank %d's call still ran %.1f s after the failure (step %s, phase %s "
                         "for %.1f s): interrupted", refs[ref], first,
                         where.get("step"), where.get("phase"), where.get("in_phase_s", 0.0))
            settle(time.monotonic() + timeout)
        lost |= busy()
        self._pending.clear()
        return lost

    def unresponsive(self, actors: list[Any], timeout: float = _PING_TIMEOUT_S) -> set[int]:
        """Indices of ``actors`` that do not answer a ping within ``timeout`` seconds.

        The ping runs on a thread of the actor's own, so a live rank answers at once even
        while its main thread is inside a collective; a dead process or a lost node does not.
        """
        refs = {a.ping.remote(): i for i, a in enumerate(actors)}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        dead = {i for r, i in refs.items() if r not in ready}
        for r in ready:
            try:
                ray.get(r)
            except Exception:  # noqa: BLE001 - the actor is gone
                dead.add(refs[r])
        return dead

    def node_of(self, rank: int) -> str:
        """``node IP (node id)`` of ``rank``, for the lines that name a lost rank."""
        if not 0 <= rank < len(self.nodes):
            return "an unknown node"
        ip = self.node_ips[rank] if rank < len(self.node_ips) else "?"
        return f"node {ip} ({self.nodes[rank][:8]})"

    def kill(self, ranks: set[int]) -> None:
        """End the processes of ``ranks`` now (their slots are refilled by recover_in_place)."""
        for r in ranks:
            try:
                ray.kill(self.actors[r], no_restart=True)
            except Exception:  # noqa: BLE001 - usually already dead
                pass

    def memory_reports(self, ranks: list[int], timeout: float = 5.0) -> dict[int, dict[str, Any]]:
        """What each live rank holds in memory right now (own snapshots, replicas)."""
        refs = [self.actors[r].memory_report.remote() for r in ranks]
        return dict(zip(ranks, ray.get(refs, timeout=timeout), strict=True))

    def recover_in_place(self, lost: set[int], restore_step: int, attempt: int,
                         injections: list[tuple[int, FaultInjection]]) -> dict[str, Any]:
        """Replace ``lost`` ranks (spares first), re-form the group, restore from memory.

        Survivors keep their processes; replacements get their shard from the peer
        that holds its replica. Nothing is read from storage.

        Raises:
            GroupStartError: a replacement or the new rendezvous failed.
        """
        t0 = time.perf_counter()
        moves = [(self.holder_of(d), d, d) for d in sorted(lost)]
        self._replace(lost)
        t1 = time.perf_counter()
        try:
            info = self._regroup(lambda r, a, init: a.reconfigure.remote(
                self.cfg, self.recipe, r, self.world_size, init, injections, attempt, self._peers(r),
                restore_step, moves))
        except GroupStartError:
            raise
        except Exception as e:  # noqa: BLE001
            kind, msg = _describe(e)
            raise GroupStartError(f"in-place recovery failed: {msg}", kind=kind) from None
        info["recover_s"] = time.perf_counter() - t0
        info["driver_phases_s"]["replace"] = t1 - t0
        return {**info, "replaced": sorted(lost), "spares_left": len(self.spares)}

    def load_in_place(self, lost: set[int], restore: CommittedCheckpoint, attempt: int,
                      injections: list[tuple[int, FaultInjection]]) -> dict[str, Any]:
        """Replace ``lost`` ranks (spares first), re-form the group, and load the committed
        checkpoint ``restore`` on every rank: survivors keep their processes.

        Raises:
            GroupStartError: a replacement, the new rendezvous or a rank's load failed.
        """
        t0 = time.perf_counter()
        self._replace(lost)
        t1 = time.perf_counter()
        try:
            info = self._regroup(lambda r, a, init: a.reload.remote(
                self.cfg, self.recipe, r, self.world_size, init, injections, attempt, self._peers(r),
                restore.path, restore.step, restore.metadata_sha256))
        except GroupStartError:
            raise
        except Exception as e:  # noqa: BLE001
            kind, msg = _describe(e)
            raise GroupStartError(f"loading checkpoint step {restore.step} in place failed: {msg}",
                                  kind=kind) from None
        info["recover_s"] = time.perf_counter() - t0
        info["driver_phases_s"]["replace"] = t1 - t0
        return {**info, "replaced": sorted(lost), "spares_left": len(self.spares)}

    def _replace(self, lost: set[int]) -> None:
        """End the ``lost`` ranks' processes and put a spare (or a new actor in the rank's
        own slot) in their place; a slot a spare took over becomes the next spare."""
        self.kill(lost)
        self.live_spares()  # a spare on a lost node went with it
        for d in sorted(lost):
            freed = self.placement[d]
            if self.spares:
                actor, placement = self.spares.pop(0)
            else:
                actor, placement = self._new_actor(*freed), freed
                freed = None
            self.actors[d], self.placement[d] = actor, placement
            if freed is not None:
                self.freed.append(freed)  # the lost rank's slot becomes the next spare

    def _regroup(self, call: Any) -> dict[str, Any]:
        """Locate every rank, open a rendezvous on rank 0, run ``call(rank, actor, init_method)``
        on every rank (a ``reconfigure`` or ``reshape``) and sum up its results."""
        timeout = self.cfg.scaling.schedule_timeout_s
        t0 = time.perf_counter()
        infos = ray.get([a.node_info.remote() for a in self.actors], timeout=timeout)
        self.nodes = [i["node_id"] for i in infos]
        self.node_ips = [i["ip"] for i in infos]
        self._plan_peers()
        init_method = self._rendezvous(infos[0]["ip"], timeout)
        t1 = time.perf_counter()
        refs = [call(r, a, init_method) for r, a in enumerate(self.actors)]
        results = self._get_all(refs, timeout=max(timeout, self.cfg.fault.pg_timeout_s))
        slowest = max(results, key=lambda r: r["reconfigure_s"])
        return {"slowest_rank_phases_s": slowest["phases_s"],
                "driver_phases_s": {"locate": t1 - t0, "reconfigure": time.perf_counter() - t1},
                "received_bytes": sum(r["received_bytes"] for r in results)}

    def refill_spares(self) -> None:
        """Start spares in the slots of replaced ranks (the driver calls this once the group
        completed a step after the recovery)."""
        freed, self.freed = self.freed, []
        for placement in freed:
            self._add_spare(*placement)

    # ---- resizing ------------------------------------------------------------------
    def live_spares(self) -> int:
        """Drop spares that no longer answer (their node is gone); returns how many are left."""
        if self.spares:
            for i in sorted(self.unresponsive([a for a, _ in self.spares]), reverse=True):
                actor, _ = self.spares.pop(i)
                log.warning("a spare worker does not answer (its node may be gone); not using it")
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
        return len(self.spares)

    def add_joiner(self, placement: tuple[Any, int] | None = None) -> None:
        """Start an actor in the background (in ``placement``, or in a new one-bundle
        placement group) that joins the group at a step boundary once it is warm."""
        if placement is not None and placement[0] in self.extra_pgs:
            # A lost rank's own one-bundle group: when its node is gone Ray reschedules it,
            # and the GCS retries that in a busy loop for as long as it stays pending. A new
            # group goes wherever there is room now, or waits without that cost.
            self._release_pg(placement[0])
            placement = None
        if placement is None:
            pg = placement_group([dict(self.bundle)], strategy="PACK",
                                 bundle_label_selector=avoid_nodes(self.excluded_nodes, 1))
            self.extra_pgs.append(pg)
            placement = (pg, 0)
        actor = self._new_actor(*placement)
        self.joiners.append((actor, placement, actor.warm.remote(self.cfg, self.recipe, True)))

    def ready_joiners(self) -> list[tuple[Any, tuple[Any, int]]]:
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
                log.warning("a joining worker failed to start: %s", _describe(e)[1])
                self._release_pg(placement[0])
        self.joiners = keep
        return out

    def _release_pg(self, pg: Any) -> None:
        """Give back a joiner's or a lost rank's own placement group. Kept, it would stay
        pending once its node is gone, and Ray's GCS retries a pending group in a busy loop
        (measured: 2.3 million scheduling passes in 60 s, the GCS at 80% of a core, on a
        2-core machine a 50x slower step)."""
        if pg in self.extra_pgs:
            self.extra_pgs.remove(pg)
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - already gone with its node
                pass

    def reshard(self, lost: set[int], added: list[tuple[Any, tuple[Any, int]]], restore_step: int,
                attempt: int, injections: list[tuple[int, FaultInjection]]) -> dict[str, Any]:
        """Re-form the group at another size, resharding the state after ``restore_step`` in memory.

        Survivors keep their processes, ``lost`` ranks go, ``added`` actors (warm spares or
        joiners) come in after the survivors. Each old rank's state is cut into the new
        ranks' pieces by the rank itself or, for a lost rank, by the holder of its replica,
        and travels through the object store. Returns the freed placements in ``freed``.

        Raises:
            GroupStartError: a lost rank's state has no live copy, or a rank failed.
        """
        t0 = time.perf_counter()
        old_world = self.world_size
        exporter = {i: (i if i not in lost else self.holder_of(i)) for i in range(old_world)}
        if any(e is None or e in lost for e in exporter.values()):
            raise GroupStartError("a lost rank's in-memory state has no live copy")
        by_exporter: dict[int, list[int]] = {}
        for i, e in exporter.items():
            by_exporter.setdefault(e, []).append(i)
        survivors = [r for r in range(old_world) if r not in lost]
        new_actors = [self.actors[r] for r in survivors] + [a for a, _ in added]
        new_world = len(new_actors)
        timeout = self.cfg.scaling.schedule_timeout_s
        try:
            refs = [self.actors[e].export_reshard.remote(restore_step, srcs, old_world, new_world)
                    for e, srcs in by_exporter.items()]
            exported: dict[int, list[Any]] = {}
            for part in self._get_all(refs, timeout=max(timeout, self.cfg.fault.pg_timeout_s)):
                exported.update(part)
            t1 = time.perf_counter()
            freed = [self.placement[r] for r in sorted(lost)]
            self.kill(lost)
            self.actors = new_actors
            self.placement = [self.placement[r] for r in survivors] + [p for _, p in added]
            self.world_size = new_world
            info = self._regroup(lambda j, a, init: a.reshape.remote(
                self.cfg, self.recipe, j, new_world, init, injections, attempt, self._peers(j), restore_step,
                old_world, [exported[i][j] for i in range(old_world)]))
        except GroupStartError:
            raise
        except Exception as e:  # noqa: BLE001
            kind, msg = _describe(e)
            raise GroupStartError(f"resharding in memory failed: {msg}", kind=kind) from None
        info["recover_s"] = time.perf_counter() - t0
        info["driver_phases_s"]["export"] = t1 - t0
        return {**info, "replaced": sorted(lost), "freed": freed, "old_world": old_world,
                "new_world": new_world}

    # ---- health ------------------------------------------------------------------
    def heartbeats(self, timeout: float) -> dict[int, dict[str, Any] | None]:
        """Where each rank is (step, phase); ``None`` for a rank that did not answer in time."""
        refs = {a.heartbeat.remote(): r for r, a in enumerate(self.actors)}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        out: dict[int, dict[str, Any] | None] = dict.fromkeys(refs.values())
        for ref in ready:
            try:
                out[refs[ref]] = ray.get(ref)
            except Exception:  # noqa: BLE001 - a dead rank does not answer
                pass
        return out

    def quiesce(self, timeout: float) -> PollResult:
        """Let every call in flight finish (nothing new is submitted); return what arrived."""
        out = PollResult()
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            ready, _ = ray.wait(list(self._pending), num_returns=len(self._pending),
                                timeout=max(0.0, deadline - time.monotonic()))
            self._collect(ready, out)
        return out

    def rollback(self, step: int, timeout: float) -> list[tuple[int, list[int]]]:
        """Every rank goes back to its own in-memory snapshot of ``step`` (same group).

        Returns:
            ``(rank, [steps <= step whose saves finished])``.
        """
        done = ray.get([a.rollback.remote(step) for a in self.actors], timeout=timeout)
        return list(enumerate(done))

    def flush_replicas(self, timeout: float, latest: bool = False) -> dict[int, dict[str, Any]]:
        """Finish every rank's replica exchange in flight; what each then holds in memory.

        With ``latest``, every rank first snapshots (and replicates) the state of its last
        step if that step took no snapshot; the ranks must all be at the same step.
        """
        refs = [a.flush_replicas.remote(latest) for a in self.actors]
        return dict(enumerate(ray.get(refs, timeout=timeout)))

    def _get_all(self, refs: list[Any], timeout: float) -> list[Any]:
        """Get every ref, failing fast on the first error instead of waiting on the rest."""
        left = {r: i for i, r in enumerate(refs)}
        out: list[Any] = [None] * len(refs)
        deadline = time.monotonic() + timeout
        while left:
            ready, _ = ray.wait(list(left), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise GroupStartError(f"ranks did not finish setting up within {timeout:.0f} s")
            for r in ready:
                try:
                    out[left.pop(r)] = ray.get(r)
                except Exception as e:  # noqa: BLE001
                    kind, msg = _describe(e)
                    raise GroupStartError(f"rank {refs.index(r)} failed to start: {msg}",
                                          kind=kind, rank=refs.index(r)) from None
        return out

    def shutdown(self) -> None:
        """Kill every actor (hung ones too, and spares) and free the placement groups."""
        for a in self.actors + [sp for sp, _ in self.spares] + [j for j, _, _ in self.joiners]:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead is fine
                pass
        for pg in (self.pg, self.spare_pg, *self.extra_pgs):
            if pg is not None:
                try:
                    remove_placement_group(pg)
                except Exception:  # noqa: BLE001
                    pass
        self.actors, self.spares, self.pg, self.spare_pg, self.world_size = [], [], None, None, 0
        self.joiners, self.extra_pgs, self.freed = [], [], []
        self._pending.clear()

    def close(self) -> None:
        """Leave the process group cleanly (end of a successful job), then shut down."""
        try:
            ray.get([a.close.remote() for a in self.actors], timeout=60)
        except Exception as e:  # noqa: BLE001
            log.warning("closing the worker group: %s", e)
        self.shutdown()

    # ---- calls -------------------------------------------------------------------
    def submit_step(self, step: int, snapshot: bool = True) -> None:
        """Every rank runs ``step``; with ``snapshot`` each then snapshots (and replicates) it."""
        for rank, a in enumerate(self.actors):
            self._pending[a.train_step.remote(step, snapshot)] = (rank, "step", step)

    def submit_replica_wait(self, step: int) -> None:
        """Ask every rank to report when its snapshot of ``step`` is held by its peer."""
        for rank, a in enumerate(self.actors):
            self._pending[a.wait_replicated.remote(step, _REPLICA_WAIT_S)] = (rank, "replica", step)

    def submit_save(self, step: int, path: str) -> None:
        for rank, a in enumerate(self.actors):
            self._pending[a.save.remote(step, path)] = (rank, "save", step)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def poll(self, timeout: float) -> PollResult:
        """Collect whatever finished within ``timeout`` seconds."""
        out = PollResult()
        if not self._pending:
            return out
        ready, _ = ray.wait(list(self._pending), num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=0)
        self._collect(ready, out)
        if out.errors:  # find the dead: the ranks that no longer answer
            # A rank whose call raised is alive (its process answered); ping the silent ones.
            heard = {e.rank for e in out.errors} | {r["rank"] for r in out.steps}
            others = [r for r in range(len(self.actors)) if r not in heard]
            dead = {others[i] for i in self.unresponsive([self.actors[r] for r in others])}
            if dead:
                log.info("ranks %s do not answer a ping within %.1f s", sorted(dead), _PING_TIMEOUT_S)
            ready, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=0)
            self._collect(ready, out)
            known = {e.rank for e in out.errors if e.kind == "worker_died"}
            for rank in sorted(dead - known):
                step = min((st for r, what, st in self._pending.values() if r == rank and what == "step"),
                           default=-1)
                out.errors.append(WorkerError(rank=rank, step=step, kind="worker_died",
                                              message="the worker does not answer (process or node lost)"))
        return out

    def _collect(self, ready: list[Any], out: PollResult) -> None:
        for ref in ready:
            rank, what, step = self._pending.pop(ref)
            try:
                value = ray.get(ref)
            except Exception as e:  # noqa: BLE001
                kind, msg = _describe(e)
                out.errors.append(WorkerError(rank=rank, step=step, kind=kind, message=msg))
                continue
            if what == "step":
                out.steps.append(value)
            elif what == "replica":
                out.replicated.append((rank, *value))
            elif value:
                out.saved.append((rank, value))

    def finish_saves(self) -> list[tuple[int, list[int]]]:
        """Wait for every rank's saves in flight."""
        done = ray.get([a.finish_saves.remote() for a in self.actors], timeout=600)
        return list(enumerate(done))

    def state_digest(self, export_path: str | None = None, pretrained_dir: str | None = None) -> str | None:
        """World-size-independent digest of the model and optimizer (a collective); rank 0 writes
        the consolidated model to ``export_path`` and the recipe's own format to ``pretrained_dir``."""
        return ray.get([a.state_digest.remote(export_path, pretrained_dir) for a in self.actors],
                       timeout=600)[0]
