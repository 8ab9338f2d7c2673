"""The job's owner lease (raypod/checkpoint/lease.py) on real files and on fsspec's memory://."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from raypod.checkpoint.lease import JobLease, JobOwned, _boot_id, _pid_ns, _start_time
from raypod.config import ConfigError
from raypod.storage import read_json


def _write_lease(job_dir: str, gen: int, **fields) -> None:
    path = os.path.join(job_dir, "lease", f"{gen:06d}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    now = time.time()
    rec = {"job": "j", "generation": gen, "nonce": uuid.uuid4().hex, "host": socket.gethostname(),
           "pid": os.getpid(), "pid_start": _start_time(os.getpid()), "boot_id": _boot_id(),
           "pid_ns": _pid_ns(), "since": now - 60, "renewed": now, "ttl_s": 30.0}
    rec.update(fields)
    with open(path, "w") as f:
        json.dump(rec, f)


def _files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_second_owner_is_refused_naming_the_owner_and_writing_nothing(tmp_path):
    job = str(tmp_path / "j")
    first = JobLease(job, "j", ttl_s=30).acquire()
    try:
        before = _files(tmp_path)
        with pytest.raises(JobOwned) as e:
            JobLease(job, "j", ttl_s=30).acquire()
        msg = str(e.value)
        assert isinstance(e.value, ConfigError)
        assert msg.startswith("job 'j' is already running: owned by driver pid "
                              f"{os.getpid()} on host {socket.gethostname()} since ")
        assert " UTC (lease renewed 0 s ago); stop it or wait for its lease to expire" in msg
        assert "\n" not in msg
        assert _files(tmp_path) == before
    finally:
        first.release()
    assert _files(tmp_path) == []  # released: the lease file is gone
    JobLease(job, "j", ttl_s=30).acquire().release()  # and the job can be owned again


def test_dead_pid_on_this_host_is_taken_over_at_once(tmp_path):
    job = str(tmp_path / "j")
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    _write_lease(job, 1, pid=p.pid, pid_start=time.time() - 5)  # renewed just now, 30 s TTL
    t0 = time.monotonic()
    lease = JobLease(job, "j", ttl_s=30).acquire()
    try:
        assert time.monotonic() - t0 < 2.0
        assert lease.generation == 2 and "no longer exists" in (lease.took_over or "")
        assert not os.path.exists(os.path.join(job, "lease", "000001.json"))
        assert read_json(os.path.join(job, "lease", "000002.json"))["pid"] == os.getpid()
    finally:
        lease.release()


def test_reused_pid_is_taken_over(tmp_path):
    """Same host, the pid is alive but started at another time: not the owner."""
    job = str(tmp_path / "j")
    _write_lease(job, 3, pid_start=(_start_time(os.getpid()) or 0) - 1000)
    lease = JobLease(job, "j").acquire()
    try:
        assert lease.generation == 4 and "another process" in (lease.took_over or "")
    finally:
        lease.release()


def test_other_host_expired_is_taken_over_live_is_refused(tmp_path):
    job = str(tmp_path / "j")
    _write_lease(job, 1, host="node-b", pid=4242, boot_id="x", renewed=time.time() - 100)
    lease = JobLease(job, "j", ttl_s=30).acquire()
    assert lease.generation == 2 and "expired" in (lease.took_over or "")
    lease.release()
    _write_lease(job, 1, host="node-b", pid=4242, boot_id="x")  # renewed just now
    with pytest.raises(JobOwned, match=r"owned by driver pid 4242 on host node-b since .* UTC"):
        JobLease(job, "j", ttl_s=30).acquire()


def test_owner_that_missed_renewals_is_waited_for_then_taken_over(tmp_path):
    job = str(tmp_path / "j")
    _write_lease(job, 1, host="node-b", pid=4242, boot_id="x", ttl_s=4.0, renewed=time.time() - 3.2)
    t0 = time.monotonic()
    lease = JobLease(job, "j", ttl_s=4).acquire()
    try:
        assert 0.5 < time.monotonic() - t0 < 5.0 and lease.generation == 2
    finally:
        lease.release()


def test_racing_drivers_one_wins(tmp_path):
    job = str(tmp_path / "j")
    won, refused = [], []

    def contend() -> None:
        try:
            won.append(JobLease(job, "j").acquire())
        except JobOwned:
            refused.append(1)

    threads = [threading.Thread(target=contend) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5
    won[0].release()


def test_lost_lease_is_noticed_by_renewal_and_never_released_over_the_new_owner(tmp_path):
    job = str(tmp_path / "j")
    lease = JobLease(job, "j", ttl_s=30).acquire()
    assert lease.renew() and lease.held()
    # Another driver took over (as after this one was frozen past the TTL).
    _write_lease(job, lease.generation + 1, host="node-b", pid=99, boot_id="x")
    assert not lease.renew()
    assert lease.lost is not None and not lease.held()
    assert lease.lost.startswith("job 'j' lost its lease in ")
    assert "another driver took it over: driver pid 99 on host node-b" in lease.lost
    lease.release()
    assert os.path.exists(os.path.join(job, "lease", "000002.json"))  # the new owner's stays


def test_renewal_thread_pushes_the_expiry(tmp_path):
    job = str(tmp_path / "j")
    lease = JobLease(job, "j", ttl_s=2).acquire()  # renews every 0.5 s
    try:
        first = read_json(os.path.join(job, "lease", "000001.json"))["renewed"]
        time.sleep(1.3)
        assert read_json(os.path.join(job, "lease", "000001.json"))["renewed"] > first
        assert lease.held()
    finally:
        lease.release()


def test_memory_object_store(tmp_path):
    """The object-store protocol (write, settle, read back the nonce) on fsspec's memory://."""
    import fsspec

    job = f"memory://raypod-test-{uuid.uuid4().hex[:8]}/j"
    fs = fsspec.filesystem("memory")
    first = JobLease(job, "j", ttl_s=30, settle_s=0.05).acquire()
    try:
        assert not first.local and first.generation == 1
        with pytest.raises(JobOwned, match=f"owned by driver pid {os.getpid()}"):
            JobLease(job, "j", ttl_s=30, settle_s=0.05).acquire()
        assert first.renew()
        # A stale owner from another host is taken over; the old owner then sees it lost.
        path = job.split("://", 1)[1] + "/lease/000001.json"
        rec = json.loads(fs.cat_file(path))
        fs.pipe_file(path, json.dumps(dict(rec, host="node-b", renewed=time.time() - 100,
                                           nonce=rec["nonce"])).encode())
        second = JobLease(job, "j", ttl_s=30, settle_s=0.05).acquire()
        assert second.generation == 2 and "expired" in (second.took_over or "")
        assert not first.renew() and first.lost is not None
        second.release()
        assert not fs.exists(path) and not fs.exists(path.replace("000001", "000002"))
    finally:
        first.release()


