"""Recovery anchor: ``jobs/configs/mlp.yaml``'s MLP under torchft on its own (``torchft.Manager``).

    python raypod/bench/anchors/mlp_torchft.py --workdir DIR [--fault kill|freeze]

Launched as torchft's README shows: this launcher starts a lighthouse
(``torchft_lighthouse --min_replicas 1 --quorum_tick_ms 100 --join_timeout_ms 10000``),
then one ``torchrun --nnodes 1 --nproc-per-node 1 --max-restarts 2 --master-port P``
per replica group with ``REPLICA_GROUP_ID``, ``NUM_REPLICA_GROUPS=2`` and
``TORCHFT_LIGHTHOUSE``, each running this file with ``--replica``; it waits for both
groups, stops the lighthouse and exits with the worst of their exit codes.

Each replica group is one rank with the whole model (:class:`.mlp_common.ReplicaRun`), a
``ProcessGroupGloo`` (timeout 5 s), a ``PGTransport`` (10 s) for healing and a
``Manager(min_replica_size=1, timeout=30 s)``: the values of torchft's ``train_ddp.py``;
the gradient is averaged with the Manager's allreduce (:func:`.mlp_common.average_gradients`:
torchft 0.2.0's DDP wrapper crashes the survivor when its peer dies mid-allreduce). Group ``g`` trains ids
``g::2`` of each step's global batch of 32 (:func:`.mlp_common.train_replica`). Group 1
faults after committing step 25 the first time (``DIR/kill.marker``); its torchrun
agent restarts it and the new process heals from group 0 (receives its live state)
while group 0 keeps training alone. No persistent checkpoint: torchft recovers from a
live peer, and this benchmark never loses every group.

Every group logs ``step,unix_time,attempt,samples,committed`` to ``DIR/steps.rg<g>.log``
(group 0 also to ``DIR/steps.log``; ``attempt`` = ``TORCHELASTIC_RESTART_COUNT``), and
group 0 writes the final state's digest to ``DIR/final_state.sha256``. For the goodput
suite: ``--deadline UNIX_TIME`` stops each group at that time, ``--no-kill`` turns the
built-in fault off, ``--max-restarts N`` is each group's torchrun's, and each group's
rank writes its pid to ``DIR/pids/rank<g>``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

GROUPS = 2
LIGHTHOUSE_ARGS = ("--min_replicas", "1", "--quorum_tick_ms", "100", "--join_timeout_ms", "10000")
"""The lighthouse of torchft's README."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lighthouse_bin() -> str:
    """``torchft_lighthouse`` beside this interpreter (the wheel's console script), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "torchft_lighthouse")
    return here if os.path.exists(here) else "torchft_lighthouse"


def launch(args: argparse.Namespace) -> int:
    """Start the lighthouse and one torchrun per replica group; wait for the groups."""
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    port = _free_port()
    lighthouse = subprocess.Popen([_lighthouse_bin(), *LIGHTHOUSE_ARGS, "--bind", f"[::]:{port}"])
    groups = []
    try:
        for g in range(GROUPS):
            env = dict(os.environ, REPLICA_GROUP_ID=str(g), NUM_REPLICA_GROUPS=str(GROUPS),
                       TORCHFT_LIGHTHOUSE=f"http://127.0.0.1:{port}")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "1",
                   "--max-restarts", str(args.max_restarts), "--master-addr", "127.0.0.1",
                   "--master-port", str(_free_port()), os.path.abspath(__file__), "--replica",
                   "--workdir", workdir, "--steps", str(args.steps), "--fault", args.fault]
            cmd += (["--no-kill"] if args.no_kill else []) + (
                ["--deadline", str(args.deadline)] if args.deadline is not None else [])
            groups.append(subprocess.Popen(cmd, env=env))
        codes = [p.wait() for p in groups]
    finally:
        for p in groups:
            if p.poll() is None:
                p.terminate()
        lighthouse.terminate()
        try:
            lighthouse.wait(timeout=10)
        except subprocess.TimeoutExpired:
            lighthouse.kill()
    print(f"mlp_torchft.py: replica groups exited {codes}")
    return max(codes, key=abs)


def replica(args: argparse.Namespace) -> int:
    """One replica group's rank (under torchrun): train, then group 0 writes the digest."""
    from datetime import timedelta

    import torch
    from torchft import Manager, ProcessGroupGloo
    from torchft.checkpointing.pg_transport import PGTransport

    from raypod.bench.anchors.mlp_common import (
        MLPJob,
        ReplicaLog,
        ReplicaRun,
        record_pid,
        state_digest,
        train_replica,
        write_digest,
    )

    group, n_groups = int(os.environ["REPLICA_GROUP_ID"]), int(os.environ["NUM_REPLICA_GROUPS"])
    workdir = os.path.abspath(args.workdir)
    record_pid(workdir, group)
    job = MLPJob(max_steps=args.steps, kill_after=0 if args.no_kill else MLPJob.kill_after, fault=args.fault)
    run = ReplicaRun(job, group, n_groups)
    pg = ProcessGroupGloo(timeout=timedelta(seconds=5))
    manager = Manager(pg=pg, min_replica_size=1, load_state_dict=run.load_state_dict,
                      state_dict=run.state_dict, replica_id=f"mlp_torchft_{group}",
                      timeout=timedelta(seconds=30),
                      checkpoint_transport=PGTransport(pg, timeout=timedelta(seconds=10),
                                                       device=torch.device("cpu")))
    try:
        log = ReplicaLog(workdir, group, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
        train_replica(run, manager, log, workdir, args.deadline)
        if group == 0:
            write_digest(workdir, state_digest(run.model, run.optimizer))
    finally:
        manager.shutdown(wait=False)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="step logs, kill marker, pids, final digest")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--deadline", type=float, default=None, help="stop at this unix time (goodput suite)")
    p.add_argument("--no-kill", action="store_true", help="no built-in fault after step 25")
    p.add_argument("--fault", choices=("kill", "freeze"), default="kill",  # mlp_common.FAULTS (no torch here)
                   help="what group 1 does after step 25: kill (os._exit) or freeze (SIGSTOP)")
    p.add_argument("--max-restarts", type=int, default=2, help="each replica group's torchrun --max-restarts")
    p.add_argument("--replica", action="store_true", help="internal: run as one replica group's rank")
    args = p.parse_args()
    if args.replica:
        return replica(args)
    t0 = time.time()
    rc = launch(args)
    print(f"mlp_torchft.py: done in {time.time() - t0:.1f}s (exit {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
