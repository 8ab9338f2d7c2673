"""Recovery anchor: ``jobs/configs/mlp.yaml``'s MLP under ``torchrun --max-restarts``.

    python -m torch.distributed.run --standalone --nproc-per-node 2 --max-restarts 2 \
        raypod/bench/anchors/mlp_torchrun.py --workdir DIR

Every 10 steps all ranks DCP-save to ``DIR/ckpt/step_N`` and rank 0 then commits it
by writing ``DIR/ckpt/latest``; a (re)started group resumes from the latest commit.
Rank 1 exits hard after step 25 the first time (``DIR/kill.marker``); torchrun's
agent then stops the group and starts a new one. ``--fault freeze`` stops rank 1 with
SIGSTOP instead (same marker): its process stays alive, so torchrun's agent, which
watches for exits, sees nothing, and rank 0 waits in its next gloo collective for the
process group's timeout, ``dist.init_process_group("gloo")``'s default (torch's
``default_pg_timeout``, 30 minutes). Rank 0 appends
``step,unix_time,attempt`` to ``DIR/steps.log`` after every completed step
(``attempt`` = ``TORCHELASTIC_RESTART_COUNT``).

For the goodput suite: ``--deadline UNIX_TIME`` stops every rank at the first
agreed step boundary after that time (exit 0, also in a group restarted after it),
``--no-kill`` turns the built-in kill off, ``--keep N`` deletes all but the N newest
checkpoints, and each rank writes its pid to ``DIR/pids/rank<r>``.
"""

from __future__ import annotations

import argparse
import os

import torch.distributed as dist

from raypod.bench.anchors.mlp_common import (
    FAULTS,
    MLPJob,
    MLPRun,
    StepLog,
    maybe_fault,
    past_deadline,
    prune_checkpoints,
    record_pid,
    state_digest,
    write_digest,
)


def _latest(ckpt: str) -> int:
    try:
        with open(os.path.join(ckpt, "latest")) as f:
            return int(f.read().strip())
    except FileNotFoundError:
        return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", required=True, help="step log, kill marker and checkpoints")
    p.add_argument("--steps", type=int, default=MLPJob.max_steps)
    p.add_argument("--deadline", type=float, default=None, help="stop at this unix time (goodput suite)")
    p.add_argument("--no-kill", action="store_true", help="no built-in fault after step 25")
    p.add_argument("--fault", choices=FAULTS, default="kill",
                   help="what rank 1 does after step 25: kill (os._exit) or freeze (SIGSTOP)")
    p.add_argument("--keep", type=int, default=0, help="checkpoints to keep (0: all)")
    args = p.parse_args()
    job = MLPJob(max_steps=args.steps, kill_after=0 if args.no_kill else MLPJob.kill_after,
                 fault=args.fault)
    workdir = os.path.abspath(args.workdir)
    ckpt = os.path.join(workdir, "ckpt")
    os.makedirs(ckpt, exist_ok=True)
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        record_pid(workdir, rank)
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        run = MLPRun(job)
        start = _latest(ckpt)
        if start:
            run.load(os.path.join(ckpt, f"step_{start}"))
        log = StepLog(os.path.join(workdir, "steps.log"), rank, attempt)
        last = start
        for step in range(start + 1, job.max_steps + 1):
            if past_deadline(args.deadline, step, start + 1):
                break
            run.step(step)
            last = step
            log.completed(step)
            if step % job.checkpoint_every == 0 or step == job.max_steps:
                run.save(os.path.join(ckpt, f"step_{step}"))
                if rank == 0:  # dcp.save returned on rank 0: every shard and .metadata are written
                    tmp = os.path.join(ckpt, "latest.tmp")
                    with open(tmp, "w") as f:
                        f.write(str(step))
                    os.replace(tmp, os.path.join(ckpt, "latest"))
                    prune_checkpoints(ckpt, args.keep)
            maybe_fault(step, rank, job, os.path.join(workdir, "kill.marker"))
        if last == job.max_steps:  # every rank agrees (past_deadline is collective)
            digest = state_digest(run.model, run.optimizer)  # hashed as raypod hashes its own
            if rank == 0:
                write_digest(workdir, digest)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
