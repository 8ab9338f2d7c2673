"""The token cache: entries verified before reuse, shared per user, safe to write twice at once."""

from __future__ import annotations

import json
import logging
import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypod.data import prepare, token_cache
from raypod.data.prepare import ByteTokenizer, check_parquet, find_tokens, prepare_tokens

TEXTS = ["def f():\n    return 1", "", "x = 'é'"]


@pytest.fixture
def source(tmp_path):
    p = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": TEXTS}), p)
    return check_parquet(str(p), ["text"])


def _entry(root, src) -> dict:
    """An entry as the tokenising path writes it (without Ray: the same bytes, digest, manifest)."""
    data = ByteTokenizer().encode_docs(TEXTS)
    name = token_cache.new_file_name("uint8")
    d = token_cache.entry_dir(str(root), src.fingerprint)
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/{name}", "wb") as f:
        out = token_cache.DigestWriter(f)
        out.write(data)
    return token_cache.commit(str(root), src.fingerprint, {
        "fingerprint": src.fingerprint, "file": name, "num_tokens": len(data), "dtype": "uint8",
        "bytes": out.size, "sha256": out.sha256})


@pytest.fixture
def no_tokenising(monkeypatch):
    """Fails the test if Ray Data tokenising runs; records where it was asked to write."""
    asked: list[str] = []

    def refuse(src, column, root, tokenizer):
        asked.append(root)
        raise AssertionError(f"tokenised into {root}")

    monkeypatch.setattr(prepare, "_tokenize_into", refuse)
    return asked


def test_user_cache_location_follows_env(monkeypatch, tmp_path):
    monkeypatch.delenv(token_cache.USER_CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert token_cache.user_token_cache() == str(tmp_path / "xdg" / "raypod" / "tokens")
    monkeypatch.setenv(token_cache.USER_CACHE_ENV, str(tmp_path / "mine"))
    assert token_cache.user_token_cache() == str(tmp_path / "mine")
    monkeypatch.setenv(token_cache.USER_CACHE_ENV, "")
    assert token_cache.user_token_cache() is None


def test_another_job_root_reuses_the_user_cache_without_tokenising(tmp_path, source, no_tokenising):
    user = tmp_path / "user"
    made = _entry(user, source)
    jobs = [tmp_path / "storage-a" / ".raypod_data", tmp_path / "storage-b" / ".raypod_data"]
    got = [prepare_tokens(source, "text", str(root), user_cache=str(user)) for root in jobs]
    for root, corpus in zip(jobs, got, strict=True):
        assert corpus.uri.startswith(str(root)) and corpus.num_tokens == made["num_tokens"]
        with open(corpus.uri, "rb") as f:
            assert f.read() == ByteTokenizer().encode_docs(TEXTS)
        assert find_tokens(str(root), source.fingerprint) == corpus  # verified where the ranks read it
    assert no_tokenising == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_token_file_is_tokenised_again_with_a_warning(tmp_path, source, no_tokenising, caplog,
                                                                damage):
    user = tmp_path / "user"
    path = _entry(user, source)["uri"]
    if damage == "truncate":
        os.truncate(path, 3)
    elif damage == "flip":
        with open(path, "r+b") as f:
            f.write(b"X")
    else:
        os.unlink(path)
    job = tmp_path / "job"
    with caplog.at_level(logging.WARNING, logger="raypod.data"), pytest.raises(AssertionError):
        prepare_tokens(source, "text", str(job), user_cache=str(user))
    assert no_tokenising == [str(user)]
    assert path in caplog.text and "tokenising again" in caplog.text
    assert not job.exists()


@pytest.mark.parametrize("field, value", [("file", "../../etc/passwd"), ("dtype", "object"),
                                          ("num_tokens", 10**9), ("sha256", None)])
def test_a_manifest_raypod_did_not_write_is_ignored(tmp_path, source, field, value):
    entry = _entry(tmp_path, source)
    d = token_cache.entry_dir(str(tmp_path), source.fingerprint)
    manifest = json.loads(open(f"{d}/manifest.json").read())
    assert find_tokens(str(tmp_path), source.fingerprint).uri == entry["uri"]
    manifest[field] = value
    with open(f"{d}/manifest.json", "w") as f:
        json.dump(manifest, f)
    assert find_tokens(str(tmp_path), source.fingerprint) is None


def test_two_writers_of_one_entry_at_once_both_leave_whole_entries(tmp_path, source):
    user = tmp_path / "user"
    _entry(user, source)
    job = str(tmp_path / "job")
    entry = token_cache.read_entry(str(user), source.fingerprint)
    barrier = threading.Barrier(4)
    out: list[dict] = []

    def publish() -> None:
        barrier.wait()
        out.append(token_cache.publish(entry, job, source.fingerprint))

    threads = [threading.Thread(target=publish) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({e["uri"] for e in out}) == 4  # each writer its own file
    for e in out:
        assert token_cache.read_entry(job, source.fingerprint) is not None
        with open(e["uri"], "rb") as f:
            assert f.read() == ByteTokenizer().encode_docs(TEXTS)
    d = token_cache.entry_dir(job, source.fingerprint)
    assert not [n for n in os.listdir(d) if n.endswith(".tmp")]


def test_failed_write_removes_only_its_own_files(tmp_path):
    import fsspec

    fs = fsspec.filesystem("file")
    root, entry = tmp_path / "root", tmp_path / "root" / "tokens-x"
    entry.mkdir(parents=True)
    (entry / "tokens-aaaaaaaaaaaa.uint8").write_bytes(b"another job's")
    token_cache.remove_empty_dirs(fs, [str(root), str(entry)])
    assert (entry / "tokens-aaaaaaaaaaaa.uint8").exists()
    (entry / "tokens-aaaaaaaaaaaa.uint8").unlink()
    token_cache.remove_empty_dirs(fs, [str(root), str(entry)])
    assert not root.exists()
