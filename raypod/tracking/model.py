"""The job's final model as an MLflow *logged model* (MLflow 3), registered on request.

At the end of a job the MLflow callback's thread calls :func:`log_final_model`. The
flavour follows the recipe's ``mlflow_flavor``:

- ``"transformers"`` (HF recipes): the ``save_pretrained`` folder the driver wrote,
  ``<job_dir>/final_model_hf/`` (model and tokenizer), loaded on the driver's CPU as a
  ``text-generation`` pipeline and logged with ``mlflow.transformers.log_model``.
- ``"pytorch"`` (anything else): the recipe's model built on CPU, the final state dict
  ``<job_dir>/final_model.pt`` loaded into it (``weights_only=True``), logged with
  ``mlflow.pytorch.log_model``.

The logged model is created first (its source run is the job's), the flavour saves into
it, and then it is linked to the run as one of its outputs (so the UI lists it under the
run's and the experiment's *Models*; a model that failed is deleted, not linked): this skips what ``log_model(run_id=...)`` would also do, read the whole history of
every metric of the run to copy the final step's points onto the model, which costs
seconds to minutes on a long run. Pip requirements are given, not inferred (inference
imports the model in a subprocess). With ``mlflow.registered_model`` set, the model
becomes a new version of that registered model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from raypod.callbacks import JobInfo

logger = logging.getLogger("raypod.tracking")

FINAL_MODEL_FILE = "final_model.pt"
"""The consolidated torch state dict the driver leaves in the job folder."""
FINAL_MODEL_HF_DIR = "final_model_hf"
"""The ``save_pretrained`` folder (model and tokenizer) the driver leaves for HF recipes."""
MODEL_NAME = "model"
"""Name of the logged model (and of its folder in the model's artifacts)."""
HF_TASK = "text-generation"


class ModelNotLogged(Exception):
    """The final model could not be logged; the message says why, in one sentence."""


def log_final_model(client: MlflowClient, run_id: str, job: JobInfo, tracking_uri: str,
                    final_step: int | None = None) -> str | None:
    """Log the job's final model into its run (and register it when configured).

    Args:
        client: A client of the run's tracking store.
        run_id: The job's run.
        job: The job (config, folder, start time).
        tracking_uri: The store's URI (the flavours use MLflow's global one, set meanwhile).
        final_step: The job's last step, recorded on the run's model output.

    Returns:
        The logged model's id, or None when this driver left no final model.

    Raises:
        ModelNotLogged: The model exists but could not be built, loaded or logged.
    """
    cfg = job.config
    picked = _source(job)
    if picked is None:
        return None
    flavor, source = picked

    from mlflow.entities import LoggedModelOutput
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    exp_id = client.get_run(run_id).info.experiment_id
    name = cfg.mlflow.registered_model
    with _local(source) as local, _use_tracking_uri(tracking_uri):
        pytorch_model = _build_pytorch_model(job, local) if flavor == "pytorch" else None
        model = client.create_logged_model(
            exp_id, name=MODEL_NAME, source_run_id=run_id,
            params={"recipe.target": cfg.recipe.target, "flavor": flavor},
            tags={"raypod.job_name": cfg.name})
        try:
            _save_flavor(flavor, local, pytorch_model, model.model_id, name)
        except Exception as e:
            with contextlib.suppress(Exception):  # no FAILED model left beside the run
                client.delete_logged_model(model.model_id)
            raise ModelNotLogged(f"logging the final model as an MLflow {flavor} model failed: "
                                 f"{type(e).__name__}: {_first_line(e)}") from e
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=final_step or 0)])
    logger.info("logged the final model as MLflow model %s (%s flavour)%s", model.model_id, flavor,
                f", registered as '{name}'" if name else "")
    return model.model_id


def _source(job: JobInfo) -> tuple[str, str] | None:
    """The flavour to log and where its files are, or None when this driver left no final model.

    Raises:
        ModelNotLogged: An HF recipe left a state dict but no ``save_pretrained`` folder.
    """
    from raypod.config import import_target

    cfg = job.config
    cls = import_target(cfg.recipe.target, cfg.recipe.import_dirs)
    flavor = str(getattr(cls, "mlflow_flavor", "pytorch") or "pytorch")
    hf_dir = _fresh(job, FINAL_MODEL_HF_DIR)
    if flavor == "transformers" and hf_dir is not None:
        return flavor, hf_dir
    if flavor == "transformers":
        sd = _fresh(job, FINAL_MODEL_FILE)
        if sd is None:
            return None
        raise ModelNotLogged(f"recipe.target '{cfg.recipe.target}' logs the transformers flavour but "
                             f"the driver left no {FINAL_MODEL_HF_DIR}/ beside {FINAL_MODEL_FILE}")
    source = _fresh(job, FINAL_MODEL_FILE)
    if source is None:
        return None
    return "pytorch", source


