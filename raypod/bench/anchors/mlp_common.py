"""The recovery benchmark's work, shared by both MLP anchors so it is literally the same code.

It mirrors what a raypod rank does for ``jobs/configs/mlp.yaml``
(:class:`raypod.worker.trainer.Trainer` with :class:`raypod.recipes.mlp.MLPRecipe`):
the same 4-block MLP (built by the recipe's own classes after
``torch.manual_seed(seed)``), FSDP2 ``fully_shard`` per block and then the root on a
1-D CPU mesh in fp32, plain AdamW at a constant lr 1e-3, the same seeded sample order
(global batch 32, rank ``r`` takes ids ``r::2``, one micro-batch of 16), loss = mean
of the squared output, and the global gradient norm raypod computes every step
(``grad_clip: 0`` → no clipping). Only process-group setup and checkpointing differ:
the launcher (torchrun or Ray Train) has already initialised gloo, and each anchor
saves ``torch.distributed.checkpoint`` (DCP) shards every 10 steps its own way.

The fault and the record are the same for both anchors:

* rank 1 faults right after completing step ``kill_after`` (25), once per run
  (:func:`maybe_fault`): it first creates ``marker`` exclusively, with the fault's
  kind and unix time (so a restarted group never fires, and the harness knows when it
  fired), then either exits hard (``fault="kill"``: ``os._exit(1)``) or stops itself
  with SIGSTOP (``fault="freeze"``: the process and its sockets stay, nothing answers,
  the CPU stand-in for a dead NCCL peer);
* rank 0 appends ``step,unix_time,attempt`` to the step log after each completed
  step (after ``optimizer.step()``), so the harness reads the recovery gap and the
  replayed steps from it (:func:`raypod.bench.recovery.read_step_log`).

The goodput suite (:mod:`raypod.bench.goodput`) runs the same anchors until an
absolute deadline with the built-in kill off (``kill_after=0``): every rank writes
its pid to ``<workdir>/pids/rank<r>`` (:func:`record_pid`) so the harness can
SIGKILL a rank from outside, and the ranks agree on stopping at the deadline
(:func:`past_deadline`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from raypod.bench.anchors.sharded import ShardedRun
from raypod.recipes.mlp import MLP, GaussianSamples, mlp_loss

FAULTS = ("kill", "freeze")
"""The anchors' fault kinds: ``kill`` (``os._exit(1)``) and ``freeze`` (SIGSTOP of itself)."""


@dataclass(frozen=True)
class MLPJob:
    """``jobs/configs/mlp.yaml``, as the anchors need it."""

    n_blocks: int = 4
    dim: int = 512
    hidden: int = 2048
    num_samples: int = 32768
    global_batch: int = 32
    micro_batch: int = 16
    lr: float = 1e-3
    seed: int = 0
    max_steps: int = 60
    checkpoint_every: int = 10
    kill_after: int = 25
    """0: never fault (the goodput suite kills from outside)."""
    fault: str = "kill"
    """What rank 1 does after step ``kill_after``: one of :data:`FAULTS`."""

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault '{self.fault}' (known: {', '.join(FAULTS)})")


class AppState(Stateful):
    """Model + optimizer as one DCP item (the pattern of torch's and Ray Train's FSDP2 guides)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        msd, osd = get_state_dict(self.model, self.optimizer)
        return {"model": msd, "optim": osd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict["optim"])


class MLPRun(ShardedRun):
    """One rank's model shard, optimizer and data (the gloo process group must exist)."""

    def __init__(self, job: MLPJob = MLPJob()) -> None:
        self.job = job
        super().__init__(job.seed, lambda: MLP(job.n_blocks, job.dim, job.hidden))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=job.lr)
        self.data = GaussianSamples(job.num_samples, job.dim, job.seed)
        self.set_order(len(self.data), job.global_batch, job.seed)

    def step(self, step: int) -> float:
        """Optimizer step ``step`` (1-based); returns this rank's mean loss."""
        job = self.job
        return self.micro_step(step, job.global_batch, job.micro_batch, self._loss, float("inf"))

    def _loss(self, ids: list[int]) -> torch.Tensor:
        return mlp_loss(self.model, self.data.get_batch(ids), torch.device("cpu"))

    # ---- checkpoints (collective: every rank calls them) ---------------------------------
    def save(self, path: str) -> None:
        """DCP-save this rank's shards of model and optimizer under ``path``."""
        dcp.save({"app": AppState(self.model, self.optimizer)}, checkpoint_id=path)

    def load(self, path: str) -> None:
        """Restore model and optimizer from a DCP checkpoint at ``path``."""
        dcp.load({"app": AppState(self.model, self.optimizer)}, checkpoint_id=path)


