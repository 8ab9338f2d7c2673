"""The demo recipe: a GPT language model on the standard library's source code."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raypod.config import JobConfig
from raypod.data.corpus import ByteTokenSamples, build_stdlib_corpus
from raypod.models.gpt import GPT, GPTConfig
from raypod.recipe import RankContext, Recipe


class GPTRecipe(Recipe):
    """Next-byte prediction with :class:`raypod.models.gpt.GPT`.

    Args:
        n_layer, n_head, n_embd, seq_len: the model's shape.
        prepare_corpus: build the stdlib corpus at ``data.path`` when it is missing
            (on the driver, and on any node that lacks it).
        corpus_bytes: size of the prepared corpus.
    """

    def __init__(self, n_layer: int = 2, n_head: int = 4, n_embd: int = 128, seq_len: int = 128,
                 prepare_corpus: bool = True, corpus_bytes: int = 8_000_000) -> None:
        self.model_cfg = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, seq_len=seq_len)
        self.prepare_corpus = prepare_corpus
        self.corpus_bytes = corpus_bytes

    def _ensure_corpus(self, path: str) -> None:
        if self.prepare_corpus and "://" not in path and not os.path.exists(os.path.expanduser(path)):
            build_stdlib_corpus(path, self.corpus_bytes)

    def prepare_data(self, config: JobConfig) -> None:
        self._ensure_corpus(config.data.path)
        ByteTokenSamples(config.data.path, self.model_cfg.seq_len)  # refuses bad data now

    def build_model(self, ctx: RankContext) -> nn.Module:
        return GPT(self.model_cfg)

    def build_data(self, ctx: RankContext) -> ByteTokenSamples:
        self._ensure_corpus(ctx.config.data.path)
        return ByteTokenSamples(ctx.config.data.path, self.model_cfg.seq_len)

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        batch = batch.to(device, non_blocking=True)
        x, y = batch[:, :-1], batch[:, 1:]
        logits = model(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    def tokens_per_sample(self) -> int:
        return self.model_cfg.seq_len

    def flops_per_token(self, model: nn.Module) -> float:
        return self.model_cfg.flops_per_token()
