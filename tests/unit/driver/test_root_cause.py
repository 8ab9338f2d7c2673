"""The rank that failed on its own is named, not the peer whose collective it broke: a failed
rank aborts its groups before it raises, so on a loaded host its peers' "connection closed"
errors can reach the driver first (the CI run of 2026-12-01 blamed rank 1's gloo error for
rank 0's injected exception)."""

from __future__ import annotations

import time
import types

import pytest
from ray.exceptions import RayTaskError

from raypod.driver.diagnosis import Diagnosis
from raypod.driver.inflight import STEP, InFlight
from raypod.driver.ledger import StepLedger
from raypod.driver.rank_calls import describe
from raypod.protocol import ErrorKind, WorkerError

GLOO_PEER = ("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
             "[127.0.0.1]:4242. This is likely due to the remote worker crashing. Check the logs "
             "of the remote worker before reporting an error.")


def _task_error(cause: BaseException) -> RayTaskError:
    return RayTaskError("train_step", "traceback", cause)


@pytest.mark.parametrize(("cause", "kind"), [
    (RuntimeError(GLOO_PEER), ErrorKind.PEER_LOST),
    (RuntimeError("NCCL communicator was aborted on rank 2."), ErrorKind.PEER_LOST),
    (RuntimeError("rank 1 stopped after a failed step; waiting for recovery"), ErrorKind.PEER_LOST),
    (RuntimeError("[gloo] Timed out waiting 1800000ms for recv operation to complete"), ErrorKind.EXCEPTION),
    (ValueError("shapes (3,4) and (5,6) not aligned"), ErrorKind.EXCEPTION),
])
def test_a_peers_breakage_is_told_from_a_failure_of_its_own(cause, kind):
    assert describe(_task_error(cause))[0] == kind


def test_the_peer_breakage_is_never_the_root_cause():
    cfg = types.SimpleNamespace(fault=types.SimpleNamespace(heartbeat_s=1.0, pg_timeout_s=30.0))
    diagnosis = Diagnosis(cfg, StepLedger(), lambda: 0.0)
    diagnosis.refresh_fired = dict
    errors = [WorkerError(1, 3, ErrorKind.PEER_LOST, "RuntimeError: Connection closed by peer"),
              WorkerError(0, 3, ErrorKind.EXCEPTION, "ValueError: bad batch")]
    f = diagnosis.failure_from(types.SimpleNamespace(node_of=str), errors)
    assert f.rank == 0 and "ValueError" in f.message and f.kind == "exception"


def _ranks_class():
    import ray

    @ray.remote(num_cpus=0, concurrency_groups={"health": 1})
    class Rank:
        def step(self, delay_s: float, message: str, peer: bool) -> None:
            time.sleep(delay_s)
            raise RuntimeError(message) if peer else ValueError(message)

        @ray.method(concurrency_group="health")
        def ping(self) -> bool:
            return True

    return Rank


def test_the_driver_waits_a_moment_for_the_cause_when_only_peers_errors_arrived(ray_connected):
    """Rank 1's broken collective arrives first; rank 0's own error 0.3 s later (both alive):
    the poll returns both, and the failure names rank 0."""
    import ray

    Rank = _ranks_class()
    ranks = [Rank.remote(), Rank.remote()]
    try:
        ray.get([r.ping.remote() for r in ranks])
        calls = InFlight()
        calls.add(ranks[0].step.remote(0.3, "bad batch", False), 0, STEP, 3)
        calls.add(ranks[1].step.remote(0.0, GLOO_PEER, True), 1, STEP, 3)
        out = calls.poll(ranks, timeout=5.0)
        assert {(e.rank, e.kind) for e in out.errors} == {(0, ErrorKind.EXCEPTION), (1, ErrorKind.PEER_LOST)}
        cfg = types.SimpleNamespace(fault=types.SimpleNamespace(heartbeat_s=1.0, pg_timeout_s=30.0))
        diagnosis = Diagnosis(cfg, StepLedger(), lambda: 0.0)
        diagnosis.refresh_fired = dict
        f = diagnosis.failure_from(types.SimpleNamespace(node_of=str), out.errors)
        assert f.rank == 0 and "bad batch" in f.message
    finally:
        for r in ranks:
            ray.kill(r)


class _Refs:
    """``ray.wait``/``ray.get`` over fake refs: ``done`` maps a ref to its value, or to the
    exception getting it raises; refs not in it never finish. Counts the waits."""

    def __init__(self, done: dict) -> None:
        self.done, self.waits = done, 0

    def wait(self, refs, num_returns=1, timeout=None):  # noqa: ANN001, ANN202
        self.waits += 1
        ready = [r for r in refs if r in self.done][:num_returns]
        return ready, [r for r in refs if r not in ready]

    def get(self, ref):  # noqa: ANN001, ANN202
        value = self.done[ref]
        if isinstance(value, BaseException):
            raise value
        return value


def test_get_all_takes_every_finished_call_per_wait_and_names_the_cause_not_a_broken_peer(monkeypatch):
    from ray.exceptions import RayActorError

    from raypod.driver import rank_calls
    from raypod.driver.outcomes import GroupStartError

    refs = [f"ref{i}" for i in range(1000)]
    fake = _Refs({r: i for i, r in enumerate(refs)})
    monkeypatch.setattr(rank_calls, "ray", fake)
    assert rank_calls.get_all(refs, timeout=5.0) == list(range(1000))
    assert fake.waits == 2  # not one wait over all that are left per call: O(N^2) at 10,000 ranks

    # Rank 0's rendezvous broke because rank 1's process died: rank 1 is named, whatever the order.
    fake = _Refs({"a": _task_error(RuntimeError(GLOO_PEER)), "b": RayActorError(), "c": 3})
    monkeypatch.setattr(rank_calls, "ray", fake)
    with pytest.raises(GroupStartError) as err:
        rank_calls.get_all(["a", "b", "c", "d"], timeout=5.0)
    assert err.value.rank == 1 and err.value.kind == ErrorKind.WORKER_DIED
