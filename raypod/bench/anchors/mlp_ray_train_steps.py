"""Step-time anchor: ``jobs/configs/mlp.yaml``'s MLP under a Ray Train V2 ``TorchTrainer``.

    RAY_TRAIN_V2_ENABLED=1 python raypod/bench/anchors/mlp_ray_train_steps.py \
        --steps 100 --step-log FILE --storage DIR [--ckpt-every N] [--name NAME]

A private local Ray (``ray.init(address="local")``), 2 CPU workers, the exact work of
a raypod rank (:class:`MLPRun`). With ``--report-every-step`` each worker calls
``ray.train.report({"step", "loss"})`` after every step (a synchronisation through
Ray Train's controller); with ``--ckpt-every N``, every ``N`` steps each worker
DCP-saves its shards of model and optimizer to a temporary
directory and reports it with ``ray.train.report(metrics,
checkpoint=Checkpoint.from_directory(dir))``, which Ray Train persists under
``--storage`` (its FSDP2 guide's pattern). Rank 0 records ``time.time()`` right after
each step's ``optimizer.step()`` and writes ``step,unix_time`` lines to
``--step-log`` at the end.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from raypod.bench.anchors.ray_fit import fit, parser, v2_enabled


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch.distributed as dist

    from raypod.bench.anchors.mlp_common import MLPJob, MLPRun

    job = MLPJob(max_steps=config["steps"])
    rank = ray.train.get_context().get_world_rank()
    run = MLPRun(job)
    every = config["ckpt_every"]
    rows = []
    for step in range(1, job.max_steps + 1):
        loss = run.step(step)
        rows.append((step, time.time()))
        metrics = {"step": step, "loss": loss}
        if every and step % every == 0:
            with tempfile.TemporaryDirectory() as tmp:
                run.save(tmp)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        elif config["report_every_step"]:
            ray.train.report(metrics)
    dist.barrier()
    if rank == 0:
        with open(config["step_log"], "w") as f:
            f.writelines(f"{s},{t:.6f}\n" for s, t in rows)


def main() -> int:
    p = parser(__doc__.split("\n\n")[0], "bench-steps-ray-train", 100)
    p.add_argument("--step-log", required=True, help="file for rank 0's step,unix_time lines")
    p.add_argument("--ckpt-every", type=int, default=0, help="report a DCP checkpoint every N steps")
    p.add_argument("--report-every-step", action="store_true", help="report metrics after every step")
    args = p.parse_args()
    if not v2_enabled("mlp_ray_train_steps.py"):
        return 2
    config = {"steps": args.steps, "ckpt_every": args.ckpt_every, "report_every_step": args.report_every_step,
              "step_log": os.path.abspath(args.step_log)}
    return fit("mlp_ray_train_steps.py", train_loop_per_worker, config, args.storage, args.name)


if __name__ == "__main__":
    sys.exit(main())
