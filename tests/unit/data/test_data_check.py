"""Bad data is refused in one sentence naming the culprit, from the parquet footers alone."""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypod.config import ConfigError
from raypod.data.prepare import check_parquet


def _write(path, **cols) -> str:
    pq.write_table(pa.table(cols), path)
    return str(path)


def _refused(path: str, columns=("text",)) -> str:
    with pytest.raises(ConfigError) as e:
        check_parquet(path, list(columns))
    msg = str(e.value)
    assert "\n" not in msg and msg.count(". ") == 0  # one sentence
    return msg


def test_good_file_and_folder(tmp_path):
    one = check_parquet(_write(tmp_path / "a.parquet", text=["x", "y"]), ["text"])
    assert one.rows == 2 and len(one.files) == 1
    d = tmp_path / "shards"
    d.mkdir()
    _write(d / "b.parquet", text=["3"], other=[1])
    _write(d / "a.parquet", text=["1", "2"], other=[1, 2])
    (d / "_SUCCESS").write_text("")  # writers' markers and hidden files are not data
    (d / ".hidden").write_text("x")
    src = check_parquet(str(d), ["text"])
    assert src.rows == 3 and [os.path.basename(f) for f in src.files] == ["a.parquet", "b.parquet"]


def test_fingerprint_follows_the_files(tmp_path):
    p = _write(tmp_path / "a.parquet", text=["x"])
    first = check_parquet(p, ["text"]).fingerprint
    assert check_parquet(p, ["text"]).fingerprint == first
    time.sleep(0.01)
    _write(tmp_path / "a.parquet", text=["x", "longer text"])
    assert check_parquet(p, ["text"]).fingerprint != first


def test_missing_path(tmp_path):
    msg = _refused(str(tmp_path / "nope.parquet"))
    assert msg == f"data.path '{tmp_path / 'nope.parquet'}' does not exist"


def test_file_that_is_not_parquet(tmp_path):
    p = tmp_path / "data.parquet"
    p.write_text("text\nhello\n")
    msg = _refused(str(p))
    assert msg == f"data.path '{p}' is not a parquet file"


def test_folder_holding_a_file_that_is_not_parquet(tmp_path):
    _write(tmp_path / "a.parquet", text=["x"])
    (tmp_path / "notes.csv").write_text("a,b\n")
    msg = _refused(str(tmp_path))
    assert "'notes.csv' is not a parquet file" in msg


def test_missing_column(tmp_path):
    msg = _refused(_write(tmp_path / "a.parquet", body=["x"]))
    assert "has no 'text' column" in msg and "body" in msg


def test_column_that_is_not_text(tmp_path):
    msg = _refused(_write(tmp_path / "a.parquet", text=[1, 2]))
    assert "column 'text'" in msg and "not text" in msg


def test_empty_dataset(tmp_path):
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), p)
    assert _refused(str(p)) == f"data.path '{p}' is empty (0 rows)"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "empty folder" in _refused(str(empty))
