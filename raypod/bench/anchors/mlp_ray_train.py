"""Recovery anchor: ``jobs/configs/mlp.yaml``'s MLP under a Ray Train V2 ``TorchTrainer``.

    RAY_TRAIN_V2_ENABLED=1 python raypod/bench/anchors/mlp_ray_train.py \
        --workdir DIR --storage DIR [--name NAME]

Starts a private local Ray (``ray.init(address="local")``) and runs 2 CPU workers with
``FailureConfig(max_failures=2)``. Every 10 steps each worker DCP-saves its shards
to a temporary directory and reports it with
``ray.train.report(metrics, checkpoint=Checkpoint.from_directory(dir))`` (Ray Train
merges the workers' directories into one persistent checkpoint, as in its FSDP2
guide); a restarted worker group resumes from ``ray.train.get_checkpoint()``.
Rank 1 exits hard after step 25 the first time (``DIR/kill.marker``); with ``--fault
freeze`` it stops itself with SIGSTOP instead (same marker). A frozen worker is left to
Ray Train as shipped: its process group was set up by ``TorchConfig`` (``timeout_s=1800``,
30 minutes) and its controller declares a worker that does not answer its health poll
dead after ``RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S`` (600 s by default). Rank 0 appends
``step,unix_time,attempt`` to ``DIR/steps.log`` after every completed step
(``attempt`` counts the starts of rank 0 in ``DIR/attempts``).

For the goodput suite: ``--deadline UNIX_TIME`` stops every rank at the first
agreed step boundary after that time (also in a group restarted after it),
``--no-kill`` turns the built-in kill off, ``--max-failures -1`` restarts without
limit, ``--keep N`` sets ``CheckpointConfig(num_to_keep=N)``, and each rank writes
its pid (the Ray Train worker actor's process) to ``DIR/pids/rank<r>``.
"""

from __future__ import annotations

import os
import sys
import tempfile

from raypod.bench.anchors.ray_fit import fit, mlp_config, mlp_options, parser, v2_enabled


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch.distributed as dist

    from raypod.bench.anchors.mlp_common import (
        MLPJob,
        MLPRun,
        StepLog,
        maybe_fault,
        next_attempt,
        past_deadline,
        record_pid,
        state_digest,
        write_digest,
    )

    job = MLPJob(max_steps=config["steps"],
                 kill_after=0 if config.get("no_kill") else MLPJob.kill_after,
                 fault=config.get("fault", "kill"))
    workdir = config["workdir"]
    deadline = config.get("deadline")
    rank = ray.train.get_context().get_world_rank()
    record_pid(workdir, rank)
    attempt = next_attempt(os.path.join(workdir, "attempts")) if rank == 0 else -1
    run = MLPRun(job)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            run.load(ckpt_dir)
            with open(os.path.join(ckpt_dir, "step.txt")) as f:
                start = int(f.read())
    log = StepLog(os.path.join(workdir, "steps.log"), rank, attempt)
    last = start
    for step in range(start + 1, job.max_steps + 1):
        if past_deadline(deadline, step, start + 1):
            break
        loss = run.step(step)
        last = step
        log.completed(step)
        if step % job.checkpoint_every == 0 or step == job.max_steps:
            with tempfile.TemporaryDirectory() as tmp:
                run.save(tmp)
                if rank == 0:
                    with open(os.path.join(tmp, "step.txt"), "w") as f:
                        f.write(str(step))
                ray.train.report({"step": step, "loss": loss},
                                 checkpoint=ray.train.Checkpoint.from_directory(tmp))
        maybe_fault(step, rank, job, os.path.join(workdir, "kill.marker"))
    if last == job.max_steps:  # the final state, hashed as raypod hashes its own (collective)
        digest = state_digest(run.model, run.optimizer)
        if rank == 0:
            write_digest(workdir, digest)
    dist.barrier()


def main() -> int:
    p = parser(__doc__, "bench-recovery-ray-train", 60)
    mlp_options(p, "rank 1")
    p.add_argument("--keep", type=int, default=0, help="CheckpointConfig.num_to_keep (0: all)")
    args = p.parse_args()
    if not v2_enabled("mlp_ray_train.py"):
        return 2

    from ray.train import CheckpointConfig, FailureConfig

    config = mlp_config(args)
    return fit("mlp_ray_train.py", train_loop_per_worker, config, args.storage, args.name,
               failure_config=FailureConfig(max_failures=args.max_failures),
               checkpoint_config=CheckpointConfig(num_to_keep=args.keep or None))


if __name__ == "__main__":
    sys.exit(main())
