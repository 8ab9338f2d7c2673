"""Where a raypod rank's step time goes on one GPU, without Ray: plain vs FSDP2 (world 1) variants.

    python -m raypod.bench.gpu_probe [--steps 12]

The 350m GPT (24 layers, 1024 wide, sequence 1024) in one process: a plain bf16
autocast loop, then FSDP2 at world size 1 with and without resharding after forward,
``torch.compile`` and raypod's in-memory snapshot, at micro-batches 8 and 16. One line
per variant: the mean step of steps 5 onward and the snapshot's host time. BENCHMARKS.md
("GPU") quotes what it found; it needs a CUDA device.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from raypod.models.gpt import GPT, GPTConfig
from raypod.worker import snapshot


def build(fsdp: bool, compile_: bool, raf: bool = True) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = GPT(GPTConfig(n_layer=24, n_head=16, n_embd=1024, seq_len=1024)).cuda()
    if compile_:
        for b in m.blocks:
            b.compile()
    if fsdp:
        mesh = init_device_mesh("cuda", (1,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for b in m.blocks:
            fully_shard(b, mesh=mesh, mp_policy=mp, reshard_after_forward=raf)
        fully_shard(m, mesh=mesh, mp_policy=mp, reshard_after_forward=raf)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-4, betas=(0.9, 0.95), fused=True)
    return m, opt


def run(name: str, fsdp: bool, compile_: bool, micro: int, steps: int, snap: bool = False, raf: bool = True,
        gbatch: int = 64) -> None:
    """Time ``steps`` steps of one variant and print its line."""
    m, opt = build(fsdp, compile_, raf)
    data = torch.randint(0, 256, (gbatch, 1025), device="cuda")
    times, host = [], []
    last = None
    for _ in range(steps):
        t0 = time.perf_counter()
        n = gbatch // micro
        for i in range(n):
            part = data[i * micro:(i + 1) * micro]
            if fsdp:
                m.set_requires_gradient_sync(i == n - 1)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not fsdp):
                logits = m(part[:, :-1])
                loss = F.cross_entropy(logits.float().reshape(-1, 256), part[:, 1:].reshape(-1))
            (loss / n).backward()
        norm = torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        snapshot.before_update(last)
        opt.step()
        opt.zero_grad(set_to_none=True)
        th = time.perf_counter()
        if snap:
            last = snapshot.take(m, opt)
        th = time.perf_counter() - th
        float(loss.item())
        float(norm.item())
        times.append(time.perf_counter() - t0)
        host.append(th)
    w = times[4:]
    print(f"{name:45s} micro {micro:3d}: step {1e3 * sum(w) / len(w):7.1f} ms  "
          f"(snapshot host {1e3 * sum(host[4:]) / len(w):.1f} ms)", flush=True)
    del m, opt
    torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=12)
    a = p.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("cpu:gloo,cuda:nccl", rank=0, world_size=1, timeout=timedelta(seconds=120))
    torch.cuda.set_device(0)
    st = a.steps
    run("plain autocast", False, False, 8, st)
    run("fsdp2 ws1", True, False, 8, st)
    run("fsdp2 ws1 no reshard after fwd", True, False, 8, st, raf=False)
    run("fsdp2 ws1 + snapshot", True, False, 8, st, snap=True)
    run("plain autocast", False, False, 16, st)
    run("fsdp2 ws1", True, False, 16, st)
    run("plain autocast compiled", False, True, 16, st)
    run("fsdp2 ws1 compiled", True, True, 16, st)
    run("fsdp2 ws1 compiled no reshard", True, True, 16, st, raf=False)
    run("fsdp2 ws1 compiled + snapshot", True, True, 16, st, snap=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
