"""The MLP recipe (issue 5's recovery workload) without Ray or a process group."""

from __future__ import annotations

import torch
from support import MLP as CONFIG
from torch import nn

from raypod.config import load_config
from raypod.recipe import RankContext
from raypod.recipes.mlp import GaussianSamples, MLPRecipe


def _ctx(seed: int = 0) -> RankContext:
    cfg = load_config(CONFIG, [f"train.seed={seed}"])
    return RankContext(rank=0, world_size=1, device=torch.device("cpu"), config=cfg)


def test_model_is_four_blocks_of_the_issue_shape():
    recipe = MLPRecipe()
    model = recipe.build_model(_ctx())
    units = recipe.shard_units(model)
    assert len(units) == 4 and isinstance(model.blocks, nn.ModuleList)
    for block in units:
        assert (block.fc1.in_features, block.fc1.out_features) == (512, 2048)
        assert (block.fc2.in_features, block.fc2.out_features) == (2048, 512)
        assert isinstance(block.act, nn.GELU)
    assert model(torch.randn(3, 512)).shape == (3, 512)


def test_optimizer_is_plain_adamw_at_the_configured_lr():
    recipe, ctx = MLPRecipe(), _ctx()
    model = recipe.build_model(ctx)
    opt = recipe.build_optimizer(model, ctx)
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 1
    assert opt.param_groups[0]["lr"] == 1e-3
    assert sum(p.numel() for p in opt.param_groups[0]["params"]) == sum(p.numel() for p in model.parameters())


def test_data_is_deterministic_by_id_and_seed():
    recipe = MLPRecipe(num_samples=256)
    a, b = recipe.build_data(_ctx()), recipe.build_data(_ctx())
    assert len(a) == 256
    batch = a.get_batch([5, 17, 5])
    assert batch.shape == (3, 512) and batch.dtype == torch.float32
    assert torch.equal(batch, b.get_batch([5, 17, 5]))
    assert torch.equal(batch[0], batch[2]) and not torch.equal(batch[0], batch[1])
    assert torch.equal(a.get_batch([17])[0], batch[1])  # a sample does not depend on its batch
    other = recipe.build_data(_ctx(seed=1))
    assert not torch.equal(other.get_batch([5]), a.get_batch([5]))
    assert abs(float(GaussianSamples(4096, 512, 0).table.std()) - 1.0) < 0.01


def test_loss_is_a_scalar_mean_of_squares():
    recipe, ctx = MLPRecipe(num_samples=64), _ctx()
    torch.manual_seed(0)
    model = recipe.build_model(ctx)
    batch = recipe.build_data(ctx).get_batch(list(range(16)))
    loss = recipe.loss(model, batch, torch.device("cpu"))
    assert loss.shape == () and loss.item() > 0
    assert torch.allclose(loss, model(batch).pow(2).mean())
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert recipe.tokens_per_sample() == 1
