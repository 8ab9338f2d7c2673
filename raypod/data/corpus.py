"""The demo corpus: the Python standard library's own source files, as parquet.

Every machine with Python has it, so the demo needs no download. Text is tokenised
as UTF-8 bytes (vocabulary 256) and packed into fixed-length samples.
"""

from __future__ import annotations

import os
import sysconfig
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raypod.config import ConfigError

TEXT_COLUMN = "text"


def ensure_demo_corpus(path: str, demo_corpus: str | None, max_bytes: int = 8_000_000) -> None:
    """Build the demo corpus at ``path`` when it is missing and is the recipe's ``demo_corpus``.

    Any other missing local path is refused: a typo in ``data.path`` never trains on the demo data.

    Raises:
        ConfigError: ``path`` does not exist and is not ``recipe.args.demo_corpus``.
    """
    if "://" in path or os.path.exists(os.path.expanduser(path)) or not demo_corpus:
        return
    local = os.path.abspath(os.path.expanduser(path))
    if local != os.path.abspath(os.path.expanduser(demo_corpus)):
        raise ConfigError(f"data.path '{path}' does not exist (the demo corpus is only built at "
                          f"recipe.args.demo_corpus '{demo_corpus}')")
    build_stdlib_corpus(path, max_bytes)


def build_stdlib_corpus(path: str, max_bytes: int = 8_000_000) -> int:
    """Write the standard library's ``.py`` files (sorted, up to ``max_bytes``) to parquet.

    The file appears atomically (written aside, then renamed). Returns the rows written.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    paths, texts, total = [], [], 0
    for f in sorted(root.rglob("*.py")):
        if "site-packages" in f.parts or "test" in f.parts or "tests" in f.parts:
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        paths.append(str(f.relative_to(root)))
        texts.append(text)
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    table = pa.table({"path": paths, TEXT_COLUMN: texts})
    out = Path(os.path.expanduser(path))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, out)
    return len(paths)


def _open_table(path: str) -> pa.Table:
    """Read a parquet file or folder (local path or URI) or raise one clear sentence."""
    import pyarrow.fs as pafs

    try:
        if "://" in path:
            fs, inner = pafs.FileSystem.from_uri(path)
        else:
            fs, inner = pafs.LocalFileSystem(), os.path.expanduser(path)
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise ConfigError(f"data.path '{path}' does not exist")
        return pq.read_table(inner, filesystem=fs, columns=[TEXT_COLUMN])
    except ConfigError:
        raise
    except (pa.ArrowInvalid, OSError) as e:
        msg = str(e).split("\n")[0]
        if "column" in msg.lower() or TEXT_COLUMN in msg:
            raise ConfigError(f"data.path '{path}' has no '{TEXT_COLUMN}' column") from None
        raise ConfigError(f"data.path '{path}' is not readable parquet: {msg}") from None


class ByteTokenSamples:
    """Fixed-length samples of UTF-8 byte tokens, addressable by id.

    Sample ``i`` is ``tokens[i*L : i*L + L + 1]`` (inputs and shifted targets).
    """

    def __init__(self, path: str, seq_len: int) -> None:
        table = _open_table(path)
        col = table.column(TEXT_COLUMN)
        if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
            raise ConfigError(f"data.path '{path}': column '{TEXT_COLUMN}' is not text")
        joined = "\n\n".join(s for s in col.to_pylist() if s)
        self.tokens = np.frombuffer(joined.encode("utf-8"), dtype=np.uint8)
        self.seq_len = seq_len
        self.n = max(0, (len(self.tokens) - 1) // seq_len)
        if self.n == 0:
            raise ConfigError(f"data.path '{path}' holds no text to train on (0 samples)")

    def __len__(self) -> int:
        return self.n

    def get_batch(self, ids: Sequence[int]) -> torch.Tensor:
        """``[len(ids), seq_len + 1]`` int64 tokens."""
        idx = np.asarray(ids, dtype=np.int64)[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        return torch.from_numpy(self.tokens[idx].astype(np.int64))
