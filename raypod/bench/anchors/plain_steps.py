"""A plain PyTorch loop over a job config's recipe: the floor raypod's step time is held to.

    python raypod/bench/anchors/plain_steps.py jobs/configs/350m.yaml --log FILE \
        [--set key.path=value ...]

One process, one device (the first GPU when ``scaling.use_gpu`` and one is there), no
process group, no Ray, no snapshots, no checkpoints: the recipe's own model,
optimizer, loss and samples (in raypod's sample order), the same global batch split
into the same micro-batches, the same learning-rate schedule and gradient clipping.
Mixed precision follows ``parallel.mixed_precision`` through ``torch.autocast``
(bf16 compute, fp32 weights, as FSDP2's policy gives raypod) and
``parallel.compile`` compiles the same blocks. A recipe whose data needs preparing
must find it prepared (the GPU suite runs raypod first with a shared cache).

Writes ``step,unix_time`` lines to ``--log``, each right after the step's loss
reached the host (the same point at which a raypod rank returns its step).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch


def main() -> int:
    from raypod.config import load_config
    from raypod.data.order import SampleOrder
    from raypod.recipe import RankContext, build_recipe
    from raypod.worker.parallel import param_dtype
    from raypod.worker.steps import batch_rows, lr_at, micro_batches

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--log", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    cfg = load_config(args.config, [*args.overrides, "mlflow.enabled=false"])
    use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    recipe = build_recipe(cfg)
    if hasattr(recipe, "check_data"):
        recipe.check_data(cfg)
    ctx = RankContext(rank=0, world_size=1, device=device, config=cfg)
    data = recipe.build_data(ctx)
    t = cfg.train
    order = SampleOrder(len(data), t.global_batch, t.seed)
    torch.manual_seed(t.seed)
    model = recipe.build_model(ctx).to(device)
    if cfg.parallel.compile:
        for unit in recipe.shard_units(model):
            unit.compile()
    optimizer = recipe.build_optimizer(model, ctx)
    dtype = param_dtype(cfg.parallel, device)
    times: dict[int, float] = {}
    for step in range(1, t.max_steps + 1):
        ids = order.ids(step)
        batch = data.get_batch(ids.tolist())
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, t)
        micros = micro_batches(np.arange(len(ids)), len(ids), t.micro_batch)
        loss_sum = torch.zeros((), device=device)
        for chunk in micros:
            part = batch_rows(batch, int(chunk[0]), int(chunk[-1]) + 1)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = recipe.loss(model, part, device)
            (loss * (len(chunk) / len(ids))).backward()
            loss_sum += loss.detach() * len(chunk)
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss_sum.item())  # the step is done when its loss is on the host
        times[step] = time.time()
    with open(args.log, "w") as f:
        f.writelines(f"{s},{x:.6f}\n" for s, x in sorted(times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
