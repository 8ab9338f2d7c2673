"""Restoring a snapshot into a fresh optimizer: Adam's state is built directly, not by a fake step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import _init_optim_state

from raypod.worker import snapshot


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 4), nn.GELU(), nn.Linear(4, 3))
    m[0].bias.requires_grad_(False)  # a frozen parameter gets no state
    return m


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(8, 5, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "adamw_amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True, weight_decay=0.1),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.01),
    "adamw_groups": lambda ps: torch.optim.AdamW([{"params": ps[:2], "weight_decay": 0.0},
                                                  {"params": ps[2:]}], lr=1e-2, betas=(0.9, 0.95),
                                                 foreach=False),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),  # the generic fallback
}


def _layout(opt: torch.optim.Optimizer) -> list[tuple[str, str, tuple[int, ...], torch.dtype, str]]:
    params = [p for g in opt.param_groups for p in g["params"]]
    return [(f"{i}", k, tuple(v.shape), v.dtype, v.device.type)
            for i, p in enumerate(params) for k, v in sorted(opt.state.get(p, {}).items())]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_init_state_matches_the_first_step(name):
    make = OPTIMIZERS[name]
    a, b = _model(), _model()
    opt_a, opt_b = make(list(a.parameters())), make(list(b.parameters()))
    _init_optim_state(opt_a)
    snapshot.init_state(opt_b)
    assert _layout(opt_b) == _layout(opt_a)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_restored_optimizer_trains_like_the_original(name):
    make = OPTIMIZERS[name]
    src = _model()
    opt = make(list(src.parameters()))
    _train(src, opt, 3)
    snap = snapshot.take(src, opt)
    fresh = _model(seed=7)
    fresh_opt = make(list(fresh.parameters()))
    snapshot.restore(fresh, fresh_opt, [t.clone() for t in snap])
    ref = copy.deepcopy(src)
    ref_opt = make(list(ref.parameters()))
    ref_opt.load_state_dict(opt.state_dict())
    _train(ref, ref_opt, 2, seed=2)
    _train(fresh, fresh_opt, 2, seed=2)
    for x, y in zip(ref.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(x, y)
    assert _layout(fresh_opt) == _layout(ref_opt)


def test_restore_keeps_existing_state():
    m = _model()
    opt = OPTIMIZERS["adamw"](list(m.parameters()))
    _train(m, opt, 1)
    before = {id(v) for st in opt.state.values() for v in st.values()}
    snapshot.restore(m, opt, snapshot.take(m, opt))
    assert {id(v) for st in opt.state.values() for v in st.values()} == before
