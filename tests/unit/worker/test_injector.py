"""The fault injector: a configured fault fires once, on its rank and step, after its marker."""

from __future__ import annotations

import pytest
import torch

from raypod import faults
from raypod.config import FaultInjection
from raypod.worker.injector import FaultInjector, InjectedFault


def _armed(tmp_path, *plan: FaultInjection, rank: int = 1) -> FaultInjector:  # noqa: ANN001
    inj = FaultInjector(str(tmp_path), plan)
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


@pytest.mark.parametrize("kind", ["freeze", "freeze_node"])
def test_a_freeze_stops_this_process_and_a_node_freeze_this_attempts_siblings_first(tmp_path, monkeypatch, kind):
    import os
    import signal

    from raypod.worker import injector

    # Rank 0 of this attempt shares the node; rank 2's entry is an earlier attempt's, and
    # rank 3's pid now belongs to another process (another start time): never touched.
    monkeypatch.setattr(injector, "_started", lambda pid: "other" if pid == 4444 else "t0")
    # This process is "rank 1 on node local", whether or not an earlier test connected Ray;
    # the pid folders go under this test's own folder.
    monkeypatch.setattr(injector, "_node_id", lambda: "local")
    monkeypatch.setattr(injector.tempfile, "gettempdir", lambda: str(tmp_path))
    inj = _armed(tmp_path, FaultInjection(step=5, rank=1, kind=kind))  # rank 1 of attempt 2
    folder = injector.pid_dir(str(tmp_path), "local")
    for rank, pid, attempt in [(0, 4242, 2), (2, 4343, 1), (3, 4444, 2)]:
        (tmp_path / "x.json").write_text(f'{{"rank": {rank}, "pid": {pid}, "attempt": {attempt}, "started": "t0"}}')
        os.replace(tmp_path / "x.json", os.path.join(folder, f"{rank}.json"))
    assert {r: e["pid"] for r, e in injector.node_pids(str(tmp_path), "local").items()} == \
        {0: 4242, 1: os.getpid(), 2: 4343, 3: 4444}
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(injector.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    inj.fire(5)
    assert list(faults.fired(str(tmp_path))) == [0]  # the marker first
    stopped = [(4242, signal.SIGSTOP)] if kind == "freeze_node" else []
    assert sent == [*stopped, (os.getpid(), signal.SIGSTOP)]
