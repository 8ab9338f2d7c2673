"""The pre-flight sharding check (``raypod.recipe.check_sharding``): its verdicts, without TorchDynamo's import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from support import MLP, REPO, TINY
from torch import nn

from raypod.config import ConfigError, load_config
from raypod.recipe import Recipe, build_recipe, check_sharding


class _Flat(Recipe):
    def build_model(self, ctx):
        return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))


class _Blocks(Recipe):
    def build_model(self, ctx):
        return nn.Sequential(nn.ModuleList([nn.Linear(8, 8) for _ in range(3)]))


def test_verdicts_with_the_initialisers_skipped():
    cfg = load_config(MLP, ["recipe.target=raypod.recipes.mlp:MLPRecipe"])
    check_sharding(cfg, _Blocks())
    check_sharding(load_config(TINY), build_recipe(load_config(TINY)))
    with pytest.raises(ConfigError, match="gives FSDP2 no blocks to shard one by one"):
        check_sharding(cfg, _Flat())


def test_initialisers_still_run_outside_the_check():
    check_sharding(load_config(TINY), build_recipe(load_config(TINY)))
    t = torch.zeros(64)
    nn.init.normal_(t)
    assert t.abs().sum() > 0


def test_no_dynamo_import_on_the_driver():
    code = ("import sys\nfrom raypod.recipe import check_sharding\nfrom raypod.config import load_config\n"
            "from raypod.recipe import build_recipe\n"
            f"cfg = load_config({str(TINY)!r})\ncheck_sharding(cfg, build_recipe(cfg))\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
