"""The HF path without Ray: shard units found in real HF models, the root-only refusal, the
recipe imported from the config's folder, and the tokenising task against the tokenizer."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from support import MLP
from torch import nn

from raypod.config import ConfigError, load_config
from raypod.recipe import Recipe, check_sharding
from raypod.recipes.mlp import GaussianSamples, MLPRecipe

transformers = pytest.importorskip("transformers")


TEXTS = ["def f(x):\n    return x + 1\n", "", "class A:\n    pass\n", "héllo wörld ✓", "import os"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE trained here on a little Python source (no hub)."""
    from raypod.recipes.hf import build_tokenizer

    root = tmp_path_factory.mktemp("tok")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(Path(m.__file__).read_text() for m in (os, subprocess, textwrap)))
    build_tokenizer(str(corpus), 300, str(root / "tok"))
    return root / "tok"


def _on_meta(cls, **fields):
    with torch.device("meta"):
        return cls(cls.config_class(**fields))


def test_shard_units_finds_the_blocks_of_llama_and_gpt2():
    llama = _on_meta(transformers.LlamaForCausalLM, vocab_size=64, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
    gpt2 = _on_meta(transformers.GPT2LMHeadModel, vocab_size=64, n_embd=32, n_layer=2, n_head=4)
    assert Recipe().shard_units(llama) == list(llama.model.layers)
    assert Recipe().shard_units(gpt2) == list(gpt2.transformer.h)


class _Flat(Recipe):
    """A model with no repeated blocks."""

    def build_model(self, ctx):
        return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))


class _FlatOnPurpose(_Flat):
    shard_root_only = True


def test_root_only_fsdp_is_refused_unless_the_recipe_says_so():
    cfg = load_config(MLP, ["recipe.target=raypod.recipes.mlp:MLPRecipe"])
    check_sharding(cfg, _FlatOnPurpose())  # said explicitly: allowed
    check_sharding(cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update={"strategy": "ddp"})}),
                   _Flat())  # DDP wraps no units
    with pytest.raises(ConfigError) as e:
        check_sharding(cfg, _Flat())
    msg = str(e.value)
    assert "recipe.target 'raypod.recipes.mlp:MLPRecipe'" in msg and "shard_root_only" in msg
    assert msg.count(". ") == 0 and "\n" not in msg  # one sentence


def test_recipe_imports_from_the_config_folder_without_pythonpath(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "my_recipe.py").write_text(textwrap.dedent("""
        from raypod.recipes.mlp import MLPRecipe

        class MyRecipe(MLPRecipe):
            pass
    """))
    (job / "job.yaml").write_text(MLP.read_text().replace("raypod.recipes.mlp:MLPRecipe", "my_recipe:MyRecipe"))
    assert "my_recipe:MyRecipe" in (job / "job.yaml").read_text()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([str(Path(sys.executable).parent / "raypod"), "check", str(job / "job.yaml")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "my_recipe:MyRecipe" in out.stdout


def test_tokenising_task_gives_what_the_tokenizer_gives(tokenizer_dir):
    from raypod.data.hf_tokens import HFTokenizer
    from raypod.data.prepare import _tokenize
    from raypod.recipes.hf import load_tokenizer

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    hf = HFTokenizer.from_pretrained(load_tokenizer(str(tokenizer_dir)))
    row = _tokenize(pa.table({"text": TEXTS}), "text", hf)  # what each Ray Data task runs
    got = np.frombuffer(row["tokens"][0], dtype=hf.dtype).tolist()
    want = [i for ids in tok([t for t in TEXTS if t])["input_ids"] for i in [*ids, tok.eos_token_id]]
    assert got == want and row["docs"][0] == len(TEXTS)
    assert want[0] == tok.bos_token_id and hf.name.startswith("hf-")


def test_missing_transformers_is_one_sentence_naming_the_recipe(monkeypatch, tokenizer_dir):
    from raypod.recipes.hf import HFCausalLM

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ConfigError, match=r"recipe.target 'raypod.recipes.hf:HFCausalLM' needs the "
                                          r"transformers .*pip install 'raypod\[hf\]'"):
        HFCausalLM(model_config={"model_type": "llama"}, tokenizer=str(tokenizer_dir))


class _EvalMLP(MLPRecipe):
    """The MLP with eval data and an extra per-step metric."""

    def build_eval_data(self, ctx):
        return GaussianSamples(40, self.dim, 123)

    def loss(self, model, batch, device):
        loss = super().loss(model, batch, device)
        return loss, {"double": 2 * loss.detach()}


def test_eval_leaves_the_training_state_alone_and_metrics_aggregate(tmp_path):
    """One rank in a process group of its own (no Ray): 5 steps with and without eval."""
    import torch.distributed as dist

    from raypod.driver.completion import recipe_metrics
    from raypod.worker.trainer import Trainer

    def train(every: int):
        cfg = load_config(MLP, [f"train.eval_every_steps={every}", "train.max_steps=5", "train.eval_samples=10",
                                f"checkpoint.storage={tmp_path}"])
        t = Trainer(cfg, _EvalMLP(n_blocks=2, dim=32, hidden=64, num_samples=256))
        t.join(0, 1, dist.HashStore(), [], 0)
        try:
            last = [t.train_step(s, take_snapshot=False) for s in range(1, 6)][-1]
            return t.state_digest(), last
        finally:
            t.leave()

    plain, no_eval = train(0)
    with_eval, last = train(2)
    assert with_eval == plain and no_eval.eval_sums is None
    m = recipe_metrics([last], last.samples)
    assert set(m) == {"double", "eval_loss", "eval_double", "eval_s"}
    assert m["eval_double"] == pytest.approx(2 * m["eval_loss"]) and last.eval_samples == 10
    assert m["double"] == pytest.approx(2 * last.loss_sum / last.samples)