class StepLog:
    """Rank 0's record of completed steps: ``step,unix_time,attempt`` lines (other ranks: no-op)."""

    def __init__(self, path: str, rank: int, attempt: int) -> None:
        self.path, self.rank, self.attempt = path, rank, attempt

    def completed(self, step: int) -> None:
        if self.rank != 0:
            return
        t = time.time()
        with open(self.path, "a") as f:
            f.write(f"{step},{t:.6f},{self.attempt}\n")
            f.flush()


def maybe_fault(step: int, rank: int, job: MLPJob, marker: str) -> None:
    """Rank 1 faults (``job.fault``) right after step ``job.kill_after``, the first time only.

    The marker line ``<fault> after step <n> at <unix time>`` is written (and closed)
    before the fault fires, so its time is the fault's own time. A ``freeze`` never
    returns unless something sends SIGCONT; the launcher decides what a silent peer is.
    """
    if rank != 1 or job.kill_after <= 0 or step != job.kill_after:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, f"{job.fault} after step {step} at {time.time():.6f}\n".encode())
    os.close(fd)
    if job.fault == "kill":
        os._exit(1)
    # Sent to this thread, so it takes the stop itself on its way out of the call: no line of
    # step 26 runs first (signalling the process lets another thread take it a moment later).
    signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)


def next_attempt(path: str) -> int:
    """Count this start in ``path`` (rank 0 only) and return its 0-based number."""
    with open(path, "a+") as f:
        f.seek(0)
        n = len(f.read().splitlines())
        f.write(f"{time.time():.6f}\n")
    return n


def record_pid(workdir: str, rank: int) -> None:
    """Write this process's pid to ``<workdir>/pids/rank<rank>`` (atomically) for the harness."""
    d = os.path.join(workdir, "pids")
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".rank{rank}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, os.path.join(d, f"rank{rank}"))


