"""Train any HuggingFace ``AutoModelForCausalLM`` with an HF tokenizer.

Point a config at it (``recipe.target: raypod.recipes.hf:HFCausalLM``) and give it a
model and a tokenizer, all from local files (raypod never downloads from the hub):

- ``recipe.args.model_config``: the model's config, a dict (``model_type`` and the
  config's fields, as in ``config.json``) or a folder with ``config.json``; the model is
  built from it with fresh weights. Or ``recipe.args.pretrained``: a folder written by
  ``save_pretrained`` (config and weights); training starts from those weights.
- ``recipe.args.tokenizer``: a folder written by ``save_pretrained`` or a
  ``tokenizer.json`` (default: the ``pretrained`` folder). It must be a fast tokenizer.

The data pipeline is the GPT recipe's (:mod:`raypod.data.prepare`,
:mod:`raypod.data.stream`) with the HF tokenizer instead of UTF-8 bytes: Ray Data tasks
tokenise the ``text`` column in batches with the tokenizer's Rust backend
(:class:`raypod.data.hf_tokens.HFTokenizer`), an end-of-sequence token after each
document, into a cached token file keyed by the tokenizer's digest, and every rank
streams fixed-length windows of ``seq_len + 1`` tokens. Exact resume and the sample
ledger are the same as for the GPT.

At the end of a job, rank 0 writes ``save_pretrained`` output of the final model and the
tokenizer to ``<job_dir>/final_model_hf/`` (:meth:`HFCausalLM.export_pretrained`), which
``AutoModelForCausalLM.from_pretrained`` loads.

``python -m raypod.recipes.hf build-tokenizer --corpus <parquet|text> --vocab-size 512
--out <dir>`` trains a small byte-level BPE tokenizer locally, with ``tokenizers``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raypod.config import ConfigError, JobConfig
from raypod.data.corpus import TEXT_COLUMN, build_stdlib_corpus, ensure_demo_corpus
from raypod.data.hf_tokens import HFTokenizer
from raypod.data.prepare import TokenCorpus, check_parquet, find_tokens, prepare_tokens, token_cache_root
from raypod.data.stream import TokenWindows
from raypod.recipe import RankContext, Recipe

TARGET = "raypod.recipes.hf:HFCausalLM"
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>")
"""End-of-sequence tokens looked for in a bare ``tokenizer.json`` (which names none itself)."""
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")


def _transformers(owner: type | None = None) -> Any:
    """``transformers``, or one sentence naming the recipe (``owner``'s import path) and the fix."""
    try:
        import transformers
    except ImportError:
        target = f"{owner.__module__}:{owner.__qualname__}" if owner is not None else TARGET
        raise ConfigError(f"recipe.target '{target}' needs the transformers and tokenizers packages: "
                          "pip install 'raypod[hf]'") from None
    return transformers


def _local(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def load_tokenizer(path: str) -> Any:
    """A fast HF tokenizer from a ``save_pretrained`` folder or a ``tokenizer.json`` (local only).

    Raises:
        ConfigError: the path is missing or holds no fast tokenizer.
    """
    tf = _transformers()
    p = _local(path)
    try:
        if os.path.isfile(p):
            tok = tf.PreTrainedTokenizerFast(tokenizer_file=p)
            vocab = tok.get_vocab()
            for attr, names in (("eos_token", _EOS_NAMES), ("bos_token", _BOS_NAMES)):
                found = next((t for t in names if t in vocab), None)
                if getattr(tok, attr) is None and found is not None:
                    setattr(tok, attr, found)
        elif os.path.isdir(p):
            tok = tf.AutoTokenizer.from_pretrained(p, use_fast=True, local_files_only=True)
        else:
            raise ConfigError(f"recipe.args.tokenizer '{path}' does not exist (a save_pretrained folder "
                              "or a tokenizer.json)")
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever transformers raises for a bad tokenizer
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"recipe.args.tokenizer '{path}' cannot be loaded: {type(e).__name__}: {msg}") from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"recipe.args.tokenizer '{path}' is not a fast tokenizer (no tokenizer.json)")
    return tok


