"""The driver's state machine, one iteration at a time, with a fake worker group."""

from __future__ import annotations

import json
from typing import Any

import pytest

from raypod import faults
from raypod.config import JobConfig
from raypod.data.order import SampleOrder
from raypod.driver.controller import Driver
from raypod.driver.state import StateKind
from raypod.driver.worker_group import GroupStartError, PollResult, WorkerError
from raypod.recipe import Recipe


class NullRecipe(Recipe):
    def tokens_per_sample(self) -> int:
        return 1


class FakeGroup:
    """Completes every submitted call at the next poll; fails as told by ``plan``."""

    plan: dict[str, Any] = {}
    starts: list[tuple[int, int | None]] = []

    def __init__(self, config: JobConfig, recipe: Recipe) -> None:
        self.cfg = config
        self.world_size = 0
        self.queue: list[tuple[str, int, str | None]] = []
        self.order = SampleOrder(1000, config.train.global_batch, config.train.seed)

    def start(self, world_size, attempt, restore, injections):
        FakeGroup.starts.append((world_size, restore.step if restore else None))
        if FakeGroup.plan.get("fail_start_attempt") == attempt:
            raise GroupStartError("rank 1 failed to start: boom", rank=1)
        self.world_size = world_size
        return {"num_samples": 1000, "setup_s": 0.0}

    def submit_step(self, step):
        self.queue.append(("step", step, None))

    def submit_save(self, step, path):
        self.queue.append(("save", step, path))

    def poll(self, timeout):
        out = PollResult()
        for what, step, _path in self.queue:
            fail = FakeGroup.plan.get("fail_at")
            if what == "step" and fail and fail[0] == step and fail[1] > 0:
                FakeGroup.plan["fail_at"] = (fail[0], fail[1] - 1)
                for i, f in faults.pending(self.cfg, faults.fired(self.cfg.job_dir)):
                    if f.step == step and f.rank == 1:  # what a real rank does as it fires
                        faults.record_fired(self.cfg.job_dir, i, f, attempt=0)
                out.errors.append(WorkerError(rank=1, step=step, kind="worker_died", message="died"))
                break
            if what == "step":
                for r in range(self.world_size):
                    ids = self.order.ids(step)[r :: self.world_size]
                    out.steps.append({"step": step, "rank": r, "loss_sum": 1.0 * len(ids),
                                      "samples": len(ids), "grad_norm": 1.0, "lr": 0.1,
                                      "compute_s": 0.001, "data_s": 0.0, "epoch": 0,
                                      "ids": ids, "saved": []})
            else:
                # Write what a DCP save would, so the store can commit it.
                out.saved.extend((r, [step]) for r in range(self.world_size))
        self.queue.clear()
        return out

    peer_to: list[int] = []

    def kill(self, ranks):
        pass

    def drain(self, timeout):
        self.queue.clear()
        return set()

    def memory_reports(self, ranks):
        # No in-memory copies: every recovery here takes the persistent-checkpoint path.
        return {r: {"own": [], "replicas": {}} for r in ranks}

    def finish_saves(self):
        return []

    def state_digest(self, export_path=None):
        return "f" * 64

    def close(self):
        self.world_size = 0

    def shutdown(self):
        self.world_size = 0


@pytest.fixture
def driver_factory(tmp_path):
    FakeGroup.plan = {}
    FakeGroup.starts = []

    def make(**overrides: Any) -> Driver:
        raw = {"name": "fake", "checkpoint": {"storage": str(tmp_path), "every_steps": 4},
               "train": {"max_steps": 10, "global_batch": 8, "micro_batch": 4},
               "scaling": {"min_workers": 1, "max_workers": 2, "schedule_timeout_s": 1.0},
               "mlflow": {"enabled": False}}
        for k, v in overrides.items():
            raw.setdefault(k, {}).update(v)
        d = Driver(JobConfig.model_validate(raw), recipe=NullRecipe())
        d.worker_group_cls = FakeGroup
        d.available_resources = lambda: {"CPU": 2.0}
        return d

    return make


