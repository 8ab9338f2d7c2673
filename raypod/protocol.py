"""What crosses the boundary between the driver and the ranks, typed.

The driver and the rank actors run in different processes and talk through Ray calls;
every value that goes across is one of the messages below, so that both sides (and the
test fakes) agree on the fields by name and type rather than by dictionary keys.

- :class:`GroupSpec`: what a rank needs to join (or re-join) a process group.
- :class:`StepResult`: one rank's figures of one optimizer step.
- :class:`Heartbeat`: where a rank is (step and :class:`Phase`), answered mid-step.
- :class:`MemoryReport`: which steps a rank holds in memory (its own snapshots, the
  replicas it keeps for its peers).
- :class:`Interrupted`: where a rank's call was when the driver released it after a failure.
- :class:`WorkerError` with an :class:`ErrorKind`: a rank call that failed.
- :class:`WorkerGroupProtocol`: every call the driver makes on its group of ranks,
  implemented by :class:`raypod.driver.worker_group.WorkerGroup` and by the unit tests'
  fake; the driver relies on nothing else.

This module imports neither Ray nor torch.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from raypod.checkpoint import CommittedCheckpoint
    from raypod.config import FaultInjection, JobConfig
    from raypod.recipe import Recipe


class Phase(enum.IntEnum):
    """Where in a step a rank is; heartbeats report it and hang diagnosis names it."""

    START = 0
    SYNC = 1
    FORWARD_BACKWARD = 2
    OPTIMIZER = 3
    SNAPSHOT = 4
    DONE = 5

    @property
    def label(self) -> str:
        """The name used in logs, events and MLflow tags (``forward_backward``)."""
        return self.name.lower()


PHASES: tuple[str, ...] = tuple(p.label for p in Phase)
"""The phase labels in step order."""


class ErrorKind(str, enum.Enum):
    """Why a rank call failed (a ``str`` enum: it compares equal to its value)."""

    WORKER_DIED = "worker_died"
    """The rank's process or node is gone (or it does not answer a ping)."""
    EXCEPTION = "exception"
    """The rank's code raised."""
    INJECTED = "injected"
    """A configured ``fault.inject`` exception fired."""
    STORAGE = "storage"
    """A write to ``checkpoint.storage`` failed for good (full, over quota, read-only)."""
    PEER_LOST = "peer_lost"
    """The rank's collective broke because a peer closed its connections or vanished (a failed
    rank aborts its groups before it raises): a consequence of another rank's failure, never
    blamed while that rank's own error is known."""

    def __str__(self) -> str:
        return self.value


LATE_FACTOR = 1.5
"""While training, a rank is silent past ``max(fault.silent_s, LATE_FACTOR x`` the latest late
answer of the last ``raypod.driver.liveness.SLOW_WINDOW_S`` seconds): see :class:`Silence`."""


class Silence(dict):  # type: ignore[type-arg] - dict[int, float], with one figure more
    """Per rank, the seconds its liveness ping has gone unanswered (what
    :meth:`WorkerGroupProtocol.probe` returns), and ``slowest_s``: how late answers have come
    lately on this busy host, while training. The driver calls a rank silent only past
    ``max(fault.silent_s, LATE_FACTOR x slowest_s)``, so a host too loaded to answer within
    ``fault.silent_s`` (a checkpoint write, a start-up) is not taken for frozen; a frozen
    rank never answers and is found a little later there. A plain dict means no late
    answers (``slowest_s`` 0)."""

    def __init__(self, silence: dict[int, float] | None = None, slowest_s: float = 0.0) -> None:
        super().__init__(silence or {})
        self.slowest_s = slowest_s


@dataclass
class MemoryReport:
    """The steps a rank holds in memory: what the driver plans an in-memory recovery from."""

    own: list[int] = field(default_factory=list)
    """Steps of this rank's own snapshots."""
    replicas: dict[int, list[int]] = field(default_factory=dict)
    """Per peer rank: steps of that peer's snapshots this rank keeps."""


