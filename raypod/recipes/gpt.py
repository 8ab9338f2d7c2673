"""The demo recipe: a GPT language model on the standard library's source code."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raypod.config import ConfigError, JobConfig
from raypod.data.corpus import TEXT_COLUMN, ensure_demo_corpus
from raypod.data.prepare import TokenCorpus, check_parquet, find_tokens, prepare_tokens, token_cache_root
from raypod.data.stream import TokenWindows
from raypod.models.gpt import GPT, GPTConfig
from raypod.recipe import RankContext, Recipe


class GPTRecipe(Recipe):
    """Next-byte prediction with :class:`raypod.models.gpt.GPT`.

    The data is parquet with a ``text`` column at ``data.path`` (a file or a folder;
    local or any pyarrow/fsspec URI). Ray Data tokenises it once into a cached token
    file (:mod:`raypod.data.prepare`) and streams each rank its fixed-length samples
    (:mod:`raypod.data.stream`).

    Args:
        n_layer, n_head, n_embd, seq_len: the model's shape.
        demo_corpus: the shipped demo configs set this to their ``data.path`` (a local
            path): when ``data.path`` is exactly this path and missing, the Python
            standard library's source is written there as the demo corpus. Any other
            missing ``data.path`` is refused before Ray starts (never silently replaced).
        corpus_bytes: size of the demo corpus.
        cache_dir: where the tokenised data is cached (reachable from every node);
            default ``<checkpoint.storage>/.raypod_data``.
    """

    def __init__(self, n_layer: int = 2, n_head: int = 4, n_embd: int = 128, seq_len: int = 128,
                 demo_corpus: str | None = None, corpus_bytes: int = 8_000_000,
                 cache_dir: str | None = None) -> None:
        self.model_cfg = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, seq_len=seq_len)
        self.demo_corpus = demo_corpus
        self.corpus_bytes = corpus_bytes
        self.cache_dir = cache_dir
        self.corpus: TokenCorpus | None = None
        """Set by :meth:`prepare_data` on the driver; travels to the ranks with the recipe."""

    def _ensure_corpus(self, path: str) -> None:
        ensure_demo_corpus(path, self.demo_corpus, self.corpus_bytes)

    def _cache_root(self, config: JobConfig) -> str:
        return token_cache_root(self.cache_dir, config)

    def check_data(self, config: JobConfig) -> None:
        self._ensure_corpus(config.data.path)
        check_parquet(config.data.path, [TEXT_COLUMN])

    def prepare_data(self, config: JobConfig) -> None:
        source = check_parquet(config.data.path, [TEXT_COLUMN])
        corpus = prepare_tokens(source, TEXT_COLUMN, self._cache_root(config))
        n = corpus.num_samples(self.model_cfg.seq_len)
        if n < config.train.global_batch:
            raise ConfigError(f"data.path '{config.data.path}' gives {n} samples of {self.model_cfg.seq_len} "
                              f"tokens, fewer than train.global_batch ({config.train.global_batch})")
        self.corpus = corpus

    def build_data(self, ctx: RankContext) -> TokenWindows:
        if self.corpus is None:  # a driver that skipped prepare_data: find (or make) the cache
            source = check_parquet(ctx.config.data.path, [TEXT_COLUMN])
            self.corpus = (find_tokens(self._cache_root(ctx.config), source.fingerprint)
                           or prepare_tokens(source, TEXT_COLUMN, self._cache_root(ctx.config)))
        return TokenWindows(self.corpus, self.model_cfg.seq_len)

    def build_model(self, ctx: RankContext) -> nn.Module:
        return GPT(self.model_cfg)

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        batch = batch.to(device, non_blocking=True)
        x, y = batch[:, :-1], batch[:, 1:]
        logits = model(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    def tokens_per_sample(self) -> int:
        return self.model_cfg.seq_len

    def flops_per_token(self, model: nn.Module) -> float:
        return self.model_cfg.flops_per_token()
