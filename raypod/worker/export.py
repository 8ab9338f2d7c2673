"""The final model out of a rank group: its digest, the consolidated state dict, the recipe's format.

:func:`state_digest` gathers the full model and optimizer state (a collective: every rank
calls it) and, on rank 0, hashes it (independent of the world size: how the outside checks
compare two runs) and writes the exports the job asked for.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from raypod.recipe import Recipe

log = logging.getLogger("raypod.worker")


def export_model(state_dict: dict[str, Any], path: str) -> None:
    """Write a consolidated state dict so that it appears whole or not at all."""
    import io

    from raypod.storage import get_fs

    buf = io.BytesIO()
    torch.save(state_dict, buf)
    fs, p = get_fs(path)
    tmp = f"{p}.tmp-{os.getpid()}"
    fs.makedirs(os.path.dirname(p), exist_ok=True)
    try:
        fs.pipe_file(tmp, buf.getvalue())
        fs.mv(tmp, p)
    except BaseException:
        try:  # nothing half-written stays behind
            fs.rm(tmp)
        except (OSError, FileNotFoundError):
            pass
        raise


def export_pretrained(recipe: Recipe, state_dict: dict[str, Any], dest: str) -> bool:
    """Have ``recipe`` write its own format of the final model into a local folder and publish
    it at ``dest`` (a local path or URI) whole: written aside, then moved into place."""
    import shutil
    import tempfile

    from raypod.storage import get_fs

    with tempfile.TemporaryDirectory(prefix="raypod-export-") as tmp:
        if not recipe.export_pretrained(state_dict, tmp):
            return False
        fs, p = get_fs(dest)
        aside = f"{p.rstrip('/')}.tmp-{os.getpid()}"
        if fs.exists(aside):
            fs.rm(aside, recursive=True)
        fs.makedirs(os.path.dirname(p.rstrip("/")), exist_ok=True)
        if "://" not in dest or dest.startswith("file://"):
            shutil.copytree(tmp, aside)
            if os.path.exists(p):
                shutil.rmtree(p)
            os.replace(aside, p)
        else:
            fs.put(tmp.rstrip("/") + "/", p.rstrip("/") + "/", recursive=True)
    log.info("[rank 0] %s wrote %s", type(recipe).__name__, dest)
    return True


def state_digest(model: Any, optimizer: Any, rank: int, recipe: Recipe, storage: str,
                 export_path: str | None = None, pretrained_dir: str | None = None) -> str | None:
    """SHA-256 of the full model and optimizer state (rank 0), independent of world size.

    With ``export_path``, rank 0 also writes the consolidated model state dict there
    (plain ``torch.save``; loads without raypod). With ``pretrained_dir``, rank 0 also
    has the recipe write its own format there (:meth:`Recipe.export_pretrained`).
    ``storage`` is ``checkpoint.storage``, named when a write there fails for good.
    """
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, optimizer, options=opts)
    if rank != 0:
        return None
    if export_path:
        try:
            export_model(msd, export_path)
        except OSError as e:
            from raypod.storage import storage_error

            err = storage_error(e, storage, f"writing {export_path}")
            if err is not None:
                raise err from None
            raise
    if pretrained_dir:
        export_pretrained(recipe, msd, pretrained_dir)
    return _digest(msd, osd)


def _digest(msd: dict[str, Any], osd: dict[str, Any]) -> str:
    """SHA-256 over every model and optimizer entry, in a fixed (sorted) order."""
    h = hashlib.sha256()

    def feed(key: str, value: Any) -> None:
        h.update(key.encode())
        if isinstance(value, torch.Tensor):
            v = value.detach().cpu().contiguous()
            h.update(f"{v.dtype}{tuple(v.shape)}".encode())
            h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
        else:
            h.update(repr(value).encode())

    for k in sorted(msd):
        feed(f"model.{k}", msd[k])
    for fqn in sorted(osd.get("state", {})):
        for k in sorted(osd["state"][fqn]):
            feed(f"optim.{fqn}.{k}", osd["state"][fqn][k])
    for i, g in enumerate(osd.get("param_groups", [])):
        for k in sorted(g):
            feed(f"group{i}.{k}", g[k])
    return h.hexdigest()
