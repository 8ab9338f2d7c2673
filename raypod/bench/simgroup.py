"""A simulated worker group in virtual time, for driving the real driver at 100,000 ranks.

:class:`SimGroup` implements every member of :class:`raypod.protocol.WorkerGroupProtocol`
without Ray or processes: N ranks that train a step in ``step_s(N)`` of virtual time, answer
pings, heartbeats and memory reports, and re-form in place, each at the cost the calibration
(:mod:`raypod.bench.calibration`) gives for N. :class:`VirtualClock` is the clock the driver
reads during a simulation (:func:`driver_clock` patches it into the driver's modules): it
stands still while the simulated group works and advances by the modelled costs it charges,
and it advances by the driver's own real CPU time between two group calls, so the real
Python work of the ledger, completion and diagnosis at N ranks costs virtual time too.

What goes wrong is a :class:`FaultPlan`: a rank killed (its process gone: its call fails
once Ray notices) or frozen (it stops answering pings) half-way through a chosen step.
"""

from __future__ import annotations

import contextlib
import pickle
import time
import types
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

from raypod.bench.calibration import Calibration
from raypod.data.order import SampleOrder
from raypod.driver.inflight import COLLECT_PER_POLL, SUBMIT_PER_POLL
from raypod.driver.liveness import SLOW_WINDOW_S, zone_size
from raypod.driver.outcomes import PollResult
from raypod.protocol import ErrorKind, Heartbeat, MemoryReport, Phase, Silence, StepResult, WorkerError

DRIVER_MODULES = ("controller", "accounting", "completion", "ledger", "diagnosis", "membership",
                  "recovery", "stop")
"""The ``raypod.driver`` modules that read the clock (each imports ``time``)."""
CLOCK_MODULES = tuple(f"raypod.driver.{m}" for m in DRIVER_MODULES) + ("raypod.policies.cadence",)
INTERRUPT_AFTER_S = 0.1
"""The drain interrupts survivors this long after a loss (``raypod.driver.inflight``)."""
RANKS_PER_NODE = 8
EPOCH_STEPS = 64
"""Steps in one epoch of the simulated data set."""