@dataclass
class StepResult:
    """One rank's figures of one optimizer step (``WorkerActor.train_step``)."""

    step: int
    rank: int
    loss_sum: float
    """The loss summed over this rank's samples (the driver divides by the global count)."""
    samples: int
    ids: Any
    """The sample ids this rank trained on (an int64 numpy array): the data ledger's input."""
    epoch: int
    lr: float
    grad_norm: float
    compute_s: float
    """Seconds of the step's own work (forward, backward, optimizer)."""
    wait_s: float = 0.0
    """Seconds spent waiting at the start-of-step sync for the slowest rank."""
    data_s: float = 0.0
    """Seconds spent waiting on the data stream."""
    metrics_sum: dict[str, float] = field(default_factory=dict)
    """The recipe's extra metrics, summed over this rank's samples."""
    snapshot_stall_s: float = 0.0
    saved: list[int] = field(default_factory=list)
    """Steps whose checkpoint save finished on this rank since its last result."""
    save_digests: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """Per step of ``saved``: the files this rank wrote for it, ``{name: {"size", "sha256"}}``
    (the manifest's digests, taken as they were written: the driver does not read them back)."""
    replicated: list[int] = field(default_factory=list)
    """Steps (``<= step``, usually the previous snapshot step) whose snapshot this rank's replica
    holder received since its last result: the replica acknowledgement rides in the result, so
    the driver needs no ``wait_replicated`` call per rank and step (that is only a fallback)."""
    save_s: float | None = None
    eval_sums: dict[str, float] | None = None
    """On an eval step: the eval loss and metrics summed over this rank's eval samples."""
    eval_samples: int | None = None
    eval_s: float | None = None
    snapshot_s: float = 0.0
    replica_wait_s: float = 0.0
    exchange_s: float = 0.0
    snapshot_alloc_s: float = 0.0
    memory: MemoryReport | None = None
    preempted: bool = False
    """The rank's node is being shut down (SIGTERM): the driver hands its state over."""

    def update(self, values: dict[str, Any]) -> None:
        """Set several fields at once (unknown names are refused)."""
        names = {f.name for f in fields(self)}
        for k, v in values.items():
            if k not in names:
                raise TypeError(f"StepResult has no field {k!r}")
            setattr(self, k, v)


@dataclass
class Heartbeat:
    """Where a rank is; answered on the actor's health thread, also mid-collective."""

    rank: int
    step: int
    phase: Phase
    in_phase_s: float
    """Seconds since the rank entered ``phase``."""
    preempted: bool = False
    pid: int = 0
    progress: int = 0
    """Sharded blocks this rank has entered in this step's forward and backward passes.
    Ranks blocked in one collective show the same count; a rank stuck computing a block
    (a hung kernel, a deadlock) shows less than the peers that went on to the next one."""

    @property
    def phase_name(self) -> str:
        return Phase(self.phase).label


@dataclass
class Interrupted:
    """A rank's answer to the driver's interrupt (``WorkerGroup.drain``): where its call was."""

    rank: int
    step: int = 0
    phase: Phase | None = None
    """``None``: nothing was interrupted (no trainer yet, or the interrupt came from an earlier
    attempt's drain after the rank rejoined a group)."""
    in_phase_s: float = 0.0

    @property
    def phase_name(self) -> str:
        return Phase(self.phase).label if self.phase is not None else "rejoined"


@dataclass
class WorkerError:
    """An error raised by one rank's call."""

    rank: int
    step: int
    kind: ErrorKind
    message: str


@dataclass
class GroupSpec:
    """What one rank needs to join a process group: the same for a first start, an in-place
    re-formation and a resize, apart from how the state is restored afterwards."""

    config: JobConfig
    recipe: Recipe
    rank: int
    world_size: int
    init_method: str
    """``tcp://host:port/prefix``: the job's rendezvous store and the prefix of this group's
    keys (``tcp://host:port``: the store's root)."""
    injections: list[tuple[int, FaultInjection]]
    """The configured faults that have not fired yet, with their index in ``fault.inject``."""
    attempt: int
    peers: tuple[int | None, int | None] = (None, None)
    """``(peer_to, peer_from)``: the ranks this rank's snapshots go to and come from."""
    link_first: int | None = None
    """The peer whose replica link this rank forms first (:func:`raypod.driver.topology.link_first`)."""


