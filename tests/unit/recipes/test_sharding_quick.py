"""The pre-flight sharding check of ``raypod.api``: the same verdicts, without TorchDynamo's import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from support import MLP, REPO, TINY
from torch import nn

from raypod.api import check_sharding_quickly
from raypod.config import ConfigError, load_config
from raypod.recipe import Recipe, build_recipe


class _Flat(Recipe):
    def build_model(self, ctx):
        return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))


class _Blocks(Recipe):
    def build_model(self, ctx):
        return nn.Sequential(nn.ModuleList([nn.Linear(8, 8) for _ in range(3)]))


def test_same_verdicts_as_check_sharding():
    cfg = load_config(MLP, ["recipe.target=raypod.recipes.mlp:MLPRecipe"])
    check_sharding_quickly(cfg, _Blocks())
    check_sharding_quickly(load_config(TINY), build_recipe(load_config(TINY)))
    with pytest.raises(ConfigError, match="gives FSDP2 no blocks to shard one by one"):
        check_sharding_quickly(cfg, _Flat())


def test_initialisers_still_run_outside_the_check():
    check_sharding_quickly(load_config(TINY), build_recipe(load_config(TINY)))
    t = torch.zeros(64)
    nn.init.normal_(t)
    assert t.abs().sum() > 0


def test_no_dynamo_import_on_the_driver():
    code = ("import sys\nfrom raypod.api import check_sharding_quickly\nfrom raypod.config import load_config\n"
            "from raypod.recipe import build_recipe\n"
            f"cfg = load_config({str(TINY)!r})\ncheck_sharding_quickly(cfg, build_recipe(cfg))\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