def past_deadline(deadline: float | None, step: int, first_step: int, every: int = 10) -> bool:
    """Whether every rank should stop before ``step`` because ``deadline`` (unix time) passed.

    Collective: checked on the first step of an attempt and every ``every`` steps after
    it, as a MAX all-reduce of each rank's verdict, so that all ranks stop at the same
    step (a rank that stopped alone would leave the other in a collective).
    """
    if deadline is None or (step - first_step) % every:
        return False
    flag = torch.tensor([1.0 if time.time() >= deadline else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def prune_checkpoints(ckpt: str, keep: int, prefix: str = "step_") -> None:
    """Delete all but the ``keep`` newest ``<prefix>N`` folders of ``ckpt`` (``keep`` 0: keep all)."""
    if keep <= 0:
        return
    import shutil

    steps = sorted(int(n[len(prefix):]) for n in os.listdir(ckpt)
                   if n.startswith(prefix) and n[len(prefix):].isdigit())
    for s in steps[:-keep]:
        shutil.rmtree(os.path.join(ckpt, f"{prefix}{s}"), ignore_errors=True)


# ---- replica groups: the torchft anchors ----------------------------------------------
# torchft keeps one whole model per replica group and averages gradients over the groups in
# the quorum; these anchors run replica groups of one rank each. Nothing here imports
# torchft (an optional extra): the anchors pass their Manager in.
STATE_FILE = "final_state.sha256"
"""Where an anchor's first rank (first replica group) writes :func:`state_digest` of the final state."""


def state_digest(model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """SHA-256 of the full model and optimizer state, computed as raypod computes ``final_state_sha256``.

    The same ``get_state_dict(..., full_state_dict=True, cpu_offload=True)`` and the same
    fixed-order hash (:func:`raypod.worker.export._digest`), so an anchor's digest is
    comparable with its own fault-free run (and, for the same math, with raypod's).
    Collective when the model is FSDP-sharded (every rank calls it).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    from raypod.worker.export import _digest

    msd, osd = get_state_dict(model, optimizer,
                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _digest(msd, osd)


def write_digest(workdir: str, digest: str) -> None:
    """Write ``digest`` to ``<workdir>/final_state.sha256`` (atomically)."""
    tmp = os.path.join(workdir, f".{STATE_FILE}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(digest + "\n")
    os.replace(tmp, os.path.join(workdir, STATE_FILE))


class ReplicaRun:
    """One replica group of one rank: the whole MLP (no sharding), AdamW, its share of each batch.

    The model is built after ``torch.manual_seed(seed)`` as every raypod rank builds it,
    so all groups start equal (torchft's ``init_sync`` is not needed). Group ``g`` of
    ``n_groups`` takes ids ``g::n_groups`` of step ``s``'s global batch (raypod's rank
    share): with every group in the quorum, the averaged gradient is the one of the whole
    global batch, as for raypod; a group missing from a step leaves its share untrained.
    """

    def __init__(self, job: MLPJob, group: int, n_groups: int) -> None:
        from raypod.data.order import SampleOrder

        self.job, self.group, self.n_groups = job, group, n_groups
        torch.manual_seed(job.seed)
        self.model = MLP(job.n_blocks, job.dim, job.hidden)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=job.lr)
        self.data = GaussianSamples(job.num_samples, job.dim, job.seed)
        self.order = SampleOrder(len(self.data), job.global_batch, job.seed)

    def ids(self, step: int) -> list[int]:
        """This group's sample ids of step ``step`` (1-based)."""
        from raypod.data.order import SampleOrder

        return SampleOrder.rank_share(self.order.ids(step), self.group, self.n_groups).tolist()

    def state_dict(self) -> dict[str, Any]:
        """What a healing group receives from a live one (torchft's ``state_dict`` callback)."""
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """torchft's ``load_state_dict`` callback: take a live group's state."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])


class ReplicaLog:
    """A replica group's record: ``step,unix_time,attempt,samples,committed`` per step it ran.

    ``samples`` is what this group trained in the step (0 when it was healing and not
    participating); ``committed`` is 1 when the step's update was applied, 0 when torchft
    threw it away (an error in the step: the same step number runs again). Every group
    writes ``<workdir>/steps.rg<g>.log``; the first group also writes ``steps.log``, the
    log the suites read for every system (3-column readers ignore the extra columns).
    """

    def __init__(self, workdir: str, group: int, attempt: int) -> None:
        self.paths = [os.path.join(workdir, f"steps.rg{group}.log")]
        if group == 0:
            self.paths.append(os.path.join(workdir, "steps.log"))
        self.attempt = attempt

    def ran(self, step: int, samples: int, committed: bool) -> None:
        line = f"{step},{time.time():.6f},{self.attempt},{samples},{int(committed)}\n"
        for path in self.paths:
            with open(path, "a") as f:
                f.write(line)


def average_gradients(model: nn.Module, manager: Any) -> None:
    """Average ``model``'s gradients over the quorum with the Manager's fault-tolerant allreduce.

    One flat buffer, one ``manager.allreduce`` (AVG over the participants; a healing group
    contributes zeros), as torchft's ``DistributedDataParallel`` hook does per bucket. A failed
    allreduce is reported to the manager (``should_commit`` then says no and the step runs
    again). torchft 0.2.0's DDP hook is not used: on a failed allreduce it asserts
    (``assert fut._fut`` in ``ddp.py``) and the survivor crashes with its lost peer.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    manager.allreduce(flat).wait()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def train_replica(run: ReplicaRun, manager: Any, log: ReplicaLog, workdir: str,
                  deadline: float | None = None) -> None:
    """Train one replica group under a torchft ``Manager`` until step ``max_steps`` or ``deadline``.

    Each step is what ``torchft.optim.Optimizer`` does, spelt out so the log can say whether
    the step committed: ``start_quorum`` (and wait for it, so that the step number, which
    a healing group takes from its peers, picks the right samples), forward and backward,
    the gradient averaged over the quorum (:func:`average_gradients`), then
    ``should_commit`` and ``optimizer.step()`` only when it says so.
    Group 1 faults after committing step ``kill_after`` (:func:`maybe_fault`, rank = group).

    A group that starts after the first group finished the job (its digest is written)
    returns at once: alone in the quorum at step 0 it would otherwise train a fresh model
    from step 1 by itself (the "split brain" Ray's torchft example warns of).
    """
    job = run.job
    marker = os.path.join(workdir, "kill.marker")
    if os.path.exists(os.path.join(workdir, STATE_FILE)):
        return
    while manager.current_step() < job.max_steps:
        if deadline is not None and time.time() >= deadline:
            break  # torchft tolerates a group that leaves: no agreement needed
        manager.start_quorum()
        run.optimizer.zero_grad(set_to_none=True)
        manager.wait_quorum()
        step = manager.current_step() + 1
        ids = run.ids(step)
        mlp_loss(run.model, run.data.get_batch(ids), torch.device("cpu")).backward()
        average_gradients(run.model, manager)
        samples = len(ids) if manager.is_participating() else 0
        committed = manager.should_commit()
        if committed:
            run.optimizer.step()
        log.ran(step, samples, committed)
        if committed:
            maybe_fault(step, run.group, job, marker)
