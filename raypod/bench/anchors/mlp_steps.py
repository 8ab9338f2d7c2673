"""Step-time anchor: ``jobs/configs/mlp.yaml``'s MLP under ``torchrun``, or in one plain process.

    python -m torch.distributed.run --standalone --nproc-per-node 2 \
        raypod/bench/anchors/mlp_steps.py --steps 120 --step-log FILE \
        [--snapshot] [--ckpt-every N --ckpt-dir DIR [--ckpt-async]]
    python raypod/bench/anchors/mlp_steps.py --single --steps 120 --step-log FILE

Under torchrun it is the exact work of a raypod rank (:class:`MLPRun`, shared with
the recovery anchors). Options add raypod's per-step costs one at a time, so the
overhead suite can split raypod's step time into its parts:

* ``--snapshot [full|take]``: after every step, raypod's own in-memory snapshot code
  (:func:`raypod.worker.snapshot.take`, then :class:`PeerReplicator` sending it to
  the other rank over its replica links, two-rank gloo groups), as a raypod rank does it; ``take``
  copies only, without replication.
* ``--ckpt-every N``: every ``N`` steps a DCP save of model and optimizer to
  ``--ckpt-dir/step_N`` (``dcp.save``, or ``dcp.async_save`` with ``--ckpt-async``,
  one in flight at a time as in raypod).

``--single`` runs the same model unsharded in one process without a process group:
global batch 32 as two micro-batches of 16, AdamW, the same data order, with
``--threads`` torch threads (default 2: the cores the two ranks get). Rank 0
(or the single process) writes ``step,unix_time`` lines for every completed step
(after ``optimizer.step()``) to ``--step-log`` at the end.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch


def _single(steps: int, threads: int) -> list[tuple[int, float]]:
    from raypod.bench.anchors.mlp_common import MLPJob
    from raypod.data.order import SampleOrder
    from raypod.recipes.mlp import MLP, GaussianSamples, mlp_loss

    torch.set_num_threads(threads)
    job = MLPJob(max_steps=steps)
    torch.manual_seed(job.seed)
    model = MLP(job.n_blocks, job.dim, job.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=job.lr)
    data = GaussianSamples(job.num_samples, job.dim, job.seed)
    order = SampleOrder(len(data), job.global_batch, job.seed)
    out = []
    for step in range(1, steps + 1):
        ids = order.ids(step)
        for i in range(0, len(ids), job.micro_batch):
            chunk = ids[i:i + job.micro_batch]
            loss = mlp_loss(model, data.get_batch(chunk.tolist()), torch.device("cpu"))
            (loss * (len(chunk) / job.global_batch)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append((step, time.time()))
    return out


def _distributed(args: argparse.Namespace) -> list[tuple[int, float]]:
    import torch.distributed as dist

    from raypod.bench.anchors.mlp_common import MLPJob, MLPRun
    from raypod.driver.topology import link_first
    from raypod.worker import snapshot
    from raypod.worker.group import ReplicaLinks

    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        ckpt_group = dist.new_group(backend="gloo")
        to, frm = (rank + 1) % world, (rank - 1) % world
        links = ReplicaLinks(dist.PrefixStore("replica", dist.distributed_c10d._get_default_store()), rank,
                             (to, frm), timedelta(minutes=10), link_first([(r + 1) % world for r in range(world)])[rank])
        run = MLPRun(MLPJob(max_steps=args.steps))
        store = snapshot.SnapshotStore(keep=3)
        replicator = snapshot.PeerReplicator(links, to, frm)
        pending = None
        out = []
        for step in range(1, args.steps + 1):
            run.step(step)
            if rank == 0:
                out.append((step, time.time()))
            if args.snapshot:
                snap = snapshot.take(run.model, run.optimizer)
                store.add_own(step, snap)
                if args.snapshot == "full":
                    replicator.submit(step, snap, store)
            if args.ckpt_every and step % args.ckpt_every == 0:
                path = os.path.join(args.ckpt_dir, f"step_{step}")
                if args.ckpt_async:
                    from raypod.checkpoint import dcp as ckpt

                    if pending is not None:
                        pending.result()
                    pending = ckpt.save(run.model, run.optimizer, path, async_save=True,
                                        process_group=ckpt_group)
                else:
                    run.save(path)
        if pending is not None:
            pending.result()
        replicator.close()
        dist.barrier()
        return out if rank == 0 else []
    finally:
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--step-log", required=True, help="file for rank 0's step,unix_time lines")
    p.add_argument("--single", action="store_true", help="one process, no torch.distributed")
    p.add_argument("--threads", type=int, default=2, help="torch threads with --single")
    p.add_argument("--snapshot", nargs="?", const="full", choices=["full", "take"], default=None,
                   help="raypod's in-memory snapshot every step (take: the copy only, no replication)")
    p.add_argument("--ckpt-every", type=int, default=0, help="DCP save every N steps (0: none)")
    p.add_argument("--ckpt-dir", default=None)
    p.add_argument("--ckpt-async", action="store_true", help="dcp.async_save instead of dcp.save")
    args = p.parse_args()
    if args.ckpt_every and not args.ckpt_dir:
        p.error("--ckpt-every needs --ckpt-dir")
    rows = _single(args.steps, args.threads) if args.single else _distributed(args)
    if rows:
        with open(args.step_log, "w") as f:
            f.writelines(f"{s},{t:.6f}\n" for s, t in rows)


if __name__ == "__main__":
    main()