def _save_flavor(flavor: str, local: Path, pytorch_model: Any, model_id: str,
                 registered_name: str | None) -> None:
    """Save the model into the logged model ``model_id`` with its flavour's ``log_model``."""
    if flavor == "transformers":
        import mlflow.transformers

        with _quiet("mlflow.transformers"):  # no model card or licence on the hub: not news
            mlflow.transformers.log_model(
                _hf_pipeline(local), name=MODEL_NAME, task=HF_TASK, model_id=model_id,
                registered_model_name=registered_name,
                pip_requirements=_pins("transformers", "tokenizers", "torch"))
    else:
        import mlflow.pytorch

        with _quiet("mlflow.pytorch"):  # its pickle caution: the README says so once
            mlflow.pytorch.log_model(
                pytorch_model, name=MODEL_NAME, model_id=model_id,
                registered_model_name=registered_name, code_paths=_code_paths(pytorch_model),
                serialization_format="pickle",  # "pt2" needs an input example to trace
                pip_requirements=_pins("torch", "cloudpickle"))


def _fresh(job: JobInfo, name: str) -> str | None:
    """``<job_dir>/<name>`` when it exists and this job wrote it (not an older submission)."""
    import fsspec

    src = f"{job.job_dir.rstrip('/')}/{name}"
    try:
        fs, path = fsspec.core.url_to_fs(src)
        if not fs.exists(path):
            return None
        try:
            info_path = path if not fs.isdir(path) else f"{path.rstrip('/')}/config.json"
            mtime = fs.modified(info_path).timestamp()
        except (NotImplementedError, FileNotFoundError, OSError):
            mtime = None
    except Exception as e:  # noqa: BLE001 - the model is optional
        logger.warning("cannot look at %s: %s", src, e)
        return None
    if mtime is not None and mtime < job.start_time - 5:
        logger.info("%s is older than this job's start; not logging it", src)
        return None
    return src


@contextlib.contextmanager
def _local(src: str) -> Iterator[Path]:
    """A local path for ``src`` (copied to a temporary folder when it is remote)."""
    if "://" not in src or src.startswith("file://"):
        yield Path(src.removeprefix("file://"))
        return
    import fsspec

    fs, path = fsspec.core.url_to_fs(src)
    with tempfile.TemporaryDirectory(prefix="raypod-model-") as tmp:
        dest = Path(tmp) / Path(path.rstrip("/")).name
        fs.get(path, str(dest), recursive=fs.isdir(path))
        yield dest


def _build_pytorch_model(job: JobInfo, state_path: Path) -> Any:
    """The recipe's model, built on CPU, with the final state dict in it."""
    import torch

    from raypod.recipe import RankContext, build_recipe

    try:
        model = build_recipe(job.config).build_model(RankContext(rank=0, world_size=1, device=torch.device("cpu"),
                                               config=job.config))
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except Exception as e:
        raise ModelNotLogged(f"recipe.target '{job.config.recipe.target}' model could not take "
                             f"{FINAL_MODEL_FILE}: {type(e).__name__}: {_first_line(e)}") from e
    return model.eval()


def _hf_pipeline(folder: Path) -> Any:
    """A ``text-generation`` pipeline of the ``save_pretrained`` folder (loaded on CPU).

    MLflow can log a checkpoint folder without loading it (``transformers_model=<path>``),
    but MLflow 3.17 fails on that path with transformers 5 (its task registry names the
    pipeline class as a string), so the model is loaded into the driver's memory once.
    """
    import transformers

    # Its loading and (inside log_model) shard-writing bars are no news on the driver's console.
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return transformers.pipeline(HF_TASK, model=model, tokenizer=tok)


def _code_paths(model: Any) -> list[str] | None:
    """The model class's top module or package when it is the user's own (not installed):
    the pickled model needs it to load."""
    top = type(model).__module__.split(".")[0]
    path = getattr(sys.modules.get(top), "__file__", None)
    if not path or top in ("raypod", "torch", "transformers", "__main__"):
        return None
    if any(part in ("site-packages", "dist-packages") for part in Path(path).parts):
        return None
    return [str(Path(path).parent) if Path(path).name == "__init__.py" else path]


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Only errors from logger ``name`` meanwhile."""
    lg = logging.getLogger(name)
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


def _pins(*packages: str) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for p in packages:
        try:
            out.append(f"{p}=={version(p).split('+')[0]}")  # no local label (+cpu): PyPI has none
        except PackageNotFoundError:
            continue
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


def stage_state_dict(job: JobInfo, dest: Path) -> None:
    """Put ``<job_dir>/final_model.pt`` (if this driver wrote it) at ``dest/state_dict.pt``:
    the plain artifact kept when no MLflow model could be logged."""
    src = _fresh(job, FINAL_MODEL_FILE)
    if src is None:
        return
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / "state_dict.pt"
    try:
        if "://" not in src or src.startswith("file://"):
            path = src.removeprefix("file://")
            try:
                os.link(path, target)  # the spool sits in the job folder: no copy
            except OSError:
                shutil.copy2(path, target)
        else:
            import fsspec

            fs, path = fsspec.core.url_to_fs(src)
            fs.get(path, str(target))
    except Exception as e:  # noqa: BLE001
        logger.warning("cannot stage %s for MLflow: %s", src, e)
        shutil.rmtree(dest, ignore_errors=True)
