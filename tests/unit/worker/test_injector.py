"""The fault injector: a configured fault fires once, on its rank and step, after its marker."""

from __future__ import annotations

import pytest
import torch

from raypod import faults
from raypod.config import FaultInjection
from raypod.worker.injector import FaultInjector, InjectedFault


def _armed(tmp_path, *plan: FaultInjection, rank: int = 1) -> FaultInjector:  # noqa: ANN001
    inj = FaultInjector(str(tmp_path))
    inj.arm(list(enumerate(plan)), rank=rank, attempt=2)
    return inj


def test_only_this_ranks_faults_fire_and_each_leaves_its_marker(tmp_path):
    inj = _armed(tmp_path, FaultInjection(step=3, rank=0, kind="exception"),
                 FaultInjection(step=3, rank=1, kind="slow", delay_s=0.25),
                 FaultInjection(step=4, rank=1, kind="exception"))
    assert [i for i, _ in inj.injections] == [1, 2]
    inj.fire(2)
    assert inj.slow_s == 0.0 and faults.fired(str(tmp_path)) == {}
    inj.fire(3)
    assert inj.slow_s == 0.25 and list(faults.fired(str(tmp_path))) == [1]
    assert faults.fired(str(tmp_path))[1]["attempt"] == 2
    with pytest.raises(InjectedFault, match="step 4 on rank 1"):
        inj.fire(4)
    assert list(faults.fired(str(tmp_path))) == [1, 2]


def test_a_nan_fault_poisons_one_step(tmp_path):
    inj = _armed(tmp_path, FaultInjection(step=1, rank=1, kind="nan"))
    model = torch.nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    loss = torch.tensor(3.0)
    assert inj.poison_step(loss, model) is loss  # not armed yet
    inj.fire(1)
    assert torch.isnan(inj.poison_step(loss, model)) and torch.isnan(model.weight.grad).all()
    assert inj.poison_step(loss, model) is loss  # once
