"""Checkpoint verification on real DCP files: digests at commit, fall back past a damaged
checkpoint, nothing read back runs code, signed manifests, full storage."""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from fakes import FakeGroup, NullRecipe, fake_driver
from torch.distributed.checkpoint.state_dict import get_state_dict

from raypod.checkpoint import CheckpointStore
from raypod.checkpoint import dcp as ckpt
from raypod.checkpoint.verify import signing_key, verify
from raypod.config import ConfigError, JobConfig
from raypod.driver.controller import Driver
from raypod.storage import StorageError, probe_storage, storage_error, write_json_atomic
from raypod.tracking.spool import Spool


def _model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3 * (seed + 1))
    m(torch.randn(4, 8)).sum().backward()
    opt.step()
    return m, opt


def _save(store: CheckpointStore, step: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A real DCP save (one process) of step ``step``, committed by the store."""
    m, opt = _model(step)
    msd, osd = get_state_dict(m, opt)
    dcp.save({"model": msd, "optim": osd}, storage_writer=dcp.FileSystemWriter(store.path_for(step)))
    store.commit(step, world_size=1)
    return m, opt


@pytest.fixture
def two_checkpoints(tmp_path):
    store = CheckpointStore(str(tmp_path / "fake"), keep=3)
    _save(store, 4)
    _save(store, 8)
    return store


def test_commit_records_every_file_and_a_good_checkpoint_verifies(two_checkpoints):
    store = two_checkpoints
    latest, rejected = store.latest_verified()
    assert latest.step == 8 and rejected == []
    files = latest.manifest["files"]
    assert set(files) == {".metadata", "__0_0.distcp"}
    shard = Path(store.path_for(8)) / "__0_0.distcp"
    assert files["__0_0.distcp"]["size"] == shard.stat().st_size and len(files[".metadata"]["sha256"]) == 64
    assert latest.metadata_sha256 == files[".metadata"]["sha256"]


def _truncate_shard(p: Path) -> None:
    shard = p / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])


def _flip_metadata(p: Path) -> None:
    meta = p / ".metadata"
    raw = bytearray(meta.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    meta.write_bytes(bytes(raw))


def _manifest_not_json(p: Path) -> None:
    (p / "manifest.json").write_text("{not json")


def _manifest_other_step(p: Path) -> None:
    m = json.loads((p / "manifest.json").read_text())
    (p / "manifest.json").write_text(json.dumps({**m, "step": 4}))


def _manifest_without_digests(p: Path) -> None:  # as an older raypod committed it
    m = json.loads((p / "manifest.json").read_text())
    del m["files"]
    (p / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(("damage", "file", "says"), [
    (_truncate_shard, "__0_0.distcp", "is 100 bytes, the manifest says"),
    (_flip_metadata, ".metadata", "does not match its sha256"),
    (_manifest_not_json, "manifest.json", "is not valid JSON"),
    (_manifest_other_step, "manifest.json", "is for step 4, not 8"),
    (_manifest_without_digests, "manifest.json", "records no file digests (committed by an older raypod)"),
])
def test_driver_falls_back_past_a_damaged_checkpoint(two_checkpoints, tmp_path, caplog, damage, file, says):
    damage(Path(two_checkpoints.path_for(8)))
    FakeGroup.reset()
    summary = fake_driver(tmp_path, train={"max_steps": 6}).run()
    assert FakeGroup.starts == [(2, 4)]  # the ranks were given step 4, never step 8
    assert summary["status"] == "succeeded" and summary["resumed_from_step"] == 4
    [ev] = summary["events"]
    assert ev["kind"] == "checkpoint_corrupt" and ev["file"] == file and ev["step"] == 8
    assert says in ev["message"] and "\n" not in ev["message"]
    assert ev["restored_from"] == "checkpoint step 4" and summary["failures"] == 0
    # raypod's own log (a Ray background thread of the test session may log its own traceback)
    assert not [r for r in caplog.records if r.name.startswith("raypod") and (r.exc_info or "Traceback" in r.getMessage())]


def test_no_checkpoint_passes_refuses_rather_than_starting_over(tmp_path):
    store = CheckpointStore(str(tmp_path / "fake"), keep=3)
    _save(store, 4)
    _truncate_shard(Path(store.path_for(4)))
    cfg = JobConfig.model_validate({
        "name": "fake", "checkpoint": {"storage": str(tmp_path)}, "mlflow": {"enabled": False},
        "scaling": {"min_workers": 1, "max_workers": 1, "schedule_timeout_s": 1.0}})
    d = Driver(cfg, recipe=NullRecipe())
    d.worker_group_cls = FakeGroup
    d.available_resources = lambda: {"CPU": 2.0}
    summary = d.run()
    assert summary["status"] == "failed"
    assert "no older committed checkpoint passes verification" in summary["error"]
    assert "__0_0.distcp is 100 bytes" in summary["error"]


class _Marker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_a_planted_metadata_pickle_never_runs(two_checkpoints, tmp_path):
    store = two_checkpoints
    marker = tmp_path / "pwned"
    step8 = Path(store.path_for(8))
    (step8 / ".metadata").write_bytes(pickle.dumps(_Marker(str(marker))))
    latest, [bad] = store.latest_verified()
    assert latest.step == 4 and bad.file == ".metadata"
    # Even asked to load it directly (no digest given), a rank refuses to unpickle it.
    m, opt = _model(0)
    with pytest.raises(Exception, match=r"names (os|posix)\.makedirs"):
        ckpt.load(m, opt, str(step8))
    assert not marker.exists()


def test_a_good_checkpoint_loads_through_the_safe_reader(two_checkpoints):
    """The allowlisted unpickler and the weights-only planner load everything DCP saved."""
    store = two_checkpoints
    ref_m, ref_opt = _model(8)
    m, opt = _model(0)
    latest, _ = store.latest_verified()
    ckpt.load(m, opt, latest.path, latest.metadata_sha256)
    for a, b in zip(ref_m.state_dict().values(), m.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], ref_opt.state_dict()["state"][0]["exp_avg"])
    with pytest.raises(Exception, match="does not match its sha256"):
        ckpt.load(m, opt, latest.path, "0" * 64)


def test_a_signed_manifest_edited_to_match_a_swapped_file_is_refused(tmp_path):
    key = b"k" * 32
    store = CheckpointStore(str(tmp_path / "job"), keep=3, signing_key=key)
    _save(store, 4)
    _save(store, 8)
    step8 = Path(store.path_for(8))
    assert "hmac_sha256" in json.loads((step8 / "manifest.json").read_text())
    assert store.latest_verified()[0].step == 8
    # Swap the shard for step 4's and edit the manifest's digest to match it.
    swapped = (Path(store.path_for(4)) / "__0_0.distcp").read_bytes()
    (step8 / "__0_0.distcp").write_bytes(swapped)
    m = json.loads((step8 / "manifest.json").read_text())
    import hashlib

    m["files"]["__0_0.distcp"] = {"size": len(swapped), "sha256": hashlib.sha256(swapped).hexdigest()}
    (step8 / "manifest.json").write_text(json.dumps(m))
    unsigned = CheckpointStore(str(tmp_path / "job"), keep=3)
    assert unsigned.latest_verified()[0].step == 8  # without the key the edit cannot be told
    latest, [bad] = store.latest_verified()
    assert latest.step == 4 and bad.file == "manifest.json"
    assert "signature of manifest.json does not match" in bad.reason
    m.pop("hmac_sha256")
    (step8 / "manifest.json").write_text(json.dumps(m))
    assert "is not signed" in verify(store._read_manifest(8, str(step8)), key)


def test_signing_key_env_must_be_set(monkeypatch):
    cfg = JobConfig.model_validate({"name": "x", "checkpoint": {"signing_key_env": "RAYPOD_TEST_KEY"}})
    monkeypatch.delenv("RAYPOD_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="checkpoint.signing_key_env names the environment variable "
                                          "RAYPOD_TEST_KEY, which is not set"):
        signing_key(cfg)
    monkeypatch.setenv("RAYPOD_TEST_KEY", "secret")
    assert signing_key(cfg) == b"secret"
    assert signing_key(JobConfig.model_validate({"name": "x"})) is None


def test_storage_error_names_the_storage_through_wrappers():
    class CheckpointException(Exception):  # DCP's shape: failures per rank
        def __init__(self, failures):
            super().__init__("CheckpointException ranks")
            self.failures = failures

    wrapped = CheckpointException({1: (OSError(errno.ENOSPC, "No space left on device"), None)})
    err = storage_error(wrapped, "/mnt/ckpt", "writing checkpoint step 5")
    assert isinstance(err, StorageError)
    assert str(err) == ("checkpoint.storage '/mnt/ckpt' cannot be written (No space left on device, "
                        "errno ENOSPC) while writing checkpoint step 5")
    assert storage_error(OSError(errno.ECONNRESET, "reset"), "/x", "y") is None
    assert pickle.loads(pickle.dumps(err)).args == err.args  # crosses Ray intact


@pytest.fixture
def full_tmpfs(tmp_path):
    """A tiny tmpfs filled to the last byte."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {out.stderr.strip()}")
    try:
        with open(mnt / "filler", "wb") as f:
            try:
                f.write(b"x" * (1 << 20))
            except OSError:
                pass
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_writes_to_a_full_disk_leave_nothing_behind(full_tmpfs):
    with pytest.raises(OSError) as e:
        write_json_atomic(str(full_tmpfs / "job" / "summary.json"), {"x": "y" * 10000})
    assert e.value.errno == errno.ENOSPC
    spool = Spool(full_tmpfs / "job" / "mlflow_spool")
    with pytest.raises(OSError):
        spool.write([{"m": [["loss", 1.0, 0, i] for i in range(2000)]}])
    store = CheckpointStore(str(full_tmpfs / "job"), keep=2)
    os.makedirs(store.path_for(5))
    with pytest.raises(OSError):
        store.commit(5, world_size=1)
    # A write that failed without an errno (torch's zip writer) is told apart by a probe.
    err = probe_storage(str(full_tmpfs / "job"), str(full_tmpfs), "writing checkpoint step 5")
    assert isinstance(err, StorageError) and err.errno == errno.ENOSPC
    left = sorted(p.name for p in full_tmpfs.rglob("*") if p.is_file())
    assert left == ["filler"], left