def liveness_round(cal: Any, ranks: int, agents: bool = True,
                   zoned_from: int = 64) -> tuple[int, float, bool]:
    """``(driver calls per probe round, seconds until the round is answered, zoned)`` for
    ``ranks``, as the production probes make them (:class:`raypod.driver.liveness.NodeAgents`):
    without agents a ping per rank (``ping(N)``); with them a request per node agent, answered
    ``ping(nodes) + ping(RANKS_PER_NODE)`` later (the agent pinged its ranks); past
    ``zoned_from`` nodes a request per zone leader (zones of ``ceil(sqrt(nodes))`` agents),
    answered ``ping(zones) + ping(zone)`` later (the leader answers at once with what its
    members said at its previous request, so a member's news is up to a probe interval older:
    its age travels with it)."""
    if not agents or ranks <= 1:
        return ranks, cal.ping.at(ranks), False
    nodes = -(-ranks // RANKS_PER_NODE)
    if nodes <= zoned_from:
        return nodes, cal.ping.at(nodes) + cal.ping.at(min(ranks, RANKS_PER_NODE)), False
    size = zone_size(nodes)
    count = -(-nodes // size)
    return count, cal.ping.at(count) + cal.ping.at(size), True


class VirtualClock:
    """Virtual seconds: advanced by modelled costs (:meth:`advance`) and by the driver's real
    CPU time, which is charged whenever the driver reads the clock or calls its group."""

    def __init__(self, epoch: float = 1.7e9) -> None:
        self.t = 0.0
        self.epoch = epoch
        self.driver_cpu_s = 0.0
        """Real process CPU seconds of driver code charged so far."""
        self._mark = time.process_time()
        self._paused = 0

    def charge(self) -> None:
        """Charge the driver's CPU since the last mark to the virtual clock."""
        now = time.process_time()
        if not self._paused:
            cpu = now - self._mark
            self.t += cpu
            self.driver_cpu_s += cpu
        self._mark = now

    def advance(self, seconds: float) -> None:
        self.t += max(0.0, seconds)

    @contextlib.contextmanager
    def outside(self) -> Iterator[None]:
        """Work that is not the driver's (the simulated group, the harness): not charged."""
        self.charge()
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1
            self._mark = time.process_time()

    def monotonic(self) -> float:
        self.charge()
        return self.t

    def wall(self) -> float:
        return self.epoch + self.monotonic()

    def sleep(self, seconds: float) -> None:
        self.charge()
        self.advance(seconds)

    def module(self) -> types.SimpleNamespace:
        """A stand-in for the ``time`` module as the driver uses it."""
        return types.SimpleNamespace(time=self.wall, monotonic=self.monotonic, perf_counter=self.monotonic,
                                     sleep=self.sleep, process_time=time.process_time)


@contextlib.contextmanager
def driver_clock(clock: VirtualClock) -> Iterator[None]:
    """Have every driver module read ``clock`` instead of the real time while the block runs."""
    fake = clock.module()
    with contextlib.ExitStack() as stack:
        for name in CLOCK_MODULES:
            stack.enter_context(mock.patch(f"{name}.time", fake))
        yield


@dataclass
class FaultPlan:
    """What goes wrong: ``kind`` (``kill`` or ``freeze``) of ``rank`` half-way through ``step``."""

    kind: str = "kill"
    rank: int = 1
    step: int = 0
    """0: nothing goes wrong."""
    at_s: float | None = None
    """Virtual time it happened (set when it does)."""
    fired: bool = False
    resolved: bool = False
    """The group was re-formed after it: it is over."""


@dataclass
class Costs:
    """What the simulated group charged, by term: modelled driver CPU (``cpu``) and waits (``wall``)."""

    cpu: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    wall: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def result_unpack_s(ranks: int = RANKS_PER_NODE, rounds: int = 200) -> float:
    """Seconds of this process's CPU to unpickle one step result in a list of ``ranks`` (a
    node's list, :meth:`raypod.worker.node_agent.NodeAgent.window`): the median of ``rounds``."""
    share = list(range(8))
    batch = [(r, "step", StepResult(step=1, rank=r, loss_sum=8.0, samples=8, ids=share, epoch=0, lr=0.1,
                                    grad_norm=1.0, compute_s=1.0, replicated=[0])) for r in range(ranks)]
    data = pickle.dumps(batch)
    times = []
    for _ in range(rounds):
        t = time.process_time()
        pickle.loads(data)
        times.append(time.process_time() - t)
    times.sort()
    return times[len(times) // 2] / ranks


class SimGroup:
    """N simulated ranks behind the driver's group protocol (see the module docstring).

    Args:
        config, recipe: as the driver builds any group (the config's ``scaling.spares`` are warm).
        cal: the per-operation costs.
        clock: the virtual clock the driver reads.
        plan: the fault to inject.
    """

    def __init__(self, config: Any, recipe: Any, cal: Calibration, clock: VirtualClock,
                 plan: FaultPlan | None = None) -> None:
        self.cfg, self.recipe, self.cal, self.clock = config, recipe, cal, clock
        self.plan = plan or FaultPlan()
        self.costs = Costs()
        self.world_size = 0
        self.nodes: list[str] = []
        self.excluded_nodes: set[str] = set()
        self.freed: list[Any] = []
        self.peer_to: list[int | None] = []
        self.twins: list[int | None] | None = None
        self.spares = config.scaling.spares
        self.queue: list[tuple[Any, ...]] = []
        """Calls in flight: ``(what, step, done at, [acknowledged steps,] sending)``; ``sending`` is
        ``(ticket, done at)`` while some of the calls are still queued at the driver, else None."""
        self.backlog: deque[list[Any]] = deque()
        """Calls queued at the driver and not sent yet, in order: ``[term, count]`` (as
        :class:`raypod.driver.inflight.InFlight` sends at most ``SUBMIT_PER_POLL`` per poll)."""
        self.enqueued = self.sent = 0
        self.per_flush = SUBMIT_PER_POLL
        self.per_collect = COLLECT_PER_POLL
        self.taken = 0
        """With windows: results of the first step in :attr:`queue` collected so far (the driver
        collects at most :attr:`per_collect` streams' results a poll)."""
        self.window_open = False
        """Step windows (``train.step_window``): whether the ranks' window calls are running."""
        self.unpack_s = result_unpack_s()
        """CPU to unpickle one more rank's step result in a node's list (measured here, in this
        process: the driver's own work, like its real CPU that the simulation runs)."""
        self.unacked: tuple[int, ...] = ()
        """The last snapshot step submitted: the next step's results acknowledge its replicas."""
        self.busy_until = 0.0
        self.finished = 0
        """The last step every rank finished."""
        self.dead: set[int] = set()
        self.frozen: set[int] = set()
        self.ping_round = (0.0, 0.0)
        """The ranks' current ping round: ``(sent at, answered at)``."""
        self.silent_since: float | None = None
        """When the frozen rank's unanswered ping was sent."""
        self.late: deque[tuple[float, float]] = deque()
        """``(seen at, seconds)``: ping rounds answered over 0.25 s after they were sent, as the
        driver's :class:`raypod.driver.liveness.Probes` notes late answers (a busy host gets more
        time before its ranks count as silent)."""
        self._round_seen = -1.0
        # The seeded order the ranks read (an epoch of EPOCH_STEPS steps), so the driver's books
        # see what real ranks report: each rank's strided share of the step's ids.
        self.order = SampleOrder(config.train.global_batch * EPOCH_STEPS, config.train.global_batch,
                                 config.train.seed)

    # ---- costs -----------------------------------------------------------------------
    def _cpu(self, term: str, seconds: float) -> None:
        self.costs.cpu[term] += seconds
        self.clock.advance(seconds)

    def _wait(self, term: str, seconds: float) -> None:
        self.costs.wall[term] += seconds
        self.clock.advance(seconds)

    def _calls(self, term: str, n: int) -> None:
        """Submit ``n`` actor calls and collect their answers (driver CPU)."""
        if n:
            self._cpu(term, self.cal.actor_call.at(n))

    def _round(self, term: str, n: int) -> None:
        """One call to each of ``n`` ranks, waited for: submit, then the slowest answer."""
        self._calls(term, n)
        if n:
            self._wait(term, self.cal.ping.at(n))

    def _fanout(self, term: str, n: int) -> None:
        """One call to each of ``n`` ranks as :func:`raypod.driver.rank_calls.call_ranks` makes
        it: with node agents a call per node, answered once each agent has its ranks' answers
        (:meth:`_probe_calls`); else one per rank (:meth:`_round`)."""
        calls, round_s = self._probe_calls(n)
        self._calls(term, calls)
        if n:
            self._wait(term, round_s)

    def rebuild_s(self, n: int) -> float:
        """Seconds for ``n`` ranks to form their groups (after a loss: rejoin and restore): on a
        cluster each rank works on cores of its own, so the slowest rank's CPU in its rejoin
        (``cal.regroup_cpu``); a calibration without it gives the wall time of ``n`` ranks
        sharing the measuring machine's cores (``cal.regroup``)."""
        fit = self.cal.regroup_cpu if self.cal.regroup_cpu is not None else self.cal.regroup
        return fit.at(n)

    # ---- lifecycle -----------------------------------------------------------------
    def start(self, world_size, attempt, restore, injections):
        with self.clock.outside():
            self.world_size = world_size
            self.nodes = [f"node-{r // RANKS_PER_NODE}" for r in range(world_size)]
            self.peer_to = [(r + 1) % world_size if world_size > 1 else None for r in range(world_size)]
            self._calls("start", world_size)
            self._wait("start", self.rebuild_s(world_size))
            self._restored(restore.step if restore else 0)
            return {"num_samples": self.order.num_samples, "setup_s": self.rebuild_s(world_size),
                    "doctor": []}

    def shutdown(self):
        self.world_size = 0
        self._unqueue()

    def _unqueue(self) -> None:
        """Forget the calls in flight and those not sent yet (a recovery, a roll back, the end)."""
        self.window_open = False
        self.queue, self.taken = [], 0
        self.backlog.clear()
        self.enqueued = self.sent

    def close(self):
        self.shutdown()

    def _restored(self, step: int) -> None:
        self._unqueue()
        self.busy_until, self.finished = self.clock.t, step
        self.dead, self.frozen, self.silent_since = set(), set(), None
        self.ping_round = (self.clock.t, self.clock.t)
        self.plan.resolved = self.plan.fired

    # ---- steps -----------------------------------------------------------------------
    def submit_step(self, step, snapshot=True):
        """Every rank runs ``step``; its results carry the replica acknowledgement of the previous
        snapshot step (its round ends before this step's own snapshot starts), as real ranks do."""
        with self.clock.outside():
            if self._windows():
                # One store write grants the step to every rank; their results stream back in
                # the calls that opened the window (one per rank, when none is open).
                if not self.window_open:
                    ticket, self.window_open = self._send("open_window", self._streams(self.world_size)), True
                else:
                    ticket = self.enqueued
            else:
                ticket = self._send("submit_step", self.world_size)
            done = max(self.clock.t, self.busy_until) + self.cal.step_s.at(self.world_size) + self._relay_s()
            self.busy_until = done
            if self.plan.step == step and not self.plan.fired:
                self.plan.fired, self.plan.at_s = True, done - self.cal.step_s.at(self.world_size) / 2
            # A snapshot step not acknowledged yet; one at or after ``step`` was rewound (a recovery).
            acked = tuple(s for s in self.unacked if s < step)
            self.unacked = (step,) if snapshot else ()
            self.queue.append(self._entry(("step", step, done, acked), ticket))

    def submit_replica_wait(self, step):
        """The driver's fallback: acknowledged once the ranks' queued work is done."""
        with self.clock.outside():
            ticket = self._send("submit_replica_wait", self.world_size)
            self.queue.append(self._entry(("replica", step, self.busy_until), ticket))

    def _per_stream(self) -> int:
        """Ranks per window stream: a node's ranks when its agent opens their windows
        (``train.window_agents_from``, as ``WorkerGroup._window_agents``), else 1."""
        least = self.cfg.train.window_agents_from
        agents = bool(getattr(self.cfg.fault, "node_agents", False))
        if agents and least and self.world_size >= least and self._windows():
            return min(RANKS_PER_NODE, self.world_size)
        return 1

    def _streams(self, ranks: int) -> int:
        """Window streams that carry ``ranks`` ranks' results."""
        k = self._per_stream()
        return -(-ranks // k)

    def _windows(self) -> bool:
        """Whether the driver hands out steps in windows (as ``WorkerGroup.submit_step`` does;
        a calibration without ``stream_item`` models one call per rank and step)."""
        return bool(self.cfg.train.step_window) and self.cal.stream_item is not None

    def submit_save(self, step, path):
        self.window_open = False  # the ranks' windows end before the save
        with self.clock.outside():
            ticket = self._send("submit_save", self.world_size)
            self.queue.append(self._entry(("save", step, self.busy_until), ticket))

    def _relay_s(self) -> float:
        """How much later a step's results reach the driver through a node agent: the agent
        collects its ranks' results (``stream_item`` for its ranks) before it sends them up."""
        k = self._per_stream()
        return self.cal.stream_item.at(k) if k > 1 and self.cal.stream_item is not None else 0.0

    def _send(self, term: str, n: int) -> int:
        """Queue ``n`` calls at the driver and send what one flush allows; returns the number
        of calls queued so far (the ticket: the calls are all sent once :attr:`sent` reaches it)."""
        self.enqueued += n
        self.backlog.append([term, n])
        self._flush()
        return self.enqueued

    def _flush(self, everything: bool = False) -> None:
        """Send up to :attr:`per_flush` queued calls (``everything``: all), charging the driver
        for each. A call group all sent now finishes no earlier than now; a step no earlier than
        a step's time after now (the last rank starts it when its call arrives: a window's first
        step), and each step a step's time after the one before (a window's later steps, granted
        before the calls that run them arrived, follow its first)."""
        left = self.enqueued - self.sent if everything else self.per_flush
        while self.backlog and left > 0:
            term, n = self.backlog[0]
            take = min(n, left)
            self._calls(term, take)
            self.sent, left = self.sent + take, left - take
            if take == n:
                self.backlog.popleft()
            else:
                self.backlog[0][1] -= take
        step_s, now, last = self.cal.step_s.at(self.world_size), self.clock.t, None
        queue = []
        for c in self.queue:
            if c[-1] is not None and c[-1][0] <= self.sent:  # sent now
                due = max(c[-1][1], now + step_s if c[0] == "step" else now)
                if c[0] == "step" and last is not None:
                    due = max(due, last + step_s)
                c = (*c[:2], due, *c[3:-1], None)
            if c[0] == "step":
                last = c[2] if c[2] != float("inf") else None
            queue.append(c)
        self.queue = queue
        if last is not None:
            self.busy_until = max(self.busy_until, last)

    def _entry(self, call: tuple[Any, ...], ticket: int) -> tuple[Any, ...]:
        """A call group in flight: due at ``call[2]`` once all its calls are sent."""
        if ticket <= self.sent:
            return (*call, None)
        return (*call[:2], float("inf"), *call[3:], (ticket, call[2]))

    @property
    def in_flight(self) -> int:
        return len(self.queue)

    def _fault_at(self) -> float | None:
        """When the planned fault takes effect for the driver: a kill's error arrives once
        Ray notices the dead process (a one-rank round trip); a freeze stops the steps."""
        if not self.plan.fired or self.plan.resolved or self.plan.at_s is None:
            return None
        notice = self.cal.ping.at(1) if self.plan.kind == "kill" else 0.0
        return self.plan.at_s + notice

    def poll(self, timeout):
        with self.clock.outside():
            self._flush()
            if self.queue:  # with windows the driver waits on one stream per rank (or node), not a call per step
                refs = self._streams(self.world_size) if self._windows() else self.world_size * len(self.queue)
                self._cpu("poll_wait", self.cal.wait.at(refs))
            return self._collect(self.clock.t + timeout)

    def _collect(self, until: float) -> PollResult:
        """Results of every call done by ``until`` (the clock moves to the first one, or to ``until``)."""
        out = PollResult()
        fault = self._fault_at()
        if fault is not None and self.plan.kind == "freeze" and fault <= until:
            self.frozen.add(self.plan.rank)
        due = [c[2] for c in self.queue if fault is None or c[2] < fault]
        if fault is not None and self.plan.kind == "kill" and self.plan.rank not in self.dead:
            due.append(fault)
        first = min(due, default=None)
        if first is None or first > until:
            self.clock.t = max(self.clock.t, until)
            return out
        self.clock.t = max(self.clock.t, first)
        if fault is not None and self.plan.kind == "kill" and fault <= self.clock.t and self.plan.rank not in self.dead:
            self.dead.add(self.plan.rank)
            out.errors.append(WorkerError(rank=self.plan.rank, step=self.plan.step, kind=ErrorKind.WORKER_DIED,
                                          message="the worker does not answer (process or node lost)"))
            return out
        budget = self.per_collect if self._windows() else None
        for call in [c for c in self.queue if c[2] <= self.clock.t and (fault is None or c[2] < fault)]:
            if call[0] == "step" and budget is not None:
                if budget <= 0:
                    break
                take = min(budget * self._per_stream(), self.world_size - self.taken)
                budget -= self._streams(take)
                self._take(call, take, out)
                if self.taken < self.world_size:
                    break  # the rest of the step's results come in the next polls
                self.taken = 0
            else:
                self._deliver(call, out)
            self.queue.remove(call)
        return out

    def _take(self, call: tuple[Any, ...], take: int, out: PollResult) -> None:
        """``take`` more ranks' streamed results of the step ``call`` (``(what, step, done at,
        acknowledged steps, ...)``), as one poll of the driver collects them."""
        step, items = call[1], self._streams(take)
        self._cpu("stream_results", self.cal.stream_item.at(items) + self.unpack_s * (take - items))
        out.steps.extend(self._results(step, call[3], range(self.taken, self.taken + take)))
        self.taken += take
        if self.taken == self.world_size:
            self.finished = max(self.finished, step)

    def _deliver(self, call: tuple[Any, ...], out: PollResult) -> None:
        """``call`` is ``(what, step, done at)``, and for a step (one call per rank; with windows
        see :meth:`_take`) the acknowledgements its results carry."""
        what, step = call[0], call[1]
        n = self.world_size
        if what == "step":
            out.steps.extend(self._results(step, call[3]))
            self.finished = max(self.finished, step)
        elif what == "replica":
            out.replicated.extend((r, step, True) for r in range(n))
        else:
            out.saved.extend((r, [step]) for r in range(n))

    def _results(self, step: int, acked: tuple[int, ...] = (), ranks: range | None = None) -> list[StepResult]:
        """The result of ``step`` of each of ``ranks`` (default: all), each with its own sample ids
        (as deserialized) and the snapshot steps ``acked`` whose replicas it has in place since
        its last result."""
        n, step_s = self.world_size, self.cal.step_s.at(self.world_size)
        ids, epoch = self.order.ids(step), self.order.epoch_of(step)
        out = []
        for r in ranks if ranks is not None else range(n):
            share = SampleOrder.rank_share(ids, r, n)
            out.append(StepResult(step=step, rank=r, loss_sum=float(len(share)), samples=len(share), ids=share,
                                  epoch=epoch, lr=0.1, grad_norm=1.0, compute_s=step_s, replicated=list(acked)))
        return out

    def quiesce(self, timeout):
        self.window_open = False
        with self.clock.outside():
            self._flush(everything=True)
            return self._collect(max(self.clock.t + timeout, self.busy_until))

    def finish_saves(self):
        return []

    def state_digest(self, export_path=None, pretrained_dir=None):
        return None

    # ---- health ----------------------------------------------------------------------
    def heartbeats(self, timeout):
        """As the worker group asks them: through the node agents (:meth:`_probe_calls`)."""
        with self.clock.outside():
            calls, round_s = self._probe_calls(self.world_size)
            self._calls("heartbeats", calls)
            self._wait("heartbeats", timeout if self.frozen else round_s)
            step = self.finished + 1
            return {r: None if r in self.frozen | self.dead else
                    Heartbeat(rank=r, step=step, phase=Phase.SYNC, in_phase_s=0.0) for r in range(self.world_size)}

    def probe(self, every_s):
        """Rounds of liveness pings: one sent ``every_s`` after the last (at most one in
        flight). Per rank (``fault.node_agents`` off): a call to each of N ranks, answered by
        all ``ping(N)`` later. With node agents: a call to each node's agent
        (:meth:`_probe_calls`), answered ``ping(nodes) + ping(RANKS_PER_NODE)`` later, the
        agent having pinged its ranks. A round answered over 0.25 s after it was sent is a late
        answer (``slowest_s`` of the reply), as the driver's probes note them. A frozen rank never answers the ping in flight when it
        froze (or the next one sent): the driver's, or its agent's (:meth:`_agent_silent_since`),
        which the agent's next report carries."""
        with self.clock.outside():
            n, now = self.world_size, self.clock.t
            calls, round_s, zoned = self._liveness(n)
            sent, answered = self.ping_round
            self._cpu("probe_wait", self.cal.wait.at(calls))
            if now >= answered > sent != self._round_seen:  # a round answered, seen now
                self._round_seen = sent
                if now - sent > 0.25:
                    self.late.append((now, now - sent))
            while self.late and self.late[0][0] < now - SLOW_WINDOW_S:
                self.late.popleft()
            if now >= answered and now - sent >= every_s:
                self._calls("probe_send", calls)
                self.ping_round = sent, answered = now, now + round_s
            frozen_at = self.plan.at_s if self.plan.kind == "freeze" and self._fault_at() is not None else None
            if frozen_at is not None and frozen_at <= now and self.silent_since is None:
                self.frozen.add(self.plan.rank)
                if calls < n:
                    self.silent_since = self._agent_silent_since(frozen_at, every_s)
                elif sent <= frozen_at < answered or sent >= frozen_at:
                    self.silent_since = sent
            out = dict.fromkeys(range(n), now - sent if now < answered else 0.0)
            # The agent's report reaches the driver a node round after its ping went unanswered.
            # Through a zone: its leader has it at its next request, a probe interval later.
            seen = self.silent_since is not None and (
                calls == n or now >= self.silent_since + round_s + (every_s if zoned else 0.0))
            if seen:
                out[self.plan.rank] = max(out[self.plan.rank], now - self.silent_since)
            return Silence(out, slowest_s=max((late for _, late in self.late), default=0.0))

    def _probe_calls(self, n: int) -> tuple[int, float]:
        """``(driver calls, seconds until all are answered)`` of one call to each of ``n`` ranks
        as :func:`raypod.driver.rank_calls.call_ranks` makes it (a recovery's fan-out): with
        ``fault.node_agents`` a call per node, answered once the agent has its ranks' answers;
        past ``fault.agent_zones_from`` nodes a call per zone, whose leader relays through its
        members (one more round: a zone's agents); else a call per rank."""
        calls, round_s, zoned = self._liveness(n)
        # A probe's zone leader answers from its members' last replies; a relay waits for theirs,
        # which wait for their ranks' answers: one local round more.
        return calls, round_s + (self.cal.ping.at(RANKS_PER_NODE) if zoned else 0.0)

    def _liveness(self, n: int) -> tuple[int, float, bool]:
        """One probe round for ``n`` ranks (:func:`liveness_round`, this job's settings)."""
        fault = self.cfg.fault
        return liveness_round(self.cal, n, bool(getattr(fault, "node_agents", False)),
                              int(getattr(fault, "agent_zones_from", 64)))

    def _agent_silent_since(self, frozen_at: float, every_s: float) -> float:
        """When the frozen rank's unanswered ping was sent by its node agent, which pings its
        ranks on its own clock every ``every_s`` (or a local round, if longer): the local
        round in flight at ``frozen_at``, else the next one."""
        local = self.cal.ping.at(RANKS_PER_NODE)
        period = max(every_s, local)
        start = (frozen_at // period) * period
        return start if frozen_at < start + local else start + period

    def unresponsive_ranks(self, ranks, timeout):
        with self.clock.outside():
            self._round("second_ping", len(ranks))
            return {r for r in ranks if r in self.frozen | self.dead}

    def node_of(self, rank):
        return self.nodes[rank] if rank < len(self.nodes) else f"node-{rank}"

    def holder_of(self, rank):
        return self.peer_to[rank] if rank < len(self.peer_to) else None

    # ---- recovery --------------------------------------------------------------------
    def kill(self, ranks):
        with self.clock.outside():
            self._calls("kill", len(ranks))
            self.dead |= set(ranks)

    def drain(self, timeout, attempt=None, keep=frozenset(), patience=None, gone=frozenset()):
        """Calls in flight end once the broken collective releases the survivors: they are
        interrupted after :data:`INTERRUPT_AFTER_S` (every survivor, as with NCCL, where nothing
        else releases them) and answer in one round, through the node agents when on."""
        with self.clock.outside():
            self._unqueue()
            self._wait("drain", min(timeout, INTERRUPT_AFTER_S))
            self._fanout("drain", self.world_size - len(self.dead))
            return set(self.dead | self.frozen)

    def memory_reports(self, ranks, timeout=5.0):
        with self.clock.outside():
            ranks = list(ranks)
            self._fanout("memory_reports", len(ranks))
            return self._reports(ranks)

    def _reports(self, ranks: list[int]) -> dict[int, MemoryReport]:
        held = [s for s in (self.finished - 1, self.finished) if s > 0]
        return {r: MemoryReport(own=list(held), replicas={(r - 1) % self.world_size: list(held)}) for r in ranks}

    def flush_replicas(self, timeout, latest=False):
        with self.clock.outside():
            self._round("flush_replicas", self.world_size)  # one call per rank (the worker group's)
            return self._reports(list(range(self.world_size)))

    def _regroup(self, lost: set[int], step: int) -> dict[str, Any]:
        self._round("regroup", len(lost))  # where the new actors run (the others stay put)
        self._regroup_calls(self.world_size)
        regroup = self.rebuild_s(self.world_size)
        self._wait("regroup", regroup)
        self._restored(step)
        self.freed = [("slot", r) for r in sorted(lost)]
        self.spares = max(0, self.spares - len(lost))
        return {"recover_s": regroup, "slowest_rank_phases_s": {"regroup": regroup}, "received_bytes": 0,
                "replaced": sorted(lost), "spares_left": self.spares, "driver_phases_s": {}}

    def _regroup_calls(self, n: int) -> None:
        """The driver's part of sending a regroup's call to ``n`` ranks and getting their
        results, as :meth:`WorkerGroup._submit_regroup
        <raypod.driver.worker_group.WorkerGroup._submit_regroup>` makes them: with node agents,
        one call per node, or per zone past ``fault.agent_zones_from`` nodes (``actor_call``),
        then each rank's result got from the ref its agent handed back (``stream_item``: collecting one small result per rank, the calibration's
        nearest measure); without agents, or a calibration without ``stream_item``, one call
        per rank."""
        calls, _ = self._probe_calls(n)
        if calls < n and self.cal.stream_item is not None:
            self._calls("regroup", calls)
            self._cpu("regroup", self.cal.stream_item.at(n))
        else:
            self._calls("regroup", n)

    def recover_in_place(self, lost, restore_step, attempt, injections):
        with self.clock.outside():
            return self._regroup(set(lost), restore_step)

    def load_in_place(self, lost, restore, attempt, injections):
        with self.clock.outside():
            return self._regroup(set(lost), restore.step if restore is not None else 0)

    def rollback(self, step, timeout):
        with self.clock.outside():
            self._round("rollback", self.world_size)
            self._restored(step)
            return [(r, []) for r in range(self.world_size)]

    # ---- spares, joiners, resizing -----------------------------------------------------
    def live_spares(self):
        return self.spares

    def take_spares(self, n):
        taken = min(n, self.spares)
        self.spares -= taken
        return [("spare", i) for i in range(taken)]

    def refill_spares(self):
        self.spares += len(self.freed)
        self.freed = []

    def add_joiner(self, placement=None):
        pass

    def joining(self):
        return 0

    def ready_joiners(self):
        return []

    def drop_joiners(self, joiners):
        pass

    def reshard(self, lost, added, restore_step, attempt, injections):
        with self.clock.outside():
            info = self._regroup(set(lost), restore_step)
            self.world_size = self.world_size - len(lost) + len(added)
            self.nodes = self.nodes[: self.world_size]
            self.peer_to = [(r + 1) % self.world_size for r in range(self.world_size)]
            return {**info, "freed": list(self.freed)}
