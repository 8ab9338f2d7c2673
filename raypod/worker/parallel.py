"""Apply the configured parallelism: FSDP2 per block, HSDP on a 2-D mesh, or DDP."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from raypod.config import ParallelConfig


def param_dtype(cfg: ParallelConfig, device: torch.device) -> torch.dtype:
    """bf16 on GPU for ``auto``/``bf16``; fp32 on CPU unless ``bf16`` is asked for."""
    if cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def build_mesh(cfg: ParallelConfig, world_size: int, device: torch.device) -> DeviceMesh:
    """1-D mesh for fsdp/ddp; ``(replicate, shard)`` for hsdp."""
    if cfg.strategy == "hsdp":
        replicas = cfg.replicas if world_size % cfg.replicas == 0 else 1
        return init_device_mesh(device.type, (replicas, world_size // replicas),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))


def parallelize(model: nn.Module, units: list[nn.Module], cfg: ParallelConfig, mesh: DeviceMesh,
                device: torch.device, shard_alone: bool = False) -> nn.Module:
    """Shard or replicate ``model`` (already on ``device``) over ``mesh``.

    A lone rank (a mesh of one) is left unwrapped for FSDP2 and HSDP, as torchtitan
    applies FSDP only when there is more than one shard: there is nothing to shard,
    and FSDP2's all-gathers, casts and hooks per block and micro-batch would only cost
    time. Mixed precision then comes from :func:`autocast`. ``shard_alone`` wraps it
    anyway (a spare's rehearsal warms the code a real group runs).
    """
    dtype = param_dtype(cfg, device)
    if cfg.compile:
        for unit in units:
            unit.compile()  # in place: the module stays what FSDP2 wraps and snapshots name
    if cfg.strategy in ("fsdp", "hsdp") and mesh.size() == 1 and not shard_alone:
        return model
    if cfg.strategy in ("fsdp", "hsdp"):
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, process_group=mesh.get_group())


def to_empty(model: nn.Module, device: torch.device) -> None:
    """Give a meta-device model uninitialised storage on ``device``, keeping tied weights tied.

    ``nn.Module.to_empty`` makes a new parameter per module, so a weight two modules
    share (a tied LM head) would become two; FSDP2 tracks its own parameters and is
    given storage by ``to_empty`` as usual.
    """
    if isinstance(model, (FSDPModule, DistributedDataParallel)):
        model.to_empty(device=device)
        return
    made: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for mod in model.modules():
            for table in (mod._parameters, mod._buffers):
                for name, t in list(table.items()):
                    if t is None:
                        continue
                    if id(t) not in made:
                        new = torch.empty_like(t, device=device)
                        made[id(t)] = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new
                    table[name] = made[id(t)]


def on_block(unit: nn.Module, forward: Callable[[], None], backward: Callable[[], None],
             first: bool = False) -> None:
    """Call ``forward()`` as ``unit`` is entered in the forward pass (``first``: before the
    hooks already there, FSDP2's all-gather among them) and ``backward()`` when the gradient
    reaches its output in the backward pass (the blocks after it are done)."""

    def on_output(module: nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad: backward())

    unit.register_forward_pre_hook(lambda module, args: forward(), prepend=first)
    unit.register_forward_hook(on_output)


def track_progress(units: list[nn.Module], advance: Callable[[], None]) -> None:
    """Call ``advance()`` as each sharded block is entered, in the forward pass (before FSDP2's
    all-gather) and in the backward pass. A rank's count then says how far into the step it
    got: its peers, blocked in the collective of a block it never reached, count more."""
    for unit in units:
        on_block(unit, advance, advance, first=True)


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip gradient communication on micro-batches before the last one."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        yield
    elif isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    else:
        yield


def autocast(cfg: ParallelConfig, model: nn.Module, device: torch.device) -> contextlib.AbstractContextManager:
    """DDP and a lone unwrapped rank get bf16 through autocast (FSDP2 casts through its policy)."""
    dtype = param_dtype(cfg, device)
    if not isinstance(model, FSDPModule) and dtype != torch.float32:
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()