@runtime_checkable
class WorkerGroupProtocol(Protocol):
    """Every call the driver makes on the group of ranks (see ``WorkerGroup`` for the real
    one; tests use one shared fake). Ranks are indices ``0 .. world_size - 1``."""

    world_size: int
    nodes: list[str]
    """Per rank: the Ray node id it runs on."""
    excluded_nodes: set[str]
    freed: list[Any]
    """Placements of replaced ranks waiting to become spares (:meth:`refill_spares`)."""
    peer_to: list[int | None]
    twins: list[int | None] | None

    # lifecycle
    def start(self, world_size: int, attempt: int, restore: CommittedCheckpoint | None,
              injections: list[tuple[int, FaultInjection]]) -> dict[str, Any]: ...
    def shutdown(self) -> None: ...
    def close(self) -> None: ...

    # steps
    def submit_step(self, step: int, snapshot: bool = True) -> None: ...
    def submit_replica_wait(self, step: int) -> None: ...
    def submit_save(self, step: int, path: str) -> None: ...
    @property
    def in_flight(self) -> int: ...
    def poll(self, timeout: float) -> Any: ...
    def quiesce(self, timeout: float) -> Any: ...
    def finish_saves(self) -> list[tuple[int, list[int]]]: ...
    def state_digest(self, export_path: str | None = None, pretrained_dir: str | None = None) -> str | None: ...

    # health
    def heartbeats(self, timeout: float) -> dict[int, Heartbeat | None]: ...
    def probe(self, every_s: float) -> dict[int, float]:
        """Never waits: per rank, the seconds its liveness ping (sent every ``every_s``, at
        most one in flight) has gone unanswered; 0.0 when none is in flight (a
        :class:`Silence` also says how late answers came lately)."""
        ...
    def unresponsive_ranks(self, ranks: list[int], timeout: float) -> set[int]: ...
    def node_of(self, rank: int) -> str: ...
    def holder_of(self, rank: int) -> int | None: ...

    # recovery
    def kill(self, ranks: set[int]) -> None: ...
    def drain(self, timeout: float, attempt: int | None = None, keep: set[int] | frozenset[int] = frozenset(),
              patience: Callable[[], float] | None = None, gone: set[int] | frozenset[int] = frozenset()) -> set[int]: ...
    def memory_reports(self, ranks: list[int], timeout: float = 5.0) -> dict[int, MemoryReport]: ...
    def recover_in_place(self, lost: set[int], restore_step: int, attempt: int,
                         injections: list[tuple[int, FaultInjection]]) -> dict[str, Any]: ...
    def load_in_place(self, lost: set[int], restore: CommittedCheckpoint | None, attempt: int,
                      injections: list[tuple[int, FaultInjection]]) -> dict[str, Any]: ...
    def rollback(self, step: int, timeout: float) -> list[tuple[int, list[int]]]: ...
    def flush_replicas(self, timeout: float, latest: bool = False) -> dict[int, MemoryReport]: ...

    # spares, joiners, resizing
    def live_spares(self) -> int: ...
    def take_spares(self, n: int) -> list[Any]: ...
    def refill_spares(self) -> None: ...
    def add_joiner(self, placement: Any = None) -> None: ...
    def joining(self) -> int:
        """How many joiners are starting (not warm yet, not handed out by :meth:`ready_joiners`)."""
        ...
    def ready_joiners(self) -> list[Any]: ...
    def drop_joiners(self, joiners: list[Any]) -> None:
        """Stop warm joiners (from :meth:`ready_joiners`) that the group has no room for."""
        ...
    def reshard(self, lost: set[int], added: list[Any], restore_step: int, attempt: int,
                injections: list[tuple[int, FaultInjection]]) -> dict[str, Any]: ...
