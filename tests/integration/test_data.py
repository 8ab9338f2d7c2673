"""Data on a real local Ray: parquet shards streamed through Ray Data, exact resume, bad data.

The corpus here is small (about 15 steps an epoch), so the runs cross an epoch
boundary and the ledger counts samples per (epoch, id).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import REPO, TINY, tiny_job

from raypod.api import run
from raypod.data.corpus import build_stdlib_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three parquet shards in a folder, and a token cache shared by the module's jobs."""
    root = tmp_path_factory.mktemp("data")
    build_stdlib_corpus(str(root / "all.parquet"), max_bytes=60_000)
    full = pq.read_table(root / "all.parquet")
    table = pa.table({"path": full.column("path"),
                      "text": [t[:2500] for t in full.column("text").to_pylist()]})  # ~8 steps an epoch
    shards = root / "shards"
    shards.mkdir()
    step = -(-table.num_rows // 3)
    for i in range(3):
        pq.write_table(table.slice(i * step, step), shards / f"part-{i}.parquet")
    return shards, root / "cache"


def cfg(data, storage: Path, *overrides: str):
    shards, cache = data
    return tiny_job(storage, f"data.path={shards}", f"recipe.args.cache_dir={cache}", *overrides, name="d")


@pytest.fixture(scope="module")
def fault_free(ray_connected, data, tmp_path_factory):
    return run(cfg(data, tmp_path_factory.mktemp("ff"), "scaling.spares=0"), callbacks=[])


def test_fault_free_run_crosses_an_epoch(fault_free, data):
    from raypod.data.prepare import check_parquet, find_tokens

    shards, cache = data
    tokens = find_tokens(str(cache), check_parquet(str(shards), ["text"]).fingerprint)
    steps_per_epoch = tokens.num_samples(128) // 16
    assert 5 <= steps_per_epoch < 20  # so 20 steps are more than one epoch
    assert fault_free["status"] == "succeeded" and fault_free["final_step"] == 20
    assert fault_free["samples"] == {"consumed": 320, "duplicated": 0, "skipped": 0}


def test_kill_mid_epoch_resumes_exactly(ray_connected, data, fault_free, tmp_path):
    """A rank killed mid-epoch: the spare takes over from peers' memory, data from the stream."""
    summary = run(cfg(data, tmp_path, "fault.inject=[{step: 9, rank: 1, kind: kill}]"), callbacks=[])
    assert summary["failures"] == 1 and summary["world_sizes"] == [2, 2]
    assert summary["events"][0]["restored_from"].startswith("memory")
    assert summary["samples"] == {"consumed": 320, "duplicated": 0, "skipped": 0}
    assert summary["final_state_sha256"] == fault_free["final_state_sha256"]


def test_restart_from_checkpoint_in_the_second_epoch_resumes_exactly(ray_connected, data, fault_free,
                                                                     tmp_path):
    """Every rank restarts from the persistent checkpoint: new streams start mid-epoch."""
    summary = run(cfg(data, tmp_path, "checkpoint.memory_every_steps=0", "scaling.spares=0",
                      "fault.inject=[{step: 18, rank: 0, kind: kill}]"), callbacks=[])
    ev = summary["events"][0]
    assert ev["restored_from"] in ("checkpoint step 15", "checkpoint step 10")
    assert summary["samples"] == {"consumed": 320, "duplicated": 0, "skipped": 0}
    assert summary["final_state_sha256"] == fault_free["final_state_sha256"]


def test_resize_3_to_2_ranks_neither_skips_nor_repeats(ray_connected, data, tmp_path):
    first = run(cfg(data, tmp_path, "train.max_steps=10", "scaling.min_workers=3", "scaling.max_workers=3",
                    "scaling.spares=0"), callbacks=[])
    assert first["world_sizes"] == [3] and first["final_step"] == 10
    assert first["samples"] == {"consumed": 160, "duplicated": 0, "skipped": 0}
    second = run(cfg(data, tmp_path, "scaling.min_workers=2", "scaling.max_workers=2", "scaling.spares=0"),
                 callbacks=[])
    assert second["resumed_from_step"] == 10 and second["world_sizes"] == [2]
    assert second["samples"] == {"consumed": 160, "duplicated": 0, "skipped": 0}


def _bad(tmp_path: Path, name: str) -> str:
    """A data.path of kind ``name``."""
    d = tmp_path / name
    d.mkdir()
    if name == "missing":
        return str(d / "nothing-here.parquet")
    if name == "not-parquet":
        (d / "corpus.parquet").write_text("text\nhello world\n")
        return str(d / "corpus.parquet")
    if name == "stray-file":
        pq.write_table(pa.table({"text": ["hello"]}), d / "part-0.parquet")
        (d / "README.txt").write_text("notes")
        return str(d)
    if name == "no-column":
        pq.write_table(pa.table({"body": ["hello"]}), d / "part-0.parquet")
        return str(d / "part-0.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), d / "part-0.parquet")
    return str(d / "part-0.parquet")


def test_bad_data_is_refused_in_one_sentence_before_anything_starts(tmp_path):
    expected = {
        "missing": "data.path '{p}' does not exist",
        "not-parquet": "data.path '{p}' is not a parquet file",
        "stray-file": "data.path '{p}': 'README.txt' is not a parquet file",
        "no-column": "data.path '{p}': 'part-0.parquet' has no 'text' column (its columns: body)",
        "empty": "data.path '{p}' is empty (0 rows)",
    }
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a leak would start a Ray
    procs = {}
    for name in expected:
        path, storage = _bad(tmp_path, name), tmp_path / f"store-{name}"
        cmd = [str(Path(sys.executable).parent / "raypod"), "run", str(TINY), "--quiet",
               f"--set=data.path={path}", f"--set=checkpoint.storage={storage}", "--set=mlflow.enabled=false",
               "--set=recipe.args.demo_corpus=null"]
        procs[name] = (path, storage, subprocess.Popen(cmd, env=env, cwd=REPO, text=True,
                                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for name, (path, storage, proc) in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode != 0, (name, out, err)
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert lines[-1] == "raypod: error: " + expected[name].format(p=path), (name, err)
        assert not storage.exists(), name  # nothing written
