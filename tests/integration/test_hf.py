"""The HF path on a real Ray cluster: a tiny Llama from a config, a BPE tokenizer trained here,
the recipe imported from the config's folder (on the ranks too), eval, a kill, save_pretrained.

One job (module fixture ``hf_job``, real MLflow server) carries most assertions; a second,
fault-free run without eval is its reference state.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from support import REPO

from raypod.api import run
from raypod.config import load_config
from raypod.data.corpus import build_stdlib_corpus

transformers = pytest.importorskip("transformers")


HF_LLAMA = REPO / "jobs" / "configs" / "hf_llama.yaml"
STEPS, EVAL_EVERY, KILL_AT = 12, 4, 6

pytestmark = pytest.mark.slow

MY_LLAMA = '''
"""A user's recipe module beside the config: the HF recipe plus a per-step metric."""
import math

from raypod.recipes.hf import HFCausalLM


class MyLlama(HFCausalLM):
    def loss(self, model, batch, device):
        loss = super().loss(model, batch, device)
        return loss, {"bits_per_token": loss.detach() / math.log(2)}
'''


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory):
    """Corpus, a locally trained BPE tokenizer, and a job folder with the recipe and the config."""
    from raypod.recipes.hf import build_tokenizer

    root = tmp_path_factory.mktemp("hf")
    corpus = root / "corpus.parquet"
    build_stdlib_corpus(str(corpus), max_bytes=150_000)
    build_tokenizer(str(corpus), 320, str(root / "tok"))
    job = root / "job"
    job.mkdir()
    (job / "my_llama.py").write_text(textwrap.dedent(MY_LLAMA))
    text = HF_LLAMA.read_text().replace("raypod.recipes.hf:HFCausalLM", "my_llama:MyLlama")
    (job / "llama.yaml").write_text(text)
    return root, corpus, job / "llama.yaml"


def _config(hf_files, storage: Path, *overrides: str):
    root, corpus, yaml_path = hf_files
    model = ("{model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
             "num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 128, "
             "tie_word_embeddings: true}")
    return load_config(yaml_path, [
        f"checkpoint.storage={storage}", f"data.path={corpus}", "recipe.args.demo_corpus=null",
        f"recipe.args.tokenizer={root / 'tok'}", f"recipe.args.cache_dir={root / 'cache'}",
        f"recipe.args.model_config={model}", "recipe.args.seq_len=64", "recipe.args.eval_fraction=0.05",
        f"train.max_steps={STEPS}", "train.warmup_steps=2", "train.global_batch=8", "train.micro_batch=4",
        "train.eval_samples=16", "checkpoint.every_steps=0", "fault.hang_timeout_s=60", *overrides])


REGISTERED = "raypod-hf-llama-test"


@pytest.fixture(scope="module")
def hf_job(ray_connected, mlflow_server, hf_files, tmp_path_factory):
    """The job: eval every 4 steps, rank 1 killed at step 6, MLflow on the session's server.

    Returns ``(summary, job_dir, config)``.
    """
    cfg = _config(hf_files, tmp_path_factory.mktemp("hf-run"), "name=hf-llama",
                  f"train.eval_every_steps={EVAL_EVERY}", f"mlflow.tracking_uri={mlflow_server.uri}",
                  f"mlflow.registered_model={REGISTERED}", f"fault.inject=[{{step: {KILL_AT}, rank: 1, kind: kill}}]")
    summary = run(cfg, progress=False)
    return summary, Path(cfg.job_dir), cfg


@pytest.fixture(scope="module")
def reference(ray_connected, hf_files, tmp_path_factory):
    """The same training without the kill and without eval (no spare: nothing to replace)."""
    cfg = _config(hf_files, tmp_path_factory.mktemp("hf-ref"), "name=hf-ref", "mlflow.enabled=false",
                  "scaling.spares=0")
    return run(cfg, callbacks=[])


def test_hf_llama_recovers_in_place_with_the_same_state(hf_job, reference):
    summary, _, _ = hf_job
    assert summary["status"] == "succeeded" and summary["final_step"] == STEPS
    assert summary["failures"] == 1 and summary["world_sizes"] == [2, 2]
    ev = summary["events"][0]
    assert ev["kind"] == "kill" and ev["restored_from"].startswith("memory")
    assert summary["samples"] == {"consumed": STEPS * 8, "duplicated": 0, "skipped": 0}
    # Exact across the recovery, and evaluation left the training state untouched.
    assert summary["final_state_sha256"] == reference["final_state_sha256"]


def test_eval_and_recipe_metrics_reach_mlflow(hf_job, mlflow_server):
    from mlflow.tracking import MlflowClient

    summary, _, _ = hf_job
    client = MlflowClient(mlflow_server.uri)
    evals = client.get_metric_history(summary["mlflow_run_id"], "eval_loss")
    assert sorted(m.step for m in evals) == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    assert all(0 < m.value < 10 for m in evals)
    assert len(client.get_metric_history(summary["mlflow_run_id"], "eval_accuracy")) == len(evals)
    bits = client.get_metric_history(summary["mlflow_run_id"], "bits_per_token")
    loss = {m.step: m.value for m in client.get_metric_history(summary["mlflow_run_id"], "loss")}
    assert len(bits) == STEPS and all(abs(m.value - loss[m.step] / np.log(2)) < 1e-3 for m in bits)


def test_final_model_hf_loads_and_generates(hf_job):
    import torch

    _, job_dir, _ = hf_job
    out = job_dir / "final_model_hf"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    final = torch.load(job_dir / "final_model.pt", weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in final.items())
    ids = tok("def main(", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 8
    assert isinstance(tok.decode(gen[0]), str)


def test_token_file_is_what_the_tokenizer_gives(hf_job, hf_files):
    """The Ray Data pipeline's token file starts with the tokenizer's ids of the first rows."""
    from raypod.data.prepare import check_parquet, find_tokens

    root, corpus, _ = hf_files
    tok = transformers.AutoTokenizer.from_pretrained(root / "tok")
    _, _, cfg = hf_job
    from raypod.recipe import build_recipe

    name = build_recipe(cfg).tokens.name
    found = find_tokens(str(root / "cache"), check_parquet(str(corpus), ["text"], tokenizer=name).fingerprint)
    texts = pq.read_table(corpus, columns=["text"]).column("text").to_pylist()[:3]
    want = [i for ids in tok(texts)["input_ids"] for i in [*ids, tok.eos_token_id]]
    tokens = np.fromfile(found.uri, dtype=found.dtype)
    assert found.dtype == "uint16" and tokens[: len(want)].tolist() == want


def test_final_model_is_an_mlflow_transformers_model_that_generates(hf_job, mlflow_server):
    """The run's logged model (MLflow 3) is the transformers flavour, with its tokenizer, is
    registered, and ``mlflow.transformers.load_model`` of the registered version generates."""
    import mlflow.models
    import mlflow.transformers
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    summary, _, _ = hf_job
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(summary["mlflow_run_id"])
    [output] = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.source_run_id == run.info.run_id and model.status == LoggedModelStatus.READY
    # Registered (mlflow.registered_model): the registry's version is this logged model.
    [version] = client.search_model_versions(f"name='{REGISTERED}'")
    assert version.run_id == run.info.run_id
    uri = f"models:/{REGISTERED}/{version.version}"
    with _use_tracking_uri(mlflow_server.uri):
        info = mlflow.models.get_model_info(uri)
        assert "transformers" in info.flavors
        assert "tokenizer" in info.flavors["transformers"]["components"]
        pipe = mlflow.transformers.load_model(uri)
    text = pipe("def main(", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith("def main(") and len(text) > len("def main(")
