"""The group of Ray actors that hosts the ranks: placement, rendezvous, calls, re-forming.

The driver talks to the group only through :class:`~raypod.protocol.WorkerGroupProtocol`,
which this class implements, so unit tests swap in a fake (``Driver.worker_group_cls``)
and drive the state machine one iteration at a time. The group leans on:

- :mod:`raypod.driver.inflight`: the calls running on the ranks and what comes back;
- :mod:`raypod.driver.spares`: warm spares and joiners;
- :mod:`raypod.driver.topology`: who holds whose replica, HSDP twins, node exclusion;
- :mod:`raypod.driver.rank_calls`: naming a failed call, getting many results, pinging;
- :mod:`raypod.driver.liveness`: the liveness pings that find a silent rank.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raypod.checkpoint import CommittedCheckpoint
from raypod.config import FaultInjection, JobConfig, recipe_pythonpath
from raypod.driver.inflight import REPLICA, SAVE, STEP, InFlight
from raypod.driver.liveness import Probes, forming_watch, heartbeats, kill_now, process_ticks, zones
from raypod.driver.outcomes import GroupStartError, PollResult
from raypod.driver.rank_calls import (
    PING_TIMEOUT_S,
    Fanout,
    call_ranks,
    describe,
    gather,
    get_all,
    kill_quietly,
    rank_failures,
    remove_pg_quietly,
    unresponsive,
)
from raypod.driver.spares import Placement, SparePool
from raypod.driver.topology import avoid_nodes, hsdp_twins, link_first, peer_ring, peers
from raypod.driver.windows import StepWindows
from raypod.policies.scaling import worker_bundle
from raypod.protocol import GroupSpec, Heartbeat, MemoryReport, WorkerError
from raypod.recipe import Recipe
from raypod.worker.actor import remote_worker_class
from raypod.worker.rendezvous import RendezvousStore

__all__ = ["GroupStartError", "PollResult", "WorkerError", "WorkerGroup"]  # the driver's and tests' import path

log = logging.getLogger("raypod.driver")

# How long a rank may take to replicate a step's snapshot before the driver stops
# waiting for it (the step still completes; its replica is just not there).
_REPLICA_WAIT_S = 60.0

SUBMIT_WAIT_S = 2.0
"""How long a regroup waits for the node agents to take their ranks' calls (an agent answers at
once, sending them); a rank whose agent did not answer by then is called directly."""

Regroup = Callable[[int], tuple[str, tuple[Any, ...]]]
"""``rank -> (method, args)``: the call that re-forms one rank, ``method(spec, *args)``
(``reconfigure``, ``reload`` or ``reshape``: :data:`raypod.worker.actor.REGROUP_METHODS`)."""


def ranks_runtime_env(config: JobConfig) -> dict[str, Any] | None:
    """The ranks' runtime env: ``PYTHONPATH`` holds the folder of a recipe module that the
    driver imported from ``recipe.import_dirs`` (the ranks unpickle the recipe from it)."""
    path = recipe_pythonpath(config)
    if not path:
        return None
    old = os.environ.get("PYTHONPATH")
    return {"env_vars": {"PYTHONPATH": os.pathsep.join([*path, *([old] if old else [])])}}


class WorkerGroup:
    """One placement group and one actor per rank (spares and joiners in a :class:`SparePool`).

    Args:
        config: the job config.
        recipe: the recipe instance every rank receives.
    """

    def __init__(self, config: JobConfig, recipe: Recipe) -> None:
        self.cfg, self.recipe = config, recipe
        self.runtime_env = ranks_runtime_env(config)
        self.bundle = worker_bundle(config.scaling)
        self.actors: list[Any] = []
        self.placement: list[Placement] = []
        """Per rank: (placement group, bundle index) its actor occupies."""
        self.pool = SparePool(config, recipe, self.bundle, self._new_actor, lambda: self.excluded_nodes)
        self.pg, self.world_size = None, 0
        self.nodes: list[str] = []
        self.node_ips: list[str] = []
        self.pids: list[int] = []
        self.peer_to: list[int | None] = []
        """Per rank: the rank its snapshots are replicated to (``None``: no replication)."""
        self.twins: list[int | None] | None = None
        """HSDP: per rank, the rank whose own snapshots equal it (see :func:`hsdp_twins`)."""
        self.calls, self.probes = InFlight(), Probes(config.fault.node_agents, lambda: self.nodes,
                                                    config.fault.agent_zones_from)
        self.excluded_nodes: set[str] = set()
        """Nodes the ranks must not be placed on (failed a pre-flight check, or lost ranks repeatedly)."""
        self.store: RendezvousStore | None = None
        """The job's rendezvous store, in this process (:mod:`raypod.worker.rendezvous`),
        opened with the first group and kept for every later one."""
        self.windows: StepWindows | None = None
        """With ``train.step_window``: the ranks' open window of steps and its grants."""
        self._node_windows = 0
        """How many node agents opened the last window (logged when it changes)."""

    # The pool's lists, under the names the driver and the benchmarks read.
    @property
    def spares(self) -> list[tuple[Any, Placement]]:
        return self.pool.spares

    @property
    def joiners(self) -> list[tuple[Any, Placement, Any]]:
        return self.pool.joiners

    @property
    def freed(self) -> list[Placement]:
        return self.pool.freed

    # ---- lifecycle ---------------------------------------------------------------
    def _new_actor(self, pg: Any, index: int) -> Any:
        extra = {k: v for k, v in self.bundle.items() if k not in ("CPU", "GPU")}
        return remote_worker_class().options(
            num_cpus=self.bundle.get("CPU", 0), num_gpus=self.bundle.get("GPU", 0),
            resources=extra or None, runtime_env=self.runtime_env,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index),
        ).remote(int(self.bundle.get("CPU", 1)) or 1)

    def start(self, world_size: int, attempt: int, restore: CommittedCheckpoint | None,
              injections: list[tuple[int, FaultInjection]]) -> dict[str, Any]:
        """Place ``world_size`` ranks, rendezvous, build, and restore ``restore``.

        Raises:
            GroupStartError: placement timed out or a rank failed to set up.
        """
        timeout = self.cfg.scaling.schedule_timeout_s
        self._place(world_size, timeout)
        with rank_failures("a rank failed to start"):
            infos = ray.get([a.node_info.remote() for a in self.actors], timeout=timeout)
            # Ranks on one node are contiguous (HSDP shards within a node).
            order = sorted(range(world_size), key=lambda i: (infos[i]["node_id"] != infos[0]["node_id"],
                                                           infos[i]["node_id"], i))
            self.actors = [self.actors[i] for i in order]
            self.placement = [self.placement[i] for i in order]
            self._locate([infos[i] for i in order])
            watch = self._watch(attempt)
            init_method = self._rendezvous()
            restore_arg = (restore.path, restore.step, restore.metadata_sha256) if restore else None
            refs = [a.setup.remote(spec, restore_arg)
                    for a, spec in zip(self.actors, self._specs(init_method, attempt, injections), strict=True)]
            results = get_all(refs, max(timeout, self.cfg.fault.pg_timeout_s), watch)
        loads = [r["load_s"] for r in results if r.get("load_s") is not None]
        return {"num_samples": results[0]["num_samples"],
                "setup_s": max(r["setup_s"] for r in results),
                "load_s": max(loads) if loads else None,
                "doctor": [r["doctor"] for r in results if r.get("doctor")]}

    def _place(self, world_size: int, timeout: float) -> None:
        """Reserve ``world_size`` bundles, start an actor in each, and place the spares."""
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
        self.placement, self.world_size = [(self.pg, i) for i in range(world_size)], world_size
        self.pool.place()

    def _locate(self, infos: list[dict[str, Any]]) -> None:
        """Note each rank's node (from its ``node_info``) and plan where its state survives
        its loss: an HSDP twin or a peer replica."""
        self.nodes, self.pids = [i["node_id"] for i in infos], [int(i.get("pid", 0)) for i in infos]
        self.node_ips = [i["ip"] for i in infos]
        p = self.cfg.parallel
        self.twins = hsdp_twins(p.strategy, p.replicas, self.world_size)
        self.peer_to = [None] * self.world_size if self.twins else peer_ring(self.nodes)

    def _rendezvous(self) -> str:
        """``tcp://ip:port/prefix``: the job's rendezvous store (the same one for every group:
        the ranks that stay keep their connections to it) and a prefix of the new group's own,
        so that no key of an earlier group is ever read."""
        if self.store is None:
            self.store = RendezvousStore()
        ip, port = self.store.open(len(self.actors), self.cfg.fault.pg_timeout_s)
        return f"tcp://{ip}:{port}/{uuid.uuid4().hex[:12]}"

    def _watch(self, attempt: int) -> Callable[[], None] | None:
        """While the group forms: a rank silent for ``fault.silent_s`` ends the wait (see
        :func:`forming_watch`); None when ``fault.silent_s`` is 0."""
        silent_s = self.cfg.fault.silent_s
        if not silent_s:
            return None
        return forming_watch(self.probes, lambda: self.actors, silent_s, self.kill, attempt,
                             lambda: (self.nodes, self.pids))

    def _submit_regroup(self, init_method: str, attempt: int, injections: list[tuple[int, FaultInjection]],
                        call: Regroup, timeout: float) -> tuple[list[Any], int]:
        """Send ``call(rank)``'s method to every rank; returns the calls' refs in rank order and
        how many of them went through a node agent.

        With node agents, one call per node (:meth:`NodeAgent.submit
        <raypod.worker.node_agent.NodeAgent.submit>`): the agent calls its ranks and answers at
        once with the calls' refs, which the driver then waits on as on its own. The spec that
        every rank shares (config, recipe, rendezvous, attempt) is put in the object store once,
        and each rank gets only its index and ring peers (:meth:`TrainWorker.join_as
        <raypod.worker.actor.TrainWorker.join_as>`): at 10,000 ranks one rank's call costs the
        driver about 0.4 ms to submit plus 0.08 ms to pickle its spec (2.3 KB), so the regroup's
        round was about 5 s of the driver's CPU, and through the agents it is one call per
        node. A rank whose node has no agent, or whose agent does not answer, is called directly.
        """
        n = len(self.actors)
        pairs, first = self._ring(n)
        plans = [call(r) for r in range(n)]
        relays = self.probes.relays or {}
        by_node: dict[str, dict[int, tuple[Any, tuple[Any, ...]]]] = {}
        refs: list[Any] = [None] * n
        if relays and n > 1:
            shared = ray.put(self._shared_spec(n, init_method, attempt, injections))
            for r in range(n):
                node = self.nodes[r] if r < len(self.nodes) else None
                if node in relays:
                    method, args = plans[r]
                    by_node.setdefault(node, {})[r] = (self.actors[r], (method, shared, r, pairs[r], first[r], *args))
            cut = zones(by_node, self.cfg.fault.agent_zones_from)
            wait_s = min(timeout, SUBMIT_WAIT_S)
            if cut:  # past agent_zones_from nodes: one call per zone, its leader submits through the others
                answers, broken, late = gather(
                    {relays[z[0]].submit_zone.remote("join_as", {n: (relays[n], by_node[n]) for n in z}, wait_s):
                     tuple(z) for z in cut}, wait_s * 2)
                sent = {r: ref for reply in answers.values() for r, ref in reply["refs"].items()}
                missing = sorted({n for reply in answers.values() for n in reply["broken"]}
                                 | {n for z in [*broken, *late] for n in z})
            else:
                answers, broken, late = gather({relays[node].submit.remote("join_as", calls): node
                                                for node, calls in by_node.items()}, wait_s)
                sent = {r: ref for reply in answers.values() for r, ref in reply.items()}
                missing = sorted({*broken, *late})
            for r, ref in sent.items():
                refs[r] = ref
            if missing:  # a late agent's calls may still come: a rank answers a regroup once
                log.warning("regroup: the node agent(s) of %s did not take their ranks' calls (%s): "
                            "calling those ranks directly", missing,
                            "; ".join(f"{n}: {describe(e)[1]}" for n, e in broken.items()) or "no answer in time")
        relayed = sum(ref is not None for ref in refs)
        if relayed:
            log.info("regroup: %d of %d ranks called through %d node agent(s)", relayed, n,
                     len({self.nodes[r] for r in range(n) if r < len(self.nodes) and refs[r] is not None}))
        specs = None
        for r in range(n):
            if refs[r] is None:
                specs = specs or self._specs(init_method, attempt, injections)
                method, args = plans[r]
                refs[r] = getattr(self.actors[r], method).remote(specs[r], *args)
        return refs, relayed

    def _ring(self, n: int) -> tuple[list[tuple[int | None, int | None]], list[int | None]]:
        """Per rank of a group of ``n``: its ``(peer_to, peer_from)`` and the peer whose replica
        link it forms first (``None`` without a replica ring)."""
        pairs = peers(self.peer_to) if self.peer_to else [(None, None)] * n
        return pairs, link_first(self.peer_to, pairs) if self.peer_to else [None] * n

    def _shared_spec(self, n: int, init_method: str, attempt: int,
                     injections: list[tuple[int, FaultInjection]]) -> GroupSpec:
        """What every rank of a group of ``n`` shares to join it (rank 0's index, no peers)."""
        return GroupSpec(config=self.cfg, recipe=self.recipe, rank=0, world_size=n,
                         init_method=init_method, injections=injections, attempt=attempt)

    def _specs(self, init_method: str, attempt: int,
               injections: list[tuple[int, FaultInjection]]) -> list[GroupSpec]:
        """What each rank of the group (as it stands) needs to join it: one spec per rank."""
        pairs, first = self._ring(self.world_size)
        shared = self._shared_spec(self.world_size, init_method, attempt, injections)
        return [dataclasses.replace(shared, rank=r, peers=pairs[r], link_first=first[r])
                for r in range(self.world_size)]

    def holder_of(self, rank: int) -> int | None:
        """The rank that can give ``rank``'s state back: its HSDP twin or its replica holder."""
        if self.twins:
            return self.twins[rank]
        return self.peer_to[rank] if self.peer_to else None

    def shutdown(self) -> None:
        """Kill every actor (hung ones too, and spares) and free the placement groups."""
        for a in self.actors:
            kill_quietly(a)
        self.pool.shutdown()
        if self.pg is not None:
            remove_pg_quietly(self.pg)
        self.actors, self.pg, self.world_size = [], None, 0
        self.windows = None  # the ranks are gone, and their window with them
        if self.store is not None:
            self.store.close()
            self.store = None
        self.calls.clear()
        self.probes.close()  # the node agents

    def close(self) -> None:
        """Leave the process group cleanly (end of a successful job), then shut down."""
        self._end_window()
        try:
            ray.get([a.close.remote() for a in self.actors], timeout=60)
        except Exception as e:  # noqa: BLE001
            log.warning("closing the worker group: %s", e)
        self.shutdown()

    # ---- calls -------------------------------------------------------------------
    def _send(self, what: str, step: int, method: str, *args: Any) -> None:
        """Queue ``method(*args)`` on every rank, in rank order, and send what one flush allows
        (:data:`~raypod.driver.inflight.SUBMIT_PER_POLL`; the rest goes out with the next polls)."""
        for rank, a in enumerate(self.actors):
            self.calls.queue(functools.partial(getattr(a, method).remote, *args), rank, what, step)
        self.calls.flush()

    def submit_step(self, step: int, snapshot: bool = True) -> None:
        """Every rank runs ``step``; with ``snapshot`` each then snapshots (and replicates) it.

        With ``train.step_window`` the step is granted in the ranks' open window (one store
        write for all ranks; :mod:`raypod.driver.windows`), and a window is opened first when
        none is (one ``train_window`` call per rank); otherwise one ``train_step`` call per rank."""
        if not self.cfg.train.step_window or self.store is None:
            self._send(STEP, step, "train_step", step, snapshot)
            return
        if self.windows is None:  # reset with the store itself (shutdown)
            self.windows = StepWindows(self.store)
        if self.windows.key is not None and step != self.windows.granted + 1:
            self._end_window()  # a step skipped (a bad batch): a window's steps follow one another
        if self.windows.key is None:
            key, address = self.windows.start(step), self.store.address
            by_node = self._window_agents()
            for agent, ranks in by_node.values():  # one call per node: its agent opens its ranks' windows
                self.calls.queue(functools.partial(self._open_node_window, agent, ranks, address, key, step),
                                 tuple(ranks), STEP, step)
            through = {r for _, ranks in by_node.values() for r in ranks}
            if len(by_node) != self._node_windows:
                self._node_windows = len(by_node)
                log.info("step windows: %d of %d ranks' windows opened through %d node agent(s)",
                         len(through), self.world_size, len(by_node))
            for rank, a in enumerate(self.actors):
                if rank not in through:
                    send = functools.partial(a.train_window.options(num_returns="streaming").remote, address, key, step)
                    self.calls.queue(send, rank, STEP, step)
        self.windows.grant(step, snapshot)
        self.calls.flush()

    def _open_node_window(self, agent: Any, ranks: list[int], address: str, key: str, step: int) -> Any:
        """Send a node's window call to its agent (at the flush that sends it, so that the calls
        queued before it have been sent): with the refs of its ranks' calls still in flight,
        which the agent waits for before it calls them, so each rank runs its calls in the
        driver's order (a save sent directly, then the window its agent opens)."""
        return agent.window.options(num_returns="streaming").remote(
            {r: self.actors[r] for r in ranks}, address, key, step, self.calls.ahead_of(set(ranks)))

    def _window_agents(self) -> dict[str, tuple[Any, list[int]]]:
        """The nodes whose agent opens their ranks' next window (``node -> (agent, ranks)``):
        every node with a running agent once the group has ``train.window_agents_from`` ranks
        (see :meth:`NodeAgent.window <raypod.worker.node_agent.NodeAgent.window>`); none below."""
        least = self.cfg.train.window_agents_from
        relays = self.probes.relays
        if not least or self.world_size < least or not relays:
            return {}
        by_node: dict[str, tuple[Any, list[int]]] = {}
        for r in range(self.world_size):
            node = self.nodes[r] if r < len(self.nodes) else None
            if node in relays:
                by_node.setdefault(node, (relays[node], []))[1].append(r)
        return by_node

    def _end_window(self) -> None:
        """End the ranks' open window after the last step granted (their calls return once
        they have trained it), before any other call on their actors, which would otherwise
        queue behind the window. Called where such calls start: every path to them goes
        through one of these (a recovery's and a reshard's regroup through ``_regroup``,
        memory reports and relayed interrupts through ``_call_ranks``)."""
        if self.windows is not None and self.store is not None:
            self.windows.end()

    def submit_replica_wait(self, step: int) -> None:
        """Ask every rank to report when its snapshot of ``step`` is held by its peer."""
        self._send(REPLICA, step, "wait_replicated", step, _REPLICA_WAIT_S)

    def submit_save(self, step: int, path: str) -> None:
        self._end_window()
        # A rank whose window its node agent opened gets the save from the driver, another
        # caller: it must have started that window first, or the save could run before it.
        self.calls.await_started(self.cfg.fault.hang_timeout_s)
        self._send(SAVE, step, "save", step, path)

    @property
    def in_flight(self) -> int:
        return len(self.calls)

    def poll(self, timeout: float) -> PollResult:
        """Collect whatever finished within ``timeout`` seconds (see :meth:`InFlight.poll`)."""
        return self.calls.poll(self.actors, timeout)

    def quiesce(self, timeout: float) -> PollResult:
        """Let every call in flight finish (nothing new is submitted); return what arrived."""
        self._end_window()
        return self.calls.quiesce(timeout)

    def finish_saves(self) -> list[tuple[int, list[int]]]:
        """Wait for every rank's saves in flight."""
        self._end_window()
        done = ray.get([a.finish_saves.remote() for a in self.actors], timeout=600)
        return list(enumerate(done))

    def state_digest(self, export_path: str | None = None, pretrained_dir: str | None = None) -> str | None:
        """World-size-independent digest of the model and optimizer (a collective); rank 0 writes
        the consolidated model to ``export_path`` and the recipe's own format to ``pretrained_dir``."""
        self._end_window()
        return ray.get([a.state_digest.remote(export_path, pretrained_dir) for a in self.actors],
                       timeout=600)[0]

    # ---- health ------------------------------------------------------------------
    def heartbeats(self, timeout: float) -> dict[int, Heartbeat | None]:
        """Where each rank is (step, phase); ``None`` for a rank that did not answer in time.
        Through the node agents when they run (one call per node, or per zone: a hang check
        at 100,000 ranks is otherwise 100,000 driver calls)."""
        relays = self.probes.relays
        if not relays:
            return heartbeats(self.actors, timeout)
        got = self._call_ranks("heartbeat", list(range(len(self.actors))), timeout=timeout, relays=relays)
        return {r: got.answers.get(r) for r in range(len(self.actors))}

    def probe(self, every_s: float) -> dict[int, float]:
        """Per rank: seconds its liveness ping has gone unanswered (see :class:`Probes`)."""
        return self.probes.silence(self.actors, every_s)

    def process_ticks(self, ranks: list[int]) -> dict[int, int | None]:
        """Each of ``ranks``' processes as its node reads it (:func:`process_ticks`): a rank
        whose process cannot be read within 0.5 s is left out."""
        return process_ticks(self.actors, self.nodes, self.pids, ranks, timeout=0.5,
                             agents=self.probes.agent_handles)

    def unresponsive_ranks(self, ranks: list[int], timeout: float = PING_TIMEOUT_S) -> set[int]:
        """The ranks among ``ranks`` that do not answer a ping within ``timeout`` seconds."""
        return {ranks[i] for i in unresponsive([self.actors[r] for r in ranks], timeout)}

    def node_of(self, rank: int) -> str:
        """``node IP (node id)`` of ``rank``, for the lines that name a lost rank."""
        if not 0 <= rank < len(self.nodes):
            return "an unknown node"
        ip = self.node_ips[rank] if rank < len(self.node_ips) else "?"
        return f"node {ip} ({self.nodes[rank][:8]})"

    # ---- recovery ----------------------------------------------------------------
    def kill(self, ranks: set[int]) -> None:
        """End the processes of ``ranks`` now (their slots are refilled by recover_in_place)."""
        for r in ranks:
            kill_quietly(self.actors[r])
        kill_now(self.actors, self.nodes, self.pids, ranks, self.probes.agent_handles)  # a stopped process too

    def drain(self, timeout: float, attempt: int | None = None, keep: set[int] | frozenset[int] = frozenset(),
              patience: Callable[[], float] | None = None, gone: set[int] | frozenset[int] = frozenset()) -> set[int]:
        """After a failure: let every call in flight finish or fail; return the lost ranks
        (see :meth:`InFlight.drain`)."""
        self._end_window()
        relays = self.probes.relays
        relay = functools.partial(self._call_ranks, relays=relays) if relays else None
        return self.calls.drain(self.actors, timeout, attempt, keep, patience, gone, relay)

    def _call_ranks(self, method: str, ranks: list[int], args: tuple[Any, ...] = (), timeout: float = 5.0,
                    relays: dict[str, Any] | None = None) -> Fanout:
        """``method(*args)`` on ``ranks``, one call per node through the node agents that answer
        (:func:`call_ranks`), directly to ranks elsewhere."""
        self._end_window()
        return call_ranks(method, ranks, self.actors, self.nodes, relays, args, timeout,
                          zoned_from=self.cfg.fault.agent_zones_from)

    def memory_reports(self, ranks: list[int], timeout: float = 5.0) -> dict[int, MemoryReport]:
        """What each live rank holds in memory right now (own snapshots, replicas): one call per
        node through the node agents.

        Raises:
            RuntimeError: a rank's call failed or did not answer within ``timeout`` (naming it).
        """
        relays = self.probes.relays
        got = self._call_ranks("memory_report", list(ranks), timeout=timeout, relays=relays)
        log.info("memory reports of %d rank(s) through %d node agent(s)", len(ranks),
                 len({self.nodes[r] for r in ranks if r < len(self.nodes)} & set(relays or ())))
        if got.failed or got.late:
            raise RuntimeError("; ".join([f"rank {r}: {m}" for r, m in sorted(got.failed.items())]
                                         + [f"rank {r} did not answer within {timeout:g} s" for r in got.late]))
        return {r: got.answers[r] for r in ranks}

    def recover_in_place(self, lost: set[int], restore_step: int, attempt: int,
                         injections: list[tuple[int, FaultInjection]]) -> dict[str, Any]:
        """Replace ``lost`` ranks (spares first), re-form the group, restore from memory.

        Survivors keep their processes; replacements get their shard from the peer
        that holds its replica. Nothing is read from storage.

        Raises:
            GroupStartError: a replacement or the new rendezvous failed.
        """
        moves = [(self.holder_of(d), d, d) for d in sorted(lost)]
        return self._replace_and_regroup(
            lost, attempt, injections, "in-place recovery failed",
            lambda r: ("reconfigure", (restore_step, moves)))

    def load_in_place(self, lost: set[int], restore: CommittedCheckpoint | None, attempt: int,
                      injections: list[tuple[int, FaultInjection]]) -> dict[str, Any]:
        """Replace ``lost`` ranks (spares first), re-form the group, and load the committed
        checkpoint ``restore`` on every rank (None: every rank starts afresh, the model
        initialised from the seed): survivors keep their processes.

        Raises:
            GroupStartError: a replacement, the new rendezvous or a rank's load failed.
        """
        if restore is None:
            return self._replace_and_regroup(lost, attempt, injections, "starting afresh in place failed",
                                             lambda r: ("reload", (None, 0)))
        return self._replace_and_regroup(
            lost, attempt, injections, f"loading checkpoint step {restore.step} in place failed",
            lambda r: ("reload", (restore.path, restore.step, restore.metadata_sha256)))

    def _replace_and_regroup(self, lost: set[int], attempt: int, injections: list[tuple[int, FaultInjection]],
                             failed: str, call: Regroup) -> dict[str, Any]:
        t0 = time.perf_counter()
        self._replace(lost)
        t1 = time.perf_counter()
        with rank_failures(failed):
            info = self._regroup(attempt, injections, call, moved=lost)
        info["recover_s"] = time.perf_counter() - t0
        info["driver_phases_s"]["replace"] = t1 - t0
        return {**info, "replaced": sorted(lost), "spares_left": len(self.pool.spares)}

    def _replace(self, lost: set[int]) -> None:
        """End the ``lost`` ranks' processes and put a spare (or a new actor in the rank's
        own slot) in their place; a slot a spare took over becomes the next spare."""
        self.kill(lost)
        self.pool.live()  # a spare on a lost node went with it
        crowd = Counter(n for r, n in enumerate(self.nodes) if r not in lost)
        for d in sorted(lost):
            freed = self.placement[d]
            taken = self.pool.take(1, crowd)
            if taken:
                actor, placement = taken[0]
            else:
                actor, placement = self._new_actor(*freed), freed
                freed = None
            self.actors[d], self.placement[d] = actor, placement
            if freed is not None:
                self.pool.freed.append(freed)  # the lost rank's slot becomes the next spare

    def _regroup(self, attempt: int, injections: list[tuple[int, FaultInjection]],
                 call: Regroup, moved: set[int] | None = None) -> dict[str, Any]:
        """Locate the ranks (only those in ``moved``, whose actor changed, when the others
        keep their place: one call per new actor, not per rank), open a rendezvous, run
        ``call(rank)``'s method on every rank (a ``reconfigure``, ``reload`` or ``reshape``:
        :meth:`_submit_regroup`) and sum up its results."""
        self._end_window()
        timeout = self.cfg.scaling.schedule_timeout_s
        t0 = time.perf_counter()
        known = [{"node_id": n, "pid": p, "ip": ip} for n, p, ip in zip(self.nodes, self.pids, self.node_ips,
                                                                        strict=False)]
        ask = sorted(moved) if moved is not None and len(known) == len(self.actors) else range(len(self.actors))
        infos = dict(zip(ask, ray.get([self.actors[r].node_info.remote() for r in ask], timeout=timeout),
                         strict=True))
        self._locate([infos.get(r) or known[r] for r in range(len(self.actors))])
        watch = self._watch(attempt)
        init_method = self._rendezvous()
        t1 = time.perf_counter()
        refs, relayed = self._submit_regroup(init_method, attempt, injections, call, timeout)
        results = get_all(refs, max(timeout, self.cfg.fault.pg_timeout_s), watch)
        slowest = max(results, key=lambda r: r["reconfigure_s"])
        arrived = [r["arrived"] for r in results if "arrived" in r]
        # How far apart the ranks reached the rendezvous: the first one waits that long in it.
        spread = {"arrival_spread": max(arrived) - min(arrived)} if arrived else {}
        # The most CPU one rank's process spent rejoining (ranks own their cores on a cluster).
        cpu = [r["cpu_s"] for r in results if "cpu_s" in r]
        spread.update({"rank_cpu_max": max(cpu)} if cpu else {})
        return {"slowest_rank_phases_s": slowest["phases_s"],
                "driver_phases_s": {"locate": t1 - t0, "reconfigure": time.perf_counter() - t1, **spread},
                "relayed": relayed,  # ranks whose call went through their node's agent
                "received_bytes": sum(r["received_bytes"] for r in results)}

    def rollback(self, step: int, timeout: float) -> list[tuple[int, list[int]]]:
        """Every rank goes back to its own in-memory snapshot of ``step`` (same group).

        Returns:
            ``(rank, [steps <= step whose saves finished])``.
        """
        self._end_window()
        done = ray.get([a.rollback.remote(step) for a in self.actors], timeout=timeout)
        return list(enumerate(done))

    def flush_replicas(self, timeout: float, latest: bool = False) -> dict[int, MemoryReport]:
        """Finish every rank's replica exchange in flight; what each then holds in memory.

        With ``latest``, every rank first snapshots (and replicates) the state of its last
        step if that step took no snapshot; the ranks must all be at the same step.
        """
        self._end_window()
        refs = [a.flush_replicas.remote(latest) for a in self.actors]
        return dict(enumerate(ray.get(refs, timeout=timeout)))

    # ---- spares, joiners, resizing -----------------------------------------------
    def live_spares(self) -> int:
        """Drop spares that no longer answer (their node is gone); returns how many are left."""
        return self.pool.live()

    def take_spares(self, n: int) -> list[tuple[Any, Placement]]:
        """Pop ``n`` warm spares (with their placements) for a reshard; call
        :meth:`live_spares` first so that none of them is on a lost node."""
        return self.pool.take(n)

    def refill_spares(self) -> None:
        """Start spares in the slots of replaced ranks (the driver calls this once the group
        completed a step after the recovery)."""
        self.pool.refill()

    def add_joiner(self, placement: Placement | None = None) -> None:
        """Start an actor in the background (in ``placement``, or in a new one-bundle
        placement group) that joins the group at a step boundary once it is warm."""
        self.pool.add_joiner(placement)

    def joining(self) -> int:
        """How many joiners are starting (not warm yet, not handed out by :meth:`ready_joiners`)."""
        return len(self.pool.joiners)

    def ready_joiners(self) -> list[tuple[Any, Placement]]:
        """Joiners that are warm now (failed ones are dropped)."""
        return self.pool.ready_joiners()

    def drop_joiners(self, joiners: list[tuple[Any, Placement]]) -> None:
        """Stop warm joiners (from :meth:`ready_joiners`) that the group has no room for."""
        self.pool.drop(joiners)

    def reshard(self, lost: set[int], added: list[tuple[Any, Placement]], restore_step: int,
                attempt: int, injections: list[tuple[int, FaultInjection]]) -> dict[str, Any]:
        """Re-form the group at another size, resharding the state after ``restore_step`` in memory.

        Survivors keep their processes, ``lost`` ranks go, ``added`` actors (warm spares or
        joiners) come in after the survivors. Each old rank's state is cut into the new
        ranks' pieces by the rank itself or, for a lost rank, by the holder of its replica,
        and travels through the object store. Returns the freed placements in ``freed``.

        Raises:
            GroupStartError: a lost rank's state has no live copy, or a rank failed.
        """
        self._end_window()
        t0 = time.perf_counter()
        old_world = self.world_size
        exporter = {i: (i if i not in lost else self.holder_of(i)) for i in range(old_world)}
        if any(e is None or e in lost for e in exporter.values()):
            raise GroupStartError("a lost rank's in-memory state has no live copy")
        survivors = [r for r in range(old_world) if r not in lost]
        with rank_failures("resharding in memory failed"):
            exported = self._export_pieces(exporter, restore_step, old_world, len(survivors) + len(added))
            t1 = time.perf_counter()
            freed = [self.placement[r] for r in sorted(lost)]
            self.kill(lost)
            self.actors = [self.actors[r] for r in survivors] + [a for a, _ in added]
            self.placement = [self.placement[r] for r in survivors] + [p for _, p in added]
            self.world_size = len(self.actors)
            info = self._regroup(attempt, injections, lambda r: (
                "reshape", (restore_step, old_world, [exported[i][r] for i in range(old_world)])))
        info["recover_s"] = time.perf_counter() - t0
        info["driver_phases_s"]["export"] = t1 - t0
        return {**info, "replaced": sorted(lost), "freed": freed, "old_world": old_world,
                "new_world": self.world_size}

    def _export_pieces(self, exporter: dict[int, int | None], step: int, old_world: int,
                       new_world: int) -> dict[int, list[Any]]:
        """Have each exporting rank cut its sources' state after ``step`` into ``new_world``
        pieces in the object store: ``{old rank: [ref for new rank 0, 1, ...]}``."""
        by_exporter: dict[int, list[int]] = {}
        for i, e in exporter.items():
            by_exporter.setdefault(e, []).append(i)
        refs = [self.actors[e].export_reshard.remote(step, srcs, old_world, new_world)
                for e, srcs in by_exporter.items()]
        exported: dict[int, list[Any]] = {}
        for part in get_all(refs, timeout=max(self.cfg.scaling.schedule_timeout_s, self.cfg.fault.pg_timeout_s)):
            exported.update(part)
        return exported
