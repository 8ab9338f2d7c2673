"""A new local MLflow store starts as a copy of an empty one MLflow made (``raypod.tracking.sqlite_seed``)."""

from __future__ import annotations

import os
import sqlite3

import pytest

from raypod.tracking.sqlite_seed import seed_store, template


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("mlflow-cache")
    assert template(cache) is not None  # MLflow makes the first one (~2 s)
    return cache


def test_a_new_store_is_a_copy_mlflow_opens_and_writes(cache, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    assert seed_store(uri, cache)
    client = MlflowClient(tracking_uri=uri)
    [default] = client.search_experiments()
    assert default.name == "Default" and default.artifact_location == str(tmp_path / "mlruns" / "0")
    run = client.create_run(client.create_experiment("e"))
    client.log_metric(run.info.run_id, "loss", 1.0, step=1)
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [1.0]
    assert not seed_store(uri, cache)  # it exists now: never touched again
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_other_stores_are_left_to_mlflow(cache, tmp_path):
    assert not seed_store("http://127.0.0.1:5000", cache)
    assert not seed_store("sqlite:///:memory:", cache)
    existing = tmp_path / "mlflow.db"
    existing.write_bytes(b"not ours")
    assert not seed_store(f"sqlite:///{existing}", cache) and existing.read_bytes() == b"not ours"


@pytest.mark.parametrize("damage", ["garbage", "an experiment", "another revision", "a trigger"])
def test_a_template_that_is_not_what_mlflow_made_is_made_again(tmp_path, damage):
    cache = tmp_path / "cache"
    path = template(cache)
    if damage == "garbage":
        path.write_bytes(os.urandom(4096))
    else:
        con = sqlite3.connect(path)
        if damage == "an experiment":
            con.execute("INSERT INTO experiments (experiment_id, name, lifecycle_stage) VALUES (7, 'x', 'active')")
        elif damage == "a trigger":
            con.execute("CREATE TRIGGER planted AFTER INSERT ON metrics BEGIN DELETE FROM metrics; END")
        else:
            con.execute("UPDATE alembic_version SET version_num = 'planted'")
        con.commit()
        con.close()
    again = template(cache)
    assert again == path
    con = sqlite3.connect(again)
    assert con.execute("SELECT count(*) FROM experiments").fetchone()[0] == 1
    assert con.execute("SELECT version_num FROM alembic_version").fetchone()[0] != "planted"
    assert con.execute("SELECT count(*) FROM sqlite_master WHERE name = 'planted'").fetchone()[0] == 0
    con.close()