# ---- the driver with a lease and a stop (fake worker group) ---------------------------


def _fake_driver(tmp_path, lease=None, stop=None, max_steps=10):
    from fakes import FakeGroup, fake_driver

    FakeGroup.reset()
    return fake_driver(tmp_path, lease, stop, train={"max_steps": max_steps})


def test_driver_that_lost_its_lease_stops_and_writes_nothing_more(tmp_path):
    from raypod.driver.state import StateKind

    job = str(tmp_path / "fake")
    lease = JobLease(job, "fake", ttl_s=30).acquire()
    d = _fake_driver(tmp_path, lease=lease, max_steps=1000)
    for _ in range(3):
        d.step()  # scheduling, then steps
    _write_lease(job, lease.generation + 1, host="node-b", pid=99, boot_id="x")
    lease._confirmed -= 60  # as after a freeze: the next check goes to storage
    summary = d.run()
    assert d.state.kind is StateKind.ERRORED and d.done_step < 1000
    assert summary["status"] == "failed" and "another driver took it over" in summary["error"]
    assert not os.path.exists(os.path.join(job, "summary.json"))
    lease.release()
    assert os.path.exists(os.path.join(job, "lease", "000002.json"))


def test_driver_stop_request_ends_as_stopped(tmp_path):
    from raypod.driver.state import StateKind
    from raypod.driver.stop import StopSignals

    stop = StopSignals()
    d = _fake_driver(tmp_path, stop=stop, max_steps=1000)
    for _ in range(4):
        d.step()
    stop.signum = 15  # what the handler records (it does nothing else in RUNNING)
    summary = d.run()
    assert d.state.kind is StateKind.STOPPED
    on_disk = json.loads((tmp_path / "fake" / "summary.json").read_text())
    assert on_disk["status"] == summary["status"] == "stopped" and on_disk["failures"] == 0
    ev = on_disk["events"][-1]
    assert ev["kind"] == "stop" and ev["signal"] == "SIGTERM" and ev["step"] == on_disk["final_step"]


def test_stop_signals_record_in_the_loop_and_raise_elsewhere():
    import signal

    from raypod.driver.stop import StopRequested, StopSignals, exit_code

    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignals().install()
    try:
        stop.deferred = True
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested and stop.name == "SIGTERM"  # recorded, nothing raised
        stop.signum, stop.deferred = None, False
        with pytest.raises(StopRequested):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert stop.name == "SIGINT" and exit_code(signal.SIGINT) == 130 and exit_code(signal.SIGTERM) == 143
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_stop_bounds_the_jobs_ending_by_rays_grace(monkeypatch):
    import signal

    from raypod.driver import stop

    monkeypatch.setenv("RAY_JOB_STOP_WAIT_TIME_S", "5")
    signals = stop.StopSignals().install()
    try:
        assert stop.time_left() is None
        signals.deferred = True
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        left = stop.time_left()
        assert left is not None and 5 - stop.STOP_MARGIN_S - 0.5 < left <= 5 - stop.STOP_MARGIN_S
    finally:
        signals.restore()
    assert stop.time_left() is None  # the next job in this process starts with no stop
    monkeypatch.setenv("RAY_JOB_STOP_WAIT_TIME_S", "soon")
    assert stop.grace_s() == 3.0