def test_a_full_storage_at_commit_ends_the_job_and_the_summary_goes_aside(full_tmpfs, tmp_path, monkeypatch):
    """The driver's own commit hits ENOSPC: one sentence naming checkpoint.storage, no
    recovery, and summary.json (which no longer fits there) is written locally instead."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    FakeGroup.reset()
    summary = fake_driver(full_tmpfs).run()
    assert summary["status"] == "failed" and FakeGroup.starts == [(2, None)]
    assert summary["error"] == (f"checkpoint.storage '{full_tmpfs}' cannot be written (No space left on "
                                "device, errno ENOSPC) while committing checkpoint step 4")
    assert [e["kind"] for e in summary["events"]] == ["storage"]
    [aside] = (tmp_path / "home" / ".raypod" / "summary").glob("fake-*.json")
    assert json.loads(aside.read_text())["error"] == summary["error"]
    assert not list(full_tmpfs.rglob("step_*"))


@pytest.mark.parametrize("async_save", [False, True])
def test_rank_digests_taken_as_written_match_and_spare_the_commit_a_read(tmp_path, monkeypatch, async_save):
    """The writer digests this rank's files and .metadata as it writes them; the commit then
    hashes nothing it was told about (a file it was not told about, or of another size, it
    still hashes), and the manifest equals a full re-hash of the folder."""
    from raypod.checkpoint import verify as verify_mod
    from raypod.checkpoint.verify import digest_files

    store = CheckpointStore(str(tmp_path / "job"), keep=3)
    m, opt = _model(3)
    digests: dict = {}
    fut = ckpt.save(m, opt, store.path_for(6), async_save=async_save, digests=digests)
    if fut is not None:
        fut.result()
    assert set(digests) == {".metadata", "__0_0.distcp"}
    assert {k: {f: v for f, v in d.items() if f != "mtime"} for k, d in digests.items()} == \
        digest_files(store.path_for(6))

    hashed: list[str] = []
    real = verify_mod.file_sha256
    monkeypatch.setattr(verify_mod, "file_sha256", lambda fs, p: hashed.append(p) or real(fs, p))
    store.commit(6, world_size=1, digests=digests)
    assert hashed == []
    latest, rejected = store.latest_verified()
    assert latest.step == 6 and rejected == [] and latest.manifest["files"] == digest_files(store.path_for(6))

    # The same step saved again (a step redone after a recovery): the first save's digests of
    # its files, same size but rewritten, are not trusted; the files are hashed at commit.
    stale = {k: dict(v) for k, v in digests.items()}
    m2, opt2 = _model(4)
    ckpt.save(m2, opt2, store.path_for(6), async_save=False)
    hashed.clear()
    store.commit(6, world_size=1, digests=stale)
    assert sorted(Path(p).name for p in hashed) == [".metadata", "__0_0.distcp"]
    assert store.latest_verified()[0].manifest["files"] == digest_files(store.path_for(6))

    # A file the ranks did not report, and a report whose size is stale: both hashed at commit.
    extra = Path(store.path_for(9))
    fut = ckpt.save(m, opt, str(extra), async_save=False, digests=(told := {}))
    (extra / "notes.txt").write_text("written by someone else")
    told["__0_0.distcp"] = {**told["__0_0.distcp"], "size": 1}
    hashed.clear()
    store.commit(9, world_size=1, digests=told)
    assert sorted(Path(p).name for p in hashed) == ["__0_0.distcp", "notes.txt"]
    assert store.latest_verified()[0].manifest["files"] == digest_files(str(extra))