def _drive(d: Driver, limit: int = 500) -> list[tuple[str, str]]:
    seen = []
    for _ in range(limit):
        prev, nxt = d.step()
        if nxt is not prev:
            seen.append((prev.name, nxt.name))
        if nxt.is_terminal:
            break
    return seen


def test_happy_path_states(driver_factory):
    d = driver_factory()
    assert d.state.kind is StateKind.SCHEDULING
    prev, nxt = d.step()
    assert (prev.kind, nxt.kind) == (StateKind.SCHEDULING, StateKind.RUNNING)
    assert d.group.world_size == 2
    transitions = _drive(d)
    assert transitions == [("running", "finishing"), ("finishing", "finished")]
    assert d.done_step == 10 and d.committed_step == 10


def test_failure_recovers_from_latest_checkpoint(driver_factory):
    d = driver_factory()
    FakeGroup.plan = {"fail_at": (6, 1)}
    transitions = _drive(d)
    assert ("running", "recovering") in transitions and ("recovering", "scheduling") in transitions
    assert transitions[-1] == ("finishing", "finished")
    assert FakeGroup.starts == [(2, None), (2, 4)]  # restarted from the step-4 checkpoint
    ev = d.acct.events[0]
    assert ev.kind == "worker_died" and ev.step == 6 and ev.lost_steps == 1
    assert ev.world_size_after == 2 and ev.resumed_s is not None


def test_injected_kill_is_named_and_fires_once(driver_factory):
    d = driver_factory(fault={"inject": [{"step": 6, "rank": 1, "kind": "kill"}]})
    FakeGroup.plan = {"fail_at": (6, 1)}
    _drive(d)
    assert d.acct.events[0].kind == "kill"
    assert d.fired == {0}
    assert len(d.acct.events) == 1  # did not fire again on the replay of step 6


def test_budget_exhausted_errors_and_writes_summary(driver_factory, tmp_path):
    d = driver_factory(fault={"max_failures": 1})
    FakeGroup.plan = {"fail_at": (6, 5)}
    summary = d.run()
    assert d.state.kind is StateKind.ERRORED
    assert "fault.max_failures=1 exhausted" in d.state.error
    on_disk = json.loads((tmp_path / "fake" / "summary.json").read_text())
    assert on_disk["status"] == "failed" and on_disk["failures"] == 2 == summary["failures"]
    assert on_disk["final_step"] == 5  # the last step trained; step 4 is the last committed
    assert on_disk["committed_step"] == 4


def test_setup_failure_goes_through_the_failure_policy(driver_factory):
    d = driver_factory()
    FakeGroup.plan = {"fail_start_attempt": 0}
    _drive(d)
    assert d.state.kind is StateKind.FINISHED
    assert d.acct.events[0].kind == "setup_failed"


def test_no_room_is_a_clear_error(driver_factory):
    d = driver_factory(scaling={"min_workers": 2, "schedule_timeout_s": 0.3})
    d.available_resources = lambda: {"CPU": 1.0}
    _drive(d)
    assert d.state.kind is StateKind.ERRORED
    assert "room for 1 ranks" in d.state.error and "min_workers is 2" in d.state.error


def test_summary_has_every_spec_field(driver_factory):
    d = driver_factory()
    FakeGroup.plan = {"fail_at": (6, 1)}
    s = d.run()
    for key in ("status", "final_step", "mlflow_run_id", "world_sizes", "failures", "events",
                "goodput", "wall_s", "productive_s", "samples", "final_state_sha256"):
        assert key in s
    assert s["status"] == "succeeded" and s["final_step"] == 10 and s["world_sizes"] == [2, 2]
    assert s["samples"] == {"consumed": 80, "duplicated": 0, "skipped": 0}
    ev = s["events"][0]
    for key in ("kind", "step", "detected_s", "resumed_s", "lost_steps", "world_size_after"):
        assert ev[key] is not None
    assert 0 < s["goodput"] <= 1