class HFCausalLM(Recipe):
    """Next-token prediction with any ``AutoModelForCausalLM`` and an HF tokenizer.

    Args:
        model_config: the model's config: a dict (with ``model_type``, e.g. ``llama``) or a
            folder (or ``config.json``) of one. Its ``vocab_size`` defaults to the tokenizer's;
            unset ``bos/eos/pad_token_id`` come from the tokenizer.
        pretrained: a local ``save_pretrained`` folder to start from (instead of ``model_config``).
        tokenizer: a local ``save_pretrained`` folder or ``tokenizer.json`` (default: ``pretrained``).
        seq_len: tokens per sample (each sample holds ``seq_len + 1``, inputs and shifted targets).
        eval_path: parquet with a ``text`` column to evaluate on every ``train.eval_every_steps``.
        eval_fraction: without ``eval_path``, the share of the training data's samples held out
            (the last ones) for evaluation; 0: no eval data.
        text_column: the parquet column with the documents.
        demo_corpus, corpus_bytes, cache_dir: as for :class:`raypod.recipes.gpt.GPTRecipe`.
    """

    mlflow_flavor = "transformers"

    def __init__(self, model_config: dict[str, Any] | str | None = None, pretrained: str | None = None,
                 tokenizer: str | None = None, seq_len: int = 256, eval_path: str | None = None,
                 eval_fraction: float = 0.0, text_column: str = TEXT_COLUMN,
                 demo_corpus: str | None = None, corpus_bytes: int = 8_000_000,
                 cache_dir: str | None = None) -> None:
        tf = _transformers(type(self))
        if (model_config is None) == (pretrained is None):
            raise ConfigError("recipe.args: give exactly one of model_config (a dict or a config folder) "
                              "and pretrained (a save_pretrained folder)")
        if tokenizer is None and pretrained is None:
            raise ConfigError("recipe.args.tokenizer is not set (a save_pretrained folder or a tokenizer.json; "
                              "python -m raypod.recipes.hf build-tokenizer makes one)")
        if not 0.0 <= eval_fraction < 1.0:
            raise ConfigError(f"recipe.args.eval_fraction ({eval_fraction}) must be at least 0 and below 1")
        self.pretrained = _local(pretrained) if pretrained else None
        self.seq_len = int(seq_len)
        self.eval_path, self.eval_fraction = eval_path, float(eval_fraction)
        self.text_column = text_column
        self.demo_corpus, self.corpus_bytes, self.cache_dir = demo_corpus, corpus_bytes, cache_dir
        tok = load_tokenizer(tokenizer or pretrained)
        self.tokens = HFTokenizer.from_pretrained(tok)
        """What the Ray Data tasks tokenise with (its ``name`` keys the token cache)."""
        self.tokenizer_files = _saved_files(tok)
        """The tokenizer's ``save_pretrained`` files (name -> bytes), written beside the final model."""
        self.hf_config = self._model_config(tf, model_config, tok)
        self.corpus: TokenCorpus | None = None
        self.eval_corpus: TokenCorpus | None = None
        self.num_train: int | None = None
        """Set by :meth:`prepare_data` on the driver; travel to the ranks with the recipe."""

    # ---- model -------------------------------------------------------------------
    def _model_config(self, tf: Any, model_config: dict[str, Any] | str | None, tok: Any) -> Any:
        try:
            if self.pretrained:
                cfg = tf.AutoConfig.from_pretrained(self.pretrained, local_files_only=True)
            elif isinstance(model_config, dict):
                fields = dict(model_config)
                model_type = fields.pop("model_type", None)
                if not model_type:
                    raise ConfigError("recipe.args.model_config has no model_type (e.g. llama, gpt2)")
                fields.setdefault("vocab_size", len(tok))
                for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # not the model type's defaults
                    if getattr(tok, name, None) is not None:
                        fields.setdefault(name, getattr(tok, name))
                cfg = tf.AutoConfig.for_model(model_type, **fields)
            else:
                p = Path(_local(str(model_config)))
                cfg = tf.AutoConfig.from_pretrained(str(p.parent if p.is_file() else p), local_files_only=True)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - an unknown model type, a missing folder, a bad field
            key = "pretrained" if self.pretrained else "model_config"
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ConfigError(f"recipe.args.{key} is not a usable model config: {type(e).__name__}: {msg}") from None
        if cfg.vocab_size < len(tok):
            raise ConfigError(f"recipe.args: the model's vocab_size ({cfg.vocab_size}) is smaller than the "
                              f"tokenizer's vocabulary ({len(tok)})")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(cfg, name, None) is None and getattr(tok, name, None) is not None:
                setattr(cfg, name, getattr(tok, name))
        cfg.use_cache = False
        return cfg

    def build_model(self, ctx: RankContext) -> nn.Module:
        """From ``pretrained`` weights, or fresh from the config (always fresh on the meta device)."""
        tf = _transformers()
        if self.pretrained and torch.get_default_device().type != "meta":
            model = tf.AutoModelForCausalLM.from_pretrained(self.pretrained, dtype=torch.float32,
                                                            local_files_only=True)
        else:
            model = tf.AutoModelForCausalLM.from_config(self.hf_config, dtype=torch.float32)
        return model.train()  # from_pretrained returns it in eval mode

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        batch = batch.to(device, non_blocking=True)
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    def evaluate(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss and next-token accuracy (logged as ``eval_loss`` and ``eval_accuracy``)."""
        batch = batch.to(device, non_blocking=True)
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits.float()
        target = batch[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        return loss, {"accuracy": (logits.argmax(-1) == target).float().mean()}

    def tokens_per_sample(self) -> int:
        return self.seq_len

    def flops_per_token(self, model: nn.Module) -> float:
        """6 x the non-embedding parameters, plus attention (12 x layers x hidden x seq_len)."""
        c = self.hf_config
        layers = getattr(c, "num_hidden_layers", 0) or 0
        hidden = getattr(c, "hidden_size", 0) or 0
        emb = c.vocab_size * hidden
        params = sum(p.numel() for p in model.parameters())
        return 6.0 * max(0, params - emb) + 12.0 * layers * hidden * self.seq_len

    def export_pretrained(self, state_dict: dict[str, torch.Tensor], out_dir: str) -> bool:
        """``save_pretrained`` of the model (config + safetensors) and of the tokenizer."""
        tf = _transformers()
        tf.utils.logging.disable_progress_bar()  # one folder of a few files: no bars in the job's log
        with torch.device("meta"):
            model = tf.AutoModelForCausalLM.from_config(self.hf_config, dtype=torch.float32)
        model.load_state_dict(state_dict, assign=True, strict=False)
        missing = [n for n, p in model.named_parameters() if p.is_meta]
        if missing:
            raise RuntimeError(f"the final state dict lacks {len(missing)} parameters of the model, "
                               f"e.g. {missing[0]}")
        model.config.use_cache = True
        model.save_pretrained(out_dir)
        for name, data in self.tokenizer_files.items():
            Path(out_dir, name).write_bytes(data)
        return True

    # ---- data --------------------------------------------------------------------
    def _ensure_corpus(self, path: str) -> None:
        ensure_demo_corpus(path, self.demo_corpus, self.corpus_bytes)

    def _cache_root(self, config: JobConfig) -> str:
        return token_cache_root(self.cache_dir, config)

    def _check(self, path: str) -> Any:
        return check_parquet(path, [self.text_column], tokenizer=self.tokens.name)

    def check_data(self, config: JobConfig) -> None:
        self._ensure_corpus(config.data.path)
        self._check(config.data.path)
        if self.eval_path:
            self._check(self.eval_path)

    def _tokenised(self, path: str, config: JobConfig) -> TokenCorpus:
        return prepare_tokens(self._check(path), self.text_column, self._cache_root(config), self.tokens)

    def prepare_data(self, config: JobConfig) -> None:
        corpus = self._tokenised(config.data.path, config)
        n = corpus.num_samples(self.seq_len)
        held = 0
        if self.eval_path:
            self.eval_corpus = self._tokenised(self.eval_path, config)
        elif self.eval_fraction:
            held = max(1, int(n * self.eval_fraction))
        if n - held < config.train.global_batch:
            raise ConfigError(f"data.path '{config.data.path}' gives {n - held} training samples of "
                              f"{self.seq_len} tokens, fewer than train.global_batch ({config.train.global_batch})")
        self.corpus, self.num_train = corpus, n - held

    def _ensure_prepared(self, config: JobConfig) -> None:
        """On a rank whose driver skipped :meth:`prepare_data`: find (or make) the caches."""
        if self.corpus is not None:
            return
        source = self._check(config.data.path)
        self.corpus = (find_tokens(self._cache_root(config), source.fingerprint)
                       or self._tokenised(config.data.path, config))
        n = self.corpus.num_samples(self.seq_len)
        held = max(1, int(n * self.eval_fraction)) if self.eval_fraction and not self.eval_path else 0
        self.num_train = n - held
        if self.eval_path:
            self.eval_corpus = self._tokenised(self.eval_path, config)

    def build_data(self, ctx: RankContext) -> TokenWindows:
        self._ensure_prepared(ctx.config)
        return TokenWindows(self.corpus, self.seq_len, 0, self.num_train)

    def build_eval_data(self, ctx: RankContext) -> TokenWindows | None:
        self._ensure_prepared(ctx.config)
        if self.eval_corpus is not None:
            return TokenWindows(self.eval_corpus, self.seq_len)
        if self.eval_fraction:
            return TokenWindows(self.corpus, self.seq_len, first=self.num_train)
        return None


def _saved_files(tok: Any) -> dict[str, bytes]:
    """The files ``tok.save_pretrained`` writes, read back (they travel with the recipe)."""
    with tempfile.TemporaryDirectory(prefix="raypod-tok-") as d:
        tok.save_pretrained(d)
        return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}


# ---- building a tokenizer locally ----------------------------------------------------------


def _texts(corpus: str, max_bytes: int) -> list[str]:
    """Documents of a parquet file or folder (``text`` column) or of a text file, up to ``max_bytes``."""
    p = Path(_local(corpus))
    if not p.exists():
        raise ConfigError(f"--corpus '{corpus}' does not exist")
    if p.suffix == ".parquet" or p.is_dir():
        import pyarrow.parquet as pq

        texts = pq.read_table(p, columns=[TEXT_COLUMN]).column(TEXT_COLUMN).to_pylist()
    else:
        texts = p.read_text(encoding="utf-8", errors="replace").split("\n\n")
    out, total = [], 0
    for t in texts:
        if t:
            out.append(t)
            total += len(t)
            if total >= max_bytes:
                break
    return out


def build_tokenizer(corpus: str, vocab_size: int, out: str, max_bytes: int = 4_000_000) -> Any:
    """Train a byte-level BPE tokenizer on ``corpus`` and ``save_pretrained`` it to ``out``.

    Special tokens ``<s>`` (BOS, put before every text), ``</s>`` (EOS) and ``<pad>``; no
    hub access. Returns the ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tf = _transformers()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_texts(corpus, max_bytes), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                      pad_token="<pad>")
    fast.save_pretrained(_local(out))
    return fast


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raypod.recipes.hf",
                                     description="Helpers for the HF recipe (raypod.recipes.hf:HFCausalLM).")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build-tokenizer", help="train a byte-level BPE tokenizer locally (no hub)",
                       description="Train a byte-level BPE tokenizer with `tokenizers` and save_pretrained it.")
    b.add_argument("--corpus", default="~/.cache/raypod/data/stdlib_corpus.parquet",
                   help="parquet (a 'text' column) or a text file; default: the demo corpus, built if missing")
    b.add_argument("--vocab-size", type=int, default=512)
    b.add_argument("--max-bytes", type=int, default=4_000_000, help="train on at most this much text")
    b.add_argument("--out", required=True, help="folder to write (tokenizer.json, tokenizer_config.json, ...)")
    args = parser.parse_args(argv)
    try:
        if args.corpus == b.get_default("corpus") and not Path(_local(args.corpus)).exists():
            build_stdlib_corpus(_local(args.corpus))
        tok = build_tokenizer(args.corpus, args.vocab_size, args.out, args.max_bytes)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote a BPE tokenizer of {len(tok)} tokens to {_local(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
