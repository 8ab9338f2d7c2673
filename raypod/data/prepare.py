"""Turning a user's parquet into training tokens: checks before Ray, tokenising in Ray Data.

Two steps, both on the driver before any worker starts:

1. :func:`check_parquet` (pyarrow only, before Ray starts) refuses bad data in one
   sentence: a missing path, a file that is not parquet (also inside a folder), a
   missing or non-text column, no rows.
2. :func:`prepare_tokens` runs a Ray Data pipeline, ``read_parquet → map_batches``,
   that tokenises every document in Ray Data tasks (off the training ranks) and
   streams the token runs back in document order (``preserve_order``); the driver
   appends them to one flat token file. Packing into fixed-length sequences is then
   pure arithmetic on that file (sample ``i`` is ``tokens[i*L : i*L + L + 1]``) and is
   done per step by the ranks' Ray Data streams (:mod:`raypod.data.stream`).

Why one ordered token file rather than packed rows written by the tasks: packing needs
the ordered stream of tokens so that a sample id means the same tokens however Ray
Data happened to split the input into blocks (which depends on the cluster), and so
that no tokens are lost at block edges. The costly part, tokenising, stays parallel;
the driver only concatenates bytes. The flat file also gives every sample a byte range,
so any rank reads any sample by id without an index (memory-mapped when local).

The result is cached under ``<cache root>/tokens-<fingerprint>/`` (the job's root, which
every rank reads): the fingerprint covers the files (names, sizes, modification times),
the column and the tokenizer, so a resubmission or a restart on the same storage reuses
it. The driver also keeps every entry in a per-user cache (``~/.cache/raypod/tokens``,
``$RAYPOD_TOKEN_CACHE``) and publishes it from there into a new job's root, so a job of
another name or storage over the same data does not tokenise again. An entry is
committed by its ``manifest.json``, written last, and verified (size and SHA-256) before
it is reused: see :mod:`raypod.data.token_cache`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raypod.config import ConfigError, JobConfig
from raypod.data import token_cache
from raypod.storage import arrow_fs, get_fs, join_uri, resolve_storage

log = logging.getLogger("raypod.data")

TOKENIZER = "utf8-bytes/v1"
"""Name of the default tokenizer: UTF-8 bytes (vocabulary 256), documents separated by a blank line."""
DOC_SEPARATOR = b"\n\n"


class TextTokenizer(Protocol):
    """What :func:`prepare_tokens` tokenises with; picklable (it travels to Ray Data tasks)."""

    name: str
    """Identity of the tokenizer (part of the cache key): the same name must mean the same tokens."""
    dtype: str
    """numpy dtype of one token in the token file."""

    def encode_docs(self, texts: list[str]) -> bytes:
        """The tokens of ``texts`` (documents, in order, each followed by its separator), as
        the raw bytes of a ``dtype`` array."""
        ...


class ByteTokenizer:
    """The GPT recipe's tokenizer, :data:`TOKENIZER`: UTF-8 bytes (vocabulary 256), a blank
    line after each document."""

    name = TOKENIZER
    dtype = "uint8"
    vocab_size = 256

    def encode_docs(self, texts: list[str]) -> bytes:
        return b"".join(t.encode("utf-8") + DOC_SEPARATOR for t in texts if t)

DATA_TASK_CPUS = 0.25
"""Logical CPUs each Ray Data task asks for. Small, so data tasks fit beside the ranks
(which hold whole CPUs); the local Ray of :func:`raypod.api.connect_ray` keeps one
logical CPU spare for them."""


@dataclass(frozen=True)
class ParquetSource:
    """A checked parquet dataset: its files (sorted) and their total rows."""

    path: str
    files: tuple[str, ...]
    """Paths inside ``filesystem`` (no scheme)."""
    uri_prefix: str
    """What to put before a file path to make a URI Ray Data reads (``""`` for local files)."""
    rows: int
    fingerprint: str


def check_parquet(path: str, columns: list[str], tokenizer: str = TOKENIZER) -> ParquetSource:
    """Check that ``path`` is parquet with the text ``columns``, or raise one sentence.

    Reads only the listing and the parquet footers, so it is quick and needs no Ray. The
    source's fingerprint covers the files, the columns and the ``tokenizer``'s name.

    Raises:
        ConfigError: the path is missing or empty, a file is not parquet, a column is
            missing or not text, or there are no rows.
    """
    try:
        fs, inner, prefix = arrow_fs(path)
        info = fs.get_file_info(inner)
    except (pa.ArrowInvalid, OSError, ValueError) as e:
        raise ConfigError(f"data.path '{path}' cannot be opened: {str(e).splitlines()[0]}") from None
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"data.path '{path}' does not exist")
    if info.type == pafs.FileType.Directory:
        entries = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
        infos = sorted((e for e in entries if e.type == pafs.FileType.File
                        and not any(part.startswith((".", "_"))
                                    for part in posixpath.relpath(e.path, inner).split("/"))),
                       key=lambda e: e.path)
        if not infos:
            raise ConfigError(f"data.path '{path}' is an empty folder (no parquet files)")
    else:
        infos = [info]
    rows = 0
    h = hashlib.sha256(f"{tokenizer}|{','.join(columns)}".encode())
    for f in infos:
        name = f.path if len(infos) == 1 else posixpath.relpath(f.path, inner)
        try:
            with fs.open_input_file(f.path) as fh:
                meta = pq.ParquetFile(fh).metadata
                schema = meta.schema.to_arrow_schema()
        except (pa.ArrowInvalid, OSError):
            where = f"data.path '{path}'" if len(infos) == 1 else f"data.path '{path}': '{name}'"
            raise ConfigError(f"{where} is not a parquet file") from None
        for col in columns:
            if col not in schema.names:
                raise ConfigError(f"data.path '{path}': '{os.path.basename(name)}' has no '{col}' column "
                                  f"(its columns: {', '.join(schema.names) or 'none'})")
            typ = schema.field(col).type
            if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
                raise ConfigError(f"data.path '{path}': column '{col}' of '{os.path.basename(name)}' is "
                                  f"{typ}, not text")
        rows += meta.num_rows
        mtime = f.mtime_ns if f.mtime_ns is not None else 0
        h.update(f"|{name}|{f.size}|{mtime}".encode())
    if rows == 0:
        raise ConfigError(f"data.path '{path}' is empty (0 rows)")
    return ParquetSource(path=path, files=tuple(f.path for f in infos), uri_prefix=prefix, rows=rows,
                         fingerprint=h.hexdigest()[:20])


@dataclass(frozen=True)
class TokenCorpus:
    """A prepared, flat token file: what every rank reads samples from.

    Attributes:
        uri: the token file (local path or URI).
        num_tokens: tokens in it.
        dtype: numpy dtype of one token.
        fingerprint: of the source it was made from.
    """

    uri: str
    num_tokens: int
    dtype: str
    fingerprint: str

    def num_samples(self, seq_len: int) -> int:
        """Fixed-length samples of ``seq_len`` inputs (+1 shifted target) the tokens hold."""
        return max(0, (self.num_tokens - 1) // seq_len)


def _tokenize(batch: pa.Table, column: str, tokenizer: TextTokenizer | None = None) -> dict[str, Any]:
    """Ray Data task: the batch's documents tokenised, each followed by its separator.

    Returns one row per batch (the concatenated tokens as bytes), so the driver receives
    few, large rows.
    """
    texts = batch.column(column).to_pylist()
    data = (tokenizer or ByteTokenizer()).encode_docs(texts)
    return {"tokens": np.array([data], dtype=object), "docs": np.array([len(texts)])}


def _corpus(entry: dict[str, Any], fingerprint: str) -> TokenCorpus:
    return TokenCorpus(uri=entry["uri"], num_tokens=int(entry["num_tokens"]), dtype=entry["dtype"],
                       fingerprint=fingerprint)


def find_tokens(cache_root: str, fingerprint: str) -> TokenCorpus | None:
    """The committed cache entry for ``fingerprint`` under ``cache_root``, if there is one
    and its token file is still the one written (size and SHA-256; else a warning)."""
    entry = token_cache.read_entry(cache_root, fingerprint)
    return None if entry is None else _corpus(entry, fingerprint)


def prepare_tokens(source: ParquetSource, column: str, cache_root: str,
                   tokenizer: TextTokenizer | None = None, user_cache: str | None = "auto") -> TokenCorpus:
    """Tokenise ``source`` with Ray Data into a cached token file (reused when present).

    Needs a connected Ray. Runs ``read_parquet`` and the tokenising ``map_batches`` as
    Ray Data tasks of :data:`DATA_TASK_CPUS` CPUs each. ``tokenizer`` defaults to
    :class:`ByteTokenizer`; ``source`` must have been checked with its name
    (``check_parquet(..., tokenizer=tokenizer.name)``), which keys the cache.

    The ranks read the entry under ``cache_root``. When it has none, the per-user cache
    ``user_cache`` (``"auto"``: :func:`raypod.data.token_cache.user_token_cache`; None: none)
    is looked in first, and what is tokenised is written there, then published into
    ``cache_root``: any later job over the same data and tokenizer, whatever its name or
    storage, skips tokenising.

    Raises:
        ConfigError: the text holds no tokens at all.
    """
    tokenizer = tokenizer or ByteTokenizer()
    fp = source.fingerprint
    found = find_tokens(cache_root, fp)
    if found is not None:
        log.info("data: reusing %s (%d tokens)", found.uri, found.num_tokens)
        return found
    user = token_cache.user_token_cache() if user_cache == "auto" else user_cache
    if user and resolve_storage(user).rstrip("/") != cache_root.rstrip("/"):
        try:
            entry = token_cache.read_entry(user, fp)
            if entry is not None:
                log.info("data: reusing %s (%d tokens) from the user's token cache", entry["uri"],
                         entry["num_tokens"])
            else:
                entry = _tokenize_into(source, column, user, tokenizer)
        except OSError as e:  # a read-only or full home: tokenise into the job's cache alone
            log.warning("data: the user's token cache %s cannot be used (%s); tokenising into %s",
                        user, e, cache_root)
        else:
            return _corpus(token_cache.publish(entry, cache_root, fp), fp)
    return _corpus(_tokenize_into(source, column, cache_root, tokenizer), fp)


def _tokenize_into(source: ParquetSource, column: str, root: str, tokenizer: TextTokenizer) -> dict[str, Any]:
    """Tokenise ``source`` with Ray Data into a new entry under ``root``; its committed manifest.

    The token file gets a name of its own and the manifest is written last, so a second job
    writing the same entry at the same time corrupts neither; on failure only what this call
    made is removed.
    """
    import ray.data

    itemsize = np.dtype(tokenizer.dtype).itemsize
    t0 = time.perf_counter()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ds = ray.data.read_parquet([source.uri_prefix + f for f in source.files], columns=[column],
                               file_extensions=None, num_cpus=DATA_TASK_CPUS)
    ds = ds.map_batches(_tokenize, fn_kwargs={"column": column, "tokenizer": tokenizer},
                        batch_format="pyarrow", batch_size=4096, num_cpus=DATA_TASK_CPUS)
    name = token_cache.new_file_name(tokenizer.dtype)
    fs, inner = get_fs(token_cache.entry_dir(root, source.fingerprint) + "/" + name)
    _, root_inner = get_fs(root)
    created = [p for p in (root_inner, posixpath.dirname(inner)) if not fs.exists(p)]
    fs.makedirs(posixpath.dirname(inner), exist_ok=True)
    docs = 0
    try:
        with fs.open(inner, "wb") as f:
            out = token_cache.DigestWriter(f)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                for data, n in zip(batch["tokens"], batch["docs"], strict=True):
                    out.write(data)
                    docs += int(n)
        if out.size == 0:
            raise ConfigError(f"data.path '{source.path}' holds no text to train on (0 tokens)")
    except BaseException:
        token_cache.remove_quietly(fs, inner)
        token_cache.remove_empty_dirs(fs, created)  # leave storage as it was
        raise
    total = out.size // itemsize
    entry = token_cache.commit(root, source.fingerprint, {
        "fingerprint": source.fingerprint, "file": name, "num_tokens": total, "dtype": tokenizer.dtype,
        "bytes": out.size, "sha256": out.sha256, "tokenizer": tokenizer.name, "source": source.path,
        "documents": docs, "prepare_s": round(time.perf_counter() - t0, 3)})
    log.info("data: tokenised %d documents into %d tokens in %.1f s", docs, total, time.perf_counter() - t0)
    return entry


def token_cache_root(cache_dir: str | None, config: JobConfig) -> str:
    """Where a recipe's token caches live: ``cache_dir``, else ``<checkpoint.storage>/.raypod_data``."""
    if cache_dir:
        return resolve_storage(cache_dir)
    return join_uri(resolve_storage(config.checkpoint.storage), ".raypod_data")
