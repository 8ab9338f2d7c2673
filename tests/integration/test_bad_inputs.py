"""Bad input refused by the real ``raypod`` command in one sentence, before anything starts.

Each case is a ``raypod run`` (or ``raypod doctor``) subprocess, as a user runs it: a
missing ``data.path`` is not replaced by the demo corpus, a recipe whose constructor
raises, a config that a private local Ray on this machine can never hold (too many
ranks, GPUs it does not have). Most are refused before Ray starts, so they run side by
side and take seconds. On a real cluster (the session's ``ray start --head``) the wait
for capacity says what it waits for, and ``raypod doctor`` prints one row for its one
node and writes nothing in the current folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import MLP, REPO, TINY

from raypod.config import load_config
from raypod.recipes.gpt import GPTRecipe

RAYPOD = str(Path(sys.executable).parent / "raypod")

BOOM = '''
from raypod.recipes.mlp import MLPRecipe


class Boom(MLPRecipe):
    def __init__(self, width: int = 4) -> None:
        raise ValueError(f"width {width} is not a power of two")
'''


def _local_env(extra_path: Path | None = None) -> dict[str, str]:
    """The caller's environment without RAY_ADDRESS: raypod would start its own local Ray."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path), env.get("PYTHONPATH")) if p)
    return env


def _one_sentence(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("raypod: error: "), err
    return lines[0].removeprefix("raypod: error: ")


def test_refused_before_anything_starts(tmp_path):
    (tmp_path / "boomrecipe.py").write_text(BOOM)
    typo = tmp_path / "typo" / "corpus.parquet"
    cases: dict[str, tuple[Path, list[str], list[str]]] = {
        # A typo in data.path with the GPT recipe: refused, not replaced by the demo corpus.
        "data": (TINY, [f"data.path={typo}"],
                 [f"data.path '{typo}' does not exist", "recipe.args.demo_corpus"]),
        # A recipe whose constructor raises.
        "recipe": (MLP, ["recipe.target=boomrecipe:Boom", "recipe.args={width: 3}"],
                   ["recipe.target 'boomrecipe:Boom'", "ValueError: width 3 is not a power of two"]),
        # More ranks than this machine can hold.
        "ranks": (MLP, ["scaling.min_workers=64", "scaling.max_workers=64"],
                  ["scaling.min_workers (64)", f"{os.cpu_count()} cores", "RAY_ADDRESS is not set"]),
        # A resource a private local Ray never has.
        "custom": (MLP, ["scaling.resources_per_worker={CPU: 1, TPU: 1}"],
                   ["scaling.resources_per_worker asks for 'TPU'"]),
    }
    if torch.cuda.device_count() < 2:  # GPUs a private local Ray here can never have
        cases["gpu"] = (MLP, ["scaling.resources_per_worker={CPU: 1, GPU: 1}"],
                        ["scaling.resources_per_worker.GPU", "2 for scaling.min_workers (2)",
                         f"but {torch.cuda.device_count()} GPU"])
    procs = {}
    for name, (config, overrides, _) in cases.items():
        storage = tmp_path / f"store-{name}"
        cmd = [RAYPOD, "run", str(config), "--quiet", f"--set=checkpoint.storage={storage}",
               "--set=mlflow.enabled=false", *(f"--set={o}" for o in overrides)]
        procs[name] = (storage, subprocess.Popen(cmd, env=_local_env(tmp_path), cwd=tmp_path, text=True,
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for name, (storage, proc) in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, out, err)
        sentence = _one_sentence(err)
        for needle in cases[name][2]:
            assert needle in sentence, (name, sentence)
        assert not storage.exists(), name  # nothing written
    assert not typo.parent.exists()  # no demo corpus written at the typo
    assert not (tmp_path / "raypod_runs").exists()


def test_demo_corpus_is_built_only_where_the_config_says(tmp_path):
    demo = tmp_path / "demo" / "corpus.parquet"
    recipe = GPTRecipe(demo_corpus=str(demo), corpus_bytes=20_000)
    recipe.check_data(load_config(TINY, [f"data.path={demo}"]))
    assert demo.is_file()  # the shipped configs' demo corpus: built on first use
    assert GPTRecipe().demo_corpus is None  # off unless a config opts in
    for name in ("tiny", "small", "350m"):  # every shipped GPT config opts in at its own data.path
        cfg = load_config(REPO / "jobs" / "configs" / f"{name}.yaml")
        assert cfg.recipe.args["demo_corpus"] == cfg.data.path


def test_cluster_wait_says_what_it_waits_for(ray_cluster, tmp_path):
    """On a real cluster the driver waits for room, and says for what, then gives up."""
    env = dict(ray_cluster["env"], RAY_ADDRESS=ray_cluster["address"])
    cmd = [RAYPOD, "run", str(MLP), "--quiet", f"--set=checkpoint.storage={tmp_path}",
           "--set=scaling.resources_per_worker={CPU: 3}", "--set=scaling.spares=0",
           "--set=scaling.schedule_timeout_s=6", "--set=doctor.enabled=false"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    waits = [line for line in proc.stderr.splitlines() if "waiting for capacity" in line]
    assert waits, proc.stderr
    assert "2 x {'CPU': 3.0} for scaling.min_workers" in waits[0], waits[0]
    assert "the cluster has {'CPU':" in waits[0] and "scaling.schedule_timeout_s" in waits[0], waits[0]
    assert "no room to schedule the job" in proc.stderr.strip().splitlines()[-1]


def test_doctor_one_row_per_node_and_nothing_written(ray_cluster, tmp_path):
    env = dict(ray_cluster["env"], RAY_ADDRESS=ray_cluster["address"])
    proc = subprocess.run([RAYPOD, "doctor", "--json"], env=env, cwd=tmp_path, text=True,
                          capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table, _, dump = proc.stdout.partition("\n[")
    reports = json.loads("[" + dump)
    assert len(reports) == 1, reports  # the session cluster has one node
    node = reports[0]["node_id"][:12]
    assert sum(node in line for line in table.splitlines()) == 1, table  # one row
    checks = {c["name"]: c for c in reports[0]["checks"]}
    assert set(checks) == {"torch", "devices", "storage", "allreduce"}
    assert checks["storage"]["detail"].startswith("skipped: no config given")
    assert "MB/s bus" in checks["allreduce"]["detail"]  # the second probe still measured it
    assert list(tmp_path.iterdir()) == []  # no ./raypod_runs


pytestmark = pytest.mark.slow
