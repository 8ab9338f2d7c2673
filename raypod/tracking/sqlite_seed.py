"""A new local MLflow store (``sqlite:///``) made by copying an empty one, not by migrating.

MLflow creates a SQLite store's tables by running every one of its schema migrations
(about 70 in MLflow 3.17): 2 s of CPU on an idle 2-core machine, 10-12 s while a job's
ranks train beside it, and every job with a storage folder of its own pays it once
(:func:`raypod.tracking.identity.default_tracking_uri` puts the store beside the job
folders). :func:`seed_store` pays it once per user and MLflow version instead: the first
store is made by MLflow itself, in a cache folder (``~/.cache/raypod/mlflow``, or
``$RAYPOD_MLFLOW_CACHE``), and every later new store starts as a copy of it, with its
``Default`` experiment's location and times set as MLflow would have set them.

The template is used only when it is what MLflow made: a SQLite file whose integrity check
passes, whose schema (revision and every table, index and trigger) is the one recorded when
MLflow made it, and which holds no run and one experiment.
Anything else is made again. A store that exists is never touched, and the copy is linked
into place only if no other job made the store meanwhile.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sqlite3
import time
import uuid
from pathlib import Path

log = logging.getLogger("raypod.tracking")

CACHE_ENV = "RAYPOD_MLFLOW_CACHE"
"""Folder of the template stores (default ``~/.cache/raypod/mlflow``)."""


def sqlite_file(tracking_uri: str) -> Path | None:
    """The file of a ``sqlite:///`` store, or None for other stores (and in-memory ones)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path).expanduser() if path and path != ":memory:" else None


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/raypod/mlflow").expanduser()


def _temp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _empty_store_stamp(path: Path) -> str | None:
    """``"<schema revision> <sha256 of the schema>"`` if ``path`` is an empty MLflow store (no
    run, one experiment); the schema's digest covers every table, index, view and trigger, so
    a template with anything planted in its schema does not match the stamp MLflow's had."""
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        if con.execute("PRAGMA integrity_check").fetchone() != ("ok",):
            return None
        revisions = con.execute("SELECT version_num FROM alembic_version").fetchall()
        runs = con.execute("SELECT count(*) FROM runs").fetchone()[0]
        experiments = con.execute("SELECT count(*) FROM experiments").fetchone()[0]
        schema = sorted(con.execute("SELECT type, name, tbl_name, coalesce(sql, '') FROM sqlite_master"))
    except sqlite3.Error:
        return None
    finally:
        con.close()
    if len(revisions) != 1 or runs != 0 or experiments != 1:
        return None
    return f"{revisions[0][0]} {hashlib.sha256(repr(schema).encode()).hexdigest()}"


def template(cache: Path | None = None) -> Path | None:
    """The empty store of the installed MLflow, made by MLflow in ``cache`` if it is not there
    (or does not match the stamp recorded when MLflow made it); None if it cannot be made."""
    import mlflow

    root = cache or _cache_dir()
    path = root / f"empty-store-mlflow-{mlflow.__version__}.db"
    stamp = path.with_suffix(".stamp")
    try:
        if path.exists() and stamp.exists() and _empty_store_stamp(path) == stamp.read_text().strip():
            return path
    except OSError:
        pass
    tmp = _temp_beside(path)
    try:
        root.mkdir(parents=True, exist_ok=True)
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments(max_results=1)
        made = _empty_store_stamp(tmp)
        if made is None:
            return None
        stamp_tmp = _temp_beside(stamp)
        stamp_tmp.write_text(made)
        os.replace(stamp_tmp, stamp)
        os.replace(tmp, path)
        return path
    except Exception as e:  # noqa: BLE001 - no template: MLflow makes the store itself
        log.debug("no MLflow store template in %s: %s", root, e)
        return None
    finally:
        tmp.unlink(missing_ok=True)


def seed_store(tracking_uri: str, cache: Path | None = None) -> bool:
    """Make the ``sqlite:///`` store of ``tracking_uri`` as a copy of the empty :func:`template`
    if it does not exist yet; True if this call made it. Other stores, and a store that exists,
    are left to MLflow."""
    db = sqlite_file(tracking_uri)
    if db is None or db.exists():
        return False
    src = template(cache)
    if src is None:
        return False
    tmp = _temp_beside(db)
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, tmp)
        now = int(time.time() * 1000)
        con = sqlite3.connect(tmp)
        try:  # what MLflow gives the Default experiment of a store it makes from this process
            con.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ? "
                        "WHERE experiment_id = 0", (os.path.join(os.path.abspath("mlruns"), "0"), now, now))
            con.commit()
        finally:
            con.close()
        os.link(tmp, db)  # fails if another job made the store meanwhile: then that one stays
        return True
    except FileExistsError:
        return False
    except (OSError, sqlite3.Error) as e:  # a file system without hard links, say: MLflow makes it
        log.debug("could not seed %s from %s: %s", db, src, e)
        return False
    finally:
        tmp.unlink(missing_ok=True)
