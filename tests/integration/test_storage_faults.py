"""Whole jobs against damaged and full checkpoint storage (real Ray, real DCP files, a real tmpfs)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
from pathlib import Path

import pytest
from support import tiny_job

from raypod.api import JobFailed, run
from raypod.checkpoint import CheckpointStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """One token cache for the module's jobs, off the storage under test."""
    return tmp_path_factory.mktemp("tokens")


def tiny(storage: Path, tokens: Path, *overrides: str):
    return tiny_job(storage, "checkpoint.memory_every_steps=0", f"recipe.args.cache_dir={tokens}",
                    *overrides, name="sf")


class _Marker:
    """A pickle that, when loaded, creates a file (what a planted ``.metadata`` could do)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_planted_metadata_is_never_unpickled_and_the_job_falls_back(ray_connected, tmp_path, tokens):
    """Step 10's ``.metadata`` is replaced by a pickle that runs code: the resumed job rejects
    the checkpoint (one ``checkpoint_corrupt`` event naming the file), resumes from step 5,
    and the pickle never runs on the driver or any rank."""
    run(tiny(tmp_path, tokens, "train.max_steps=10"), progress=False)
    store = CheckpointStore(str(tmp_path / "sf"), keep=3)
    assert [c.step for c in store.committed()] == [5, 10]
    marker = tmp_path / "pwned"
    (Path(store.path_for(10)) / ".metadata").write_bytes(pickle.dumps(_Marker(str(marker))))

    summary = run(tiny(tmp_path, tokens, "train.max_steps=12"), progress=False)
    assert not marker.exists()
    assert summary["status"] == "succeeded" and summary["resumed_from_step"] == 5
    [ev] = [e for e in summary["events"] if e["kind"] == "checkpoint_corrupt"]
    assert ev["file"] == ".metadata" and ev["step"] == 10 and ev["restored_from"] == "checkpoint step 5"
    assert "file .metadata is " in ev["message"] and "\n" not in ev["message"]
    assert summary["failures"] == 0  # a rejected checkpoint is not a failure of the job
    # Step 10 was trained and saved again: its new checkpoint verifies.
    latest, rejected = store.latest_verified()
    assert latest.step == 12 and rejected == []
    assert store.latest_verified()[0].manifest["files"][".metadata"]["size"] > 0


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs: smaller than one checkpoint of the tiny GPT (about 5 MB)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {out.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_storage_ends_the_job_in_one_sentence(ray_connected, small_tmpfs, tokens):
    """ENOSPC during the first save: the job ends at once (no recovery attempt), says so in
    one sentence naming checkpoint.storage, writes summary.json there, and leaves no
    uncommitted step folder or temporary file behind."""
    with pytest.raises(JobFailed) as info:  # the token cache is elsewhere: the first save fills the disk
        run(tiny(small_tmpfs, tokens, "train.max_steps=10"), progress=False)
    msg = str(info.value)
    assert f"checkpoint.storage '{small_tmpfs}' cannot be written" in msg
    assert "No space left on device" in msg and "\n" not in msg
    summary = json.loads((small_tmpfs / "sf" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] in msg
    assert summary["world_sizes"] == [2]  # no group was formed again
    assert [e["kind"] for e in summary["events"]] == ["storage"]
    assert summary["final_step"] <= 7  # it ended at the first save (step 5), not minutes later
    left = sorted(str(p.relative_to(small_tmpfs)) for p in small_tmpfs.rglob("*"))
    assert not [p for p in left if "step_" in p or p.endswith(".tmp") or "tmp-" in p or "probe" in p], left
