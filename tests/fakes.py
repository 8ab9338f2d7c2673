"""One fake worker group for the driver's unit tests: the whole
:class:`raypod.protocol.WorkerGroupProtocol`, no Ray, no processes.

Every submitted call completes at the next poll. What the ranks hold and do is set per
test on the class (the driver builds its group itself, from ``Driver.worker_group_cls``):

- ``FakeGroup.scene``: what the group is like (:class:`Scene`: memory it holds, replica
  peers, nodes, warm spares, how long saves take);
- ``FakeGroup.plan``: what goes wrong (``fail_at=(step, times)``: rank 1 dies in that step;
  ``fail_start_attempt``; ``stall_from`` a step: nothing arrives any more;
  ``nan_at=(step, times)``; ``preempt_at`` a step; ``behind=(phase, name)``: where rank 1's
  heartbeat says it is; ``preflight_fails_on`` a node);
- ``FakeGroup.starts`` and ``FakeGroup.calls`` record what the driver asked for;
- :func:`fake_driver`: a production ``Driver`` over it, with the config the tests share.

Import it as ``from fakes import FakeGroup`` (``pythonpath = ["tests"]``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from raypod import faults
from raypod.config import JobConfig
from raypod.data.order import SampleOrder
from raypod.driver.outcomes import GroupStartError, PollResult
from raypod.protocol import ErrorKind, Heartbeat, MemoryReport, Phase, StepResult, WorkerError
from raypod.recipe import Recipe
from raypod.worker.snapshot import KEEP_STEPS


class NullRecipe(Recipe):
    def tokens_per_sample(self) -> int:
        return 1


@dataclass
class Scene:
    """What the fake group is like.

    Attributes:
        memory: which finished steps every rank holds in memory (own snapshots, and replicas
            of every peer): ``none`` (recoveries take the persistent checkpoint), ``recent``
            (the last ``KEEP_STEPS``, as a rank keeps), ``first`` (step 1 only: a long
            ``memory_every_steps``).
        peer_to: per rank, the rank its snapshots go to (``[]``: no replicas).
        nodes: per rank, its node (``[]``: unknown).
        spares: warm spares that answer.
        save_s: what each result reports its last save took (None: nothing).
    """

    memory: str = "none"
    peer_to: list[int | None] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    spares: int = 0
    save_s: float | None = None


BASIC = Scene()
"""No memory, no peers, no spares: every recovery restarts from the persistent checkpoint."""
HEALTHY = Scene(memory="recent", peer_to=[1, 0], nodes=["n1", "n2"], spares=1)
"""Every finished step in memory, a warm spare: recoveries happen in place."""
OLD_SNAPSHOT = Scene(memory="first", peer_to=[1, 0], nodes=["n1", "n2"], spares=1, save_s=0.0)
"""Memory holds step 1 only and saves are quick: loading a checkpoint in place wins."""


class FakeGroup:
    """Completes every submitted call at the next poll; fails as ``plan`` says."""

    scene: Scene = BASIC
    plan: dict[str, Any] = {}
    starts: list[tuple[int, int | None]] = []
    calls: list[tuple] = []
    driver: Any = None
    """The driver under test (the refill record notes its ``done_step``)."""

    @classmethod
    def reset(cls, scene: Scene = BASIC) -> None:
        cls.scene, cls.plan, cls.starts, cls.calls, cls.driver = scene, {}, [], [], None

    def __init__(self, config: JobConfig, recipe: Recipe) -> None:
        self.cfg = config
        self.world_size = 0
        self.queue: list[tuple[str, int, Any]] = []
        """``(what, step, extra)``: a save's path; a step's replica acknowledgements."""
        self.unacked: tuple[int, ...] = ()
        """The last snapshot step submitted: the next step's results acknowledge its replicas."""
        self.order = SampleOrder(1000, config.train.global_batch, config.train.seed)
        self.finished: list[int] = []
        self.nodes: list[str] = list(self.scene.nodes)
        self.excluded_nodes: set[str] = set()
        self.freed: list[Any] = []
        self.peer_to: list[int | None] = list(self.scene.peer_to)
        self.twins: list[int | None] | None = None
        self.joiners = 0
        self.silent_since: float | None = None
        """When rank ``plan["silent"]`` stopped answering its probes."""

    # ---- lifecycle -----------------------------------------------------------------
    def start(self, world_size, attempt, restore, injections):
        FakeGroup.starts.append((world_size, restore.step if restore else None))
        self.calls.append(("start", sorted(self.excluded_nodes)))
        self.world_size = world_size  # as the real group: its ranks exist when one fails to join
        if FakeGroup.plan.get("fail_start_attempt") == attempt:
            raise GroupStartError("rank 1 failed to start: boom", rank=1)
        bad = FakeGroup.plan.get("preflight_fails_on")
        check = {"name": "storage", "ok": bad is None or attempt > 0, "detail": "'/x' is not writable"}
        return {"num_samples": 1000, "setup_s": 0.0,
                "doctor": [{"node_id": bad or "n1", "hostname": "h", "checks": [check]}]}

    def shutdown(self):
        self.world_size = 0

    def close(self):
        self.world_size = 0

    # ---- steps -----------------------------------------------------------------------
    def submit_step(self, step, snapshot=True):
        # As a rank: its result carries the previous snapshot step's acknowledgement (one at or
        # after ``step`` was rewound by a recovery).
        acked = tuple(s for s in self.unacked if s < step) if self.peer_to else ()
        self.unacked = (step,) if snapshot else ()
        self.queue.append(("step", step, acked))

    def submit_save(self, step, path):
        self.queue.append(("save", step, path))

    def submit_replica_wait(self, step):
        self.queue.append(("replica", step, None))

    @property
    def in_flight(self) -> int:
        return len(self.queue)

    def _stalled(self) -> bool:
        return FakeGroup.plan.get("stall_from") in {s for w, s, _ in self.queue if w == "step"}

    def poll(self, timeout):
        if self._stalled():
            time.sleep(timeout)
            return PollResult()  # a rank hangs: nothing arrives any more
        out = PollResult()
        for what, step, extra in self.queue:
            if what == "step" and self._dies_in(step):
                out.errors.append(WorkerError(rank=1, step=step, kind=ErrorKind.WORKER_DIED, message="died"))
                break
            if what == "step":
                out.steps.extend(self._results(step, extra))
            elif what == "replica":
                out.replicated.extend((r, step, True) for r in range(self.world_size))
            else:
                out.saved.extend((r, [step]) for r in range(self.world_size))
        self.queue.clear()
        return out

    def _dies_in(self, step: int) -> bool:
        """Rank 1 dies in ``step`` as ``plan["fail_at"]`` says (recording an injected fault's
        marker, as a real rank does as it fires)."""
        fail = FakeGroup.plan.get("fail_at")
        if not (fail and fail[0] == step and fail[1] > 0):
            return False
        FakeGroup.plan["fail_at"] = (fail[0], fail[1] - 1)
        for i, f in faults.pending(self.cfg, faults.fired(self.cfg.job_dir)):
            if f.step == step and f.rank == 1:
                faults.record_fired(self.cfg.job_dir, i, f, attempt=0)
        return True

    def _results(self, step: int, acked: tuple[int, ...] = ()) -> list[StepResult]:
        out = []
        for r in range(self.world_size):
            ids = self.order.ids(step)[r :: self.world_size]
            res = StepResult(step=step, rank=r, loss_sum=1.0 * len(ids), samples=len(ids), ids=ids,
                             epoch=0, lr=0.1, grad_norm=1.0, compute_s=0.001, save_s=self.scene.save_s,
                             replicated=list(acked))
            nan = FakeGroup.plan.get("nan_at")
            if nan and nan[0] == step and nan[1] > 0 and r == 0:
                FakeGroup.plan["nan_at"] = (nan[0], nan[1] - 1)
                res.loss_sum = float("nan")
            res.preempted = FakeGroup.plan.get("preempt_at") == step and r == 1
            self.finished.append(step)
            out.append(res)
        return out

    def quiesce(self, timeout):
        return self.poll(timeout)

    def finish_saves(self):
        return []

    def state_digest(self, export_path=None, pretrained_dir=None):
        return "f" * 64

    # ---- health ----------------------------------------------------------------------
    def heartbeats(self, timeout):
        self.calls.append(("heartbeats",))
        phase, _name = FakeGroup.plan.get("behind", (0, "start"))  # where rank 1 is
        step = max(self.finished, default=0) + 1  # the step after each rank's last result
        return {0: Heartbeat(rank=0, step=step, phase=Phase.SYNC, in_phase_s=1.0),
                1: Heartbeat(rank=1, step=step, phase=Phase(phase), in_phase_s=1.0)}

    def probe(self, every_s):
        """Rank ``plan["silent"]`` stops answering once the steps stall (``plan["stall_from"]``),
        firing its configured ``freeze`` as a real rank would; the others answer at once."""
        silent = FakeGroup.plan.get("silent")
        if silent is not None and self.silent_since is None and self._stalled():
            self.silent_since = time.monotonic()
            step = max(self.finished, default=0) + 1  # the step it was in (the one after its last result)
            for i, f in faults.pending(self.cfg, faults.fired(self.cfg.job_dir)):
                if f.rank == silent and f.kind in ("freeze", "freeze_node") and f.step == step:
                    faults.record_fired(self.cfg.job_dir, i, f, attempt=0)
        quiet = time.monotonic() - self.silent_since if self.silent_since is not None else 0.0
        return {r: quiet if r == silent else 0.0 for r in range(self.world_size)}

    def unresponsive_ranks(self, ranks, timeout):
        return set(ranks)

    def node_of(self, rank):
        return self.nodes[rank] if rank < len(self.nodes) else f"node-{rank}"

    def holder_of(self, rank):
        return self.peer_to[rank] if self.peer_to else None

    # ---- recovery --------------------------------------------------------------------
    def kill(self, ranks):
        self.calls.append(("kill", sorted(ranks)))

    def drain(self, timeout, attempt=None, keep=frozenset(), patience=None, gone=frozenset()):
        self.queue.clear()
        self.calls.append(("drain", sorted(keep), patience() if keep and patience is not None else None))
        return set()

    def memory_reports(self, ranks, timeout=5.0):
        done = sorted(set(self.finished))
        recent = done[-KEEP_STEPS:]
        own = {"none": [], "recent": recent, "first": [1] if 1 in done else []}[self.scene.memory]
        return {r: MemoryReport(own=own, replicas={q: own for q in range(self.world_size)} if own else {})
                for r in ranks}

    def flush_replicas(self, timeout, latest=False):
        self.calls.append(("flush_replicas", max(self.finished, default=0)))
        return self.memory_reports(range(self.world_size))

    def _restored(self, step: int) -> None:
        FakeGroup.plan.pop("stall_from", None)
        FakeGroup.plan.pop("silent", None)
        self.silent_since = None
        self.queue.clear()
        self.finished = [s for s in self.finished if s <= step]

    def recover_in_place(self, lost, restore_step, attempt, injections):
        self.calls.append(("recover_in_place", sorted(lost), restore_step))
        self._restored(restore_step)
        self.freed = [("pg", r) for r in sorted(lost)]  # the lost slots: spares once training resumed
        return {"recover_s": 0.0, "slowest_rank_phases_s": {}, "received_bytes": 0,
                "replaced": sorted(lost), "spares_left": 0}

    def load_in_place(self, lost, restore, attempt, injections):
        step = restore.step if restore is not None else 0
        self.calls.append(("load_in_place", sorted(lost), step))
        self._restored(step)
        return {"recover_s": 0.0, "slowest_rank_phases_s": {"restore": 0.01}, "received_bytes": 0,
                "replaced": sorted(lost), "spares_left": 0, "driver_phases_s": {}}

    def rollback(self, step, timeout):
        self.calls.append(("rollback", step))
        self.finished = [s for s in self.finished if s <= step]
        return [(r, []) for r in range(self.world_size)]

    # ---- spares, joiners, resizing -----------------------------------------------------
    def live_spares(self):
        return self.scene.spares

    def take_spares(self, n):
        return [("spare", i) for i in range(n)]

    def refill_spares(self):
        self.calls.append(("refill_spares", self.freed, FakeGroup.driver.done_step if FakeGroup.driver else None))
        self.freed = []

    def add_joiner(self, placement=None):
        self.joiners += 1

    def joining(self):
        return self.joiners

    def ready_joiners(self):
        return []

    def drop_joiners(self, joiners):
        pass

    def reshard(self, lost, added, restore_step, attempt, injections):
        self.calls.append(("reshard", sorted(lost), len(added), restore_step))
        self._restored(restore_step)
        freed = [("pg", r) for r in sorted(lost)]
        self.world_size = self.world_size - len(lost) + len(added)
        return {"recover_s": 0.0, "slowest_rank_phases_s": {}, "received_bytes": 0, "replaced": sorted(lost),
                "freed": freed, "driver_phases_s": {}}


def fake_driver(storage: Any, lease: Any = None, stop: Any = None, **overrides: dict[str, Any]) -> Any:
    """A production ``Driver`` whose group is :class:`FakeGroup`: job ``fake`` in ``storage``,
    1..2 ranks, 10 steps of 8 samples, a checkpoint every 4 steps, MLflow off; each keyword
    updates that config section (``train={"max_steps": 6}``)."""
    from raypod.driver.controller import Driver

    raw: dict[str, Any] = {"name": "fake", "checkpoint": {"storage": str(storage), "every_steps": 4},
                           "train": {"max_steps": 10, "global_batch": 8, "micro_batch": 4},
                           "scaling": {"min_workers": 1, "max_workers": 2, "schedule_timeout_s": 1.0},
                           "mlflow": {"enabled": False}}
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    d = Driver(JobConfig.model_validate(raw), recipe=NullRecipe(), lease=lease, stop=stop)
    d.worker_group_cls = FakeGroup
    d.available_resources = lambda: {"CPU": 2.0}
    FakeGroup.driver = d
    return d
