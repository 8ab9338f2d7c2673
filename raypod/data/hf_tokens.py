"""A HuggingFace fast tokenizer as a :class:`raypod.data.prepare.TextTokenizer`.

The Ray Data tasks of :func:`raypod.data.prepare.prepare_tokens` tokenise with the
tokenizer's Rust backend (``tokenizers.Tokenizer.encode_batch``, the same call a
``PreTrainedTokenizerFast`` makes for ``tokenizer(texts)``), each document followed by the
end-of-sequence token when the tokenizer has one. The object that travels to the tasks
holds the backend's JSON, not a live tokenizer, and each task process builds it once.
Only ``tokenizers`` is needed in the tasks (no torch, no transformers).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np


@functools.lru_cache(maxsize=4)
def _backend(spec: str) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(spec)


@dataclass(frozen=True)
class HFTokenizer:
    """Tokenises documents as a HuggingFace fast tokenizer does, an EOS after each.

    Attributes:
        spec: the backend tokenizer's JSON (``tokenizer.json``; ``backend_tokenizer.to_str()``).
        eos_id: appended after every document (``None``: nothing between documents).
        vocab_size: tokens in the vocabulary, special tokens included.
        add_special_tokens: as ``tokenizer(text, add_special_tokens=...)`` (BOS and the like).
    """

    spec: str
    eos_id: int | None
    vocab_size: int
    add_special_tokens: bool = True

    @classmethod
    def from_pretrained(cls, tokenizer: Any, add_special_tokens: bool = True) -> HFTokenizer:
        """From a loaded ``PreTrainedTokenizerFast``."""
        return cls(spec=tokenizer.backend_tokenizer.to_str(), eos_id=tokenizer.eos_token_id,
                   vocab_size=len(tokenizer), add_special_tokens=add_special_tokens)

    @functools.cached_property
    def name(self) -> str:
        """``hf-<digest>``: of the tokenizer's JSON, its EOS and special-token use (the cache key)."""
        h = hashlib.sha256(self.spec.encode())
        h.update(f"|eos={self.eos_id}|special={self.add_special_tokens}".encode())
        return f"hf-{h.hexdigest()[:16]}"

    @property
    def dtype(self) -> str:
        return "uint16" if self.vocab_size <= 2**16 else "uint32"

    def encode(self, texts: list[str]) -> list[list[int]]:
        """The token ids of each text, as ``tokenizer(texts)["input_ids"]``."""
        encs = _backend(self.spec).encode_batch(texts, add_special_tokens=self.add_special_tokens)
        return [e.ids for e in encs]

    def encode_docs(self, texts: list[str]) -> bytes:
        docs = [t for t in texts if t]
        if not docs:
            return b""
        ids = self.encode(docs)
        tail = [self.eos_id] if self.eos_id is not None else []
        n = sum(len(x) for x in ids) + len(tail) * len(ids)
        flat = np.fromiter(itertools.chain.from_iterable(x + tail for x in ids), dtype=self.dtype, count=n)
        return flat.tobytes()
