"""Tokenising with Ray Data, and each rank's stream of step batches, on a real local Ray."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raypod.config import ConfigError
from raypod.data import token_cache
from raypod.data.order import SampleOrder
from raypod.data.prepare import DOC_SEPARATOR, check_parquet, prepare_tokens
from raypod.data.stream import StepFeed, TokenWindows
from raypod.recipes.mlp import GaussianSamples

L = 64


@pytest.fixture(scope="module")
def corpus(ray_connected, tmp_path_factory):
    """Two parquet shards of made-up documents, tokenised once."""
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    texts = [" ".join(f"w{rng.integers(1000)}é" for _ in range(rng.integers(0, 60))) for _ in range(400)]
    pq.write_table(pa.table({"text": texts[:250]}), d / "part-0.parquet", row_group_size=64)
    pq.write_table(pa.table({"text": texts[250:], "n": list(range(150))}), d / "part-1.parquet")
    cache = tmp_path_factory.mktemp("cache")
    user = tmp_path_factory.mktemp("user_tokens")
    tokens = prepare_tokens(check_parquet(str(d), ["text"]), "text", str(cache), user_cache=str(user))
    return d, cache, texts, tokens, user


def test_tokens_are_the_documents_in_order(corpus):
    d, cache, texts, tokens, _ = corpus
    expected = b"".join(t.encode("utf-8") + DOC_SEPARATOR for t in texts if t)
    with open(tokens.uri, "rb") as f:
        assert f.read() == expected
    assert tokens.num_tokens == len(expected)


def test_cache_is_reused(corpus):
    d, cache, _, tokens, _ = corpus
    files = sorted(p.name for p in cache.rglob("*"))
    again = prepare_tokens(check_parquet(str(d), ["text"]), "text", str(cache))
    assert again == tokens and sorted(p.name for p in cache.rglob("*")) == files


def test_another_storage_reuses_the_users_tokens_without_ray_data(corpus, tmp_path, monkeypatch):
    """Tokenised once into the per-user cache (digest in the manifest), then only published."""
    import ray.data

    d, _, _, tokens, user = corpus
    entry = token_cache.read_entry(str(user), tokens.fingerprint)
    assert entry is not None and entry["bytes"] == tokens.num_tokens

    def no_ray_data(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(ray.data, "read_parquet", no_ray_data)
    other = prepare_tokens(check_parquet(str(d), ["text"]), "text", str(tmp_path / "other"), user_cache=str(user))
    assert other.uri.startswith(str(tmp_path / "other")) and other.num_tokens == tokens.num_tokens
    with open(other.uri, "rb") as a, open(tokens.uri, "rb") as b:
        assert a.read() == b.read()


def test_text_without_tokens_is_refused_and_leaves_nothing(ray_connected, tmp_path):
    p = tmp_path / "blank.parquet"
    pq.write_table(pa.table({"text": ["", None, ""]}), p)
    cache = tmp_path / "store" / ".raypod_data"
    user = tmp_path / "user"
    with pytest.raises(ConfigError, match="holds no text to train on"):
        prepare_tokens(check_parquet(str(p), ["text"]), "text", str(cache), user_cache=str(user))
    assert not (tmp_path / "store" / ".raypod_data").exists() and not user.exists()


def _expected(source: TokenWindows, order: SampleOrder, step: int, rank: int, world: int):
    ids = SampleOrder.rank_share(order.ids(step), rank, world)
    return ids, source.get_batch(ids)


def _wait_live(feed: StepFeed, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while feed.pump.queue.qsize() < 2:
        assert time.time() < deadline, "the Ray Data stream delivered nothing"
        time.sleep(0.1)


def test_stream_delivers_each_steps_share_and_rewinds_from_memory(corpus):
    *_, tokens, _ = corpus
    source = TokenWindows(tokens, L)
    order = SampleOrder(len(source), 48, seed=1)
    assert order.steps_per_epoch < 30  # the run below crosses an epoch
    feed = StepFeed(source, order, last_step=60)
    try:
        feed.seek(1, 2, 1)
        _wait_live(feed)
        for step in range(1, 31):
            time.sleep(0.05)  # the step's compute
            ids, batch = feed.take(step, 1, 2)
            want_ids, want = _expected(source, order, step, 1, 2)
            assert np.array_equal(ids, want_ids) and torch.equal(batch, want)
            assert batch.dtype == torch.int64 and batch.shape == (24, L + 1)
        assert feed.stats["streamed"] >= 20 and feed.stats["restarts"] == 1, feed.stats
        # An in-place recovery rewinds 2 steps: served from memory, the stream goes on.
        before = dict(feed.stats)
        feed.seek(1, 2, 29)
        for step in (29, 30, 31, 32):
            ids, batch = feed.take(step, 1, 2)
            assert torch.equal(batch, _expected(source, order, step, 1, 2)[1])
        assert feed.stats["recent"] == before["recent"] + 2
        assert feed.stats["restarts"] == before["restarts"]
        assert feed.stats["streamed"] + feed.stats["late"] == before["streamed"] + before["late"] + 2
        # A new world size restarts the stream; the rank serves itself meanwhile, at once.
        t0 = time.perf_counter()
        ids, batch = feed.take(33, 0, 3)
        assert time.perf_counter() - t0 < 1.0
        assert feed.stats["restarts"] == before["restarts"] + 1
        assert np.array_equal(ids, _expected(source, order, 33, 0, 3)[0])
        _wait_live(feed)
        for step in range(34, 40):
            time.sleep(0.05)
            ids, batch = feed.take(step, 0, 3)
            assert torch.equal(batch, _expected(source, order, step, 0, 3)[1])
        assert feed.stats["streamed"] >= before["streamed"] + 2 + 4, feed.stats
    finally:
        feed.close()


def test_map_style_source_is_fetched_in_process():
    source = GaussianSamples(64, 8, seed=0)
    order = SampleOrder(64, 8, seed=0)
    feed = StepFeed(source, order, last_step=10)
    ids, batch = feed.take(3, 1, 2)
    assert np.array_equal(ids, order.ids(3)[1::2]) and torch.equal(batch, source.get_batch(ids))
    assert feed.pump is None and feed.stats["local"] == 1


class _RecordingSource:
    """A streamed source without Ray: each stream is the rank's rows, built when iterated;
    ``built`` notes the first step of every stream built and on which thread."""

    seq_len = 3

    def __init__(self) -> None:
        self.built: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return 64

    def get_batch(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(ids) * 10

    def to_batch(self, windows: np.ndarray) -> np.ndarray:
        return np.asarray(windows)

    def stream(self, rank: int, world_size: int, order: SampleOrder, first: int, last: int):  # noqa: ANN201
        import threading

        self.built.append((first, threading.current_thread().name))

        class Rows:
            def iter_batches(self, **_):  # noqa: ANN001, ANN202
                for s in range(first, last + 1):
                    ids = SampleOrder.rank_share(order.ids(s), rank, world_size).astype(np.int64)
                    yield {"step": np.array([s]), "ids": ids[None], "windows": (ids * 10)[None]}

        return Rows()


def test_a_jobs_first_step_is_served_by_the_rank_and_the_stream_starts_after_it():
    """``seek(start=False)`` (a job's start): step 1 is assembled here with no stream built;
    the next take starts one for the steps after it, built on the stream's own thread, and
    every step gets exactly its share, streamed or not."""
    order, src = SampleOrder(64, 8, 0), _RecordingSource()
    feed = StepFeed(src, order, last_step=12)
    feed.seek(0, 2, 1, start=False)
    ids, batch = feed.take(1, 0, 2)
    assert src.built == [] and feed.pump is None and feed.stats["local"] == 1
    expected = {s: SampleOrder.rank_share(order.ids(s), 0, 2) for s in range(1, 13)}
    assert np.array_equal(ids, expected[1]) and np.array_equal(batch, expected[1] * 10)
    ids, _ = feed.take(2, 0, 2)
    assert np.array_equal(ids, expected[2]) and feed.pump is not None
    deadline = time.monotonic() + 5
    while not src.built and time.monotonic() < deadline:
        time.sleep(0.01)
    assert src.built == [(3, "raypod-data-stream")]
    for s in range(3, 13):
        time.sleep(0.02)  # the stream runs ahead
        ids, batch = feed.take(s, 0, 2)
        assert np.array_equal(ids, expected[s]) and np.array_equal(batch, expected[s] * 10)
    assert feed.stats["streamed"] > 0 and len(src.built) == 1, feed.stats
    feed.close()
