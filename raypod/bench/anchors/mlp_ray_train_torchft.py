"""Recovery anchor: ``jobs/configs/mlp.yaml``'s MLP under Ray Train V2 with ``TorchftConfig``.

    RAY_TRAIN_V2_ENABLED=1 python raypod/bench/anchors/mlp_ray_train_torchft.py \
        --workdir DIR --storage DIR [--name NAME] [--fault kill|freeze]

Starts a private local Ray (``ray.init(address="local")``) and fits a ``TorchTrainer``
on 2 CPU workers with ``torch_config=TorchftConfig(lighthouse_kwargs={"min_replicas":
1}, backend="gloo")`` and ``FailureConfig(max_failures=2)``, as Ray's
``torchft_linear_example.py`` does: Ray Train runs the torchft lighthouse in an actor,
makes each worker its own replica group (one rank each) and, when a worker dies,
replaces only that replica group while the other keeps running. Each worker builds the
whole model (:class:`.mlp_common.ReplicaRun`) and a ``torchft.Manager`` with the
example's values (``ProcessGroupGloo`` 30 s, ``PGTransport`` 30 s, ``Manager`` 60 s,
``min_replica_size=1``); worker ``g`` trains ids ``g::2`` of each step's batch
(:func:`.mlp_common.train_replica`), the gradient averaged with the Manager's allreduce
(torchft 0.2.0's DDP wrapper crashes the survivor when its peer dies mid-allreduce). Worker 1 faults after committing step 25 the first
time (``DIR/kill.marker``); the replacement heals from worker 0's live state. No
``ray.train.report`` checkpoint: the example's report needs every worker (its own
TODO), and torchft recovers from a live peer.

Every worker logs ``step,unix_time,attempt,samples,committed`` to ``DIR/steps.rg<g>.log``
(worker 0 also to ``DIR/steps.log``; ``attempt`` counts that worker's starts in
``DIR/attempts.rg<g>``) and worker 0 writes the final state's digest to
``DIR/final_state.sha256``. For the goodput suite: ``--deadline UNIX_TIME``,
``--no-kill``, ``--max-failures -1``, and each worker writes its pid (the Ray Train
worker actor's process) to ``DIR/pids/rank<g>``.
"""

from __future__ import annotations

import os
import sys

from raypod.bench.anchors.ray_fit import mlp_config, mlp_options, parser, v2_enabled


def train_loop_per_worker(config: dict) -> None:
    """One replica group (one Ray Train worker) under torchft, as Ray's torchft example sets it up."""
    from datetime import timedelta

    import ray.train
    import torch
    from torchft import Manager, ProcessGroupGloo
    from torchft.checkpointing.pg_transport import PGTransport

    from raypod.bench.anchors.mlp_common import (
        MLPJob,
        ReplicaLog,
        ReplicaRun,
        next_attempt,
        record_pid,
        state_digest,
        train_replica,
        write_digest,
    )

    ctx = ray.train.get_context()
    group, n_groups = ctx.get_world_rank(), ctx.get_world_size()
    workdir = config["workdir"]
    record_pid(workdir, group)
    attempt = next_attempt(os.path.join(workdir, f"attempts.rg{group}"))
    job = MLPJob(max_steps=config["steps"], kill_after=0 if config.get("no_kill") else MLPJob.kill_after,
                 fault=config.get("fault", "kill"))
    run = ReplicaRun(job, group, n_groups)
    pg = ProcessGroupGloo(timeout=timedelta(seconds=30))
    manager = Manager(pg=pg, min_replica_size=1, load_state_dict=run.load_state_dict,
                      state_dict=run.state_dict, world_size=1, rank=0,
                      replica_id=f"mlp_ray_train_torchft_{group}", timeout=timedelta(seconds=60),
                      checkpoint_transport=PGTransport(pg, timeout=timedelta(seconds=30),
                                                       device=torch.device("cpu")))
    train_replica(run, manager, ReplicaLog(workdir, group, attempt), workdir, config.get("deadline"))
    if group == 0:
        write_digest(workdir, state_digest(run.model, run.optimizer))
    # The example's own note: without it a replaced worker can hang on a finished peer.
    manager.shutdown()


def fit(config: dict, storage: str, name: str, max_failures: int) -> int:
    """Fit the ``TorchTrainer`` with ``TorchftConfig``; exit code 0 when it finished."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.torch.torchft_config import TorchftConfig

    ray.init(address="local")
    try:
        trainer = TorchTrainer(
            train_loop_per_worker, train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
            torch_config=TorchftConfig(lighthouse_kwargs={"min_replicas": 1}, backend="gloo"),
            run_config=RunConfig(storage_path=os.path.abspath(storage), name=name,
                                 failure_config=FailureConfig(max_failures=max_failures)))
        result = trainer.fit()
        if getattr(result, "error", None) is not None:
            print(f"mlp_ray_train_torchft.py: training failed: {result.error}", file=sys.stderr)
            return 1
        print("mlp_ray_train_torchft.py: done")
    finally:
        ray.shutdown()
    return 0


def main() -> int:
    p = parser(__doc__, "bench-recovery-ray-train-torchft", 60)
    mlp_options(p, "worker 1")
    args = p.parse_args()
    if not v2_enabled("mlp_ray_train_torchft.py"):
        return 2
    return fit(mlp_config(args), args.storage, args.name, args.max_failures)


if __name__ == "__main__":
    sys.exit(main())
