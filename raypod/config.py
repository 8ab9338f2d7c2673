"""Job configuration: one YAML file, ``--set key.path=value`` overrides, validation.

Every section is a pydantic model that refuses unknown keys and wrong types, so a
bad config fails before Ray or any worker starts, with one sentence naming the key
(:class:`ConfigError`).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raypod.storage import join_uri, resolve_storage


class ConfigError(ValueError):
    """A config problem, worded as one sentence that names the key or path at fault."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class RecipeConfig(_Section):
    """Which recipe builds the model, optimizer, data and loss, and its arguments."""

    target: str = "raypod.recipes.gpt:GPTRecipe"
    """Import path ``package.module:ClassName`` of a :class:`raypod.Recipe` subclass."""
    args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments passed to the recipe's constructor."""
    import_dirs: list[str] = Field(default_factory=list)
    """Folders ``recipe.target``'s module is imported from when the Python path lacks it, in
    order; :func:`load_config` adds the config file's folder and the current folder. The
    ranks get the folder it was found in on their ``PYTHONPATH``."""


class ScalingConfig(_Section):
    """How many ranks, and what each one needs."""

    min_workers: int = Field(default=2, ge=1)
    """The job starts (and keeps going) with at least this many ranks."""
    max_workers: int = Field(default=2, ge=1)
    """The job never uses more ranks than this."""
    use_gpu: bool = False
    """One GPU per rank and NCCL; otherwise CPU and gloo."""
    resources_per_worker: dict[str, float] = Field(default_factory=lambda: {"CPU": 1.0})
    """Ray resources reserved for each rank (``GPU`` is added when ``use_gpu``)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement-group strategy for the ranks' bundles."""
    spares: int = Field(default=0, ge=0)
    """Warm spare actors kept ready to replace a lost rank (used by in-process recovery).
    Their slots are reserved with the ranks'; the actors start once the group has
    completed its first step, so that they never slow the job's start down."""
    schedule_timeout_s: float = Field(default=120.0, gt=0)
    """How long to wait for ``min_workers`` ranks to be placeable before failing."""


class ParallelConfig(_Section):
    """How the model is spread over the ranks."""

    strategy: Literal["fsdp", "hsdp", "ddp"] = "fsdp"
    """``fsdp``: FSDP2 ``fully_shard`` per block; ``hsdp``: FSDP2 on a 2-D mesh; ``ddp``."""
    replicas: int = Field(default=1, ge=1)
    """HSDP replica groups (the mesh is ``replicas x world/replicas``)."""
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    """``auto`` is bf16 on GPU and fp32 on CPU."""
    compile: bool = False
    """``torch.compile`` each shard unit (transformer block) before it is sharded, as
    torchtitan does: fused kernels for the elementwise work, the same numerics."""


class TrainConfig(_Section):
    """The optimisation loop."""

    max_steps: int = Field(default=100, ge=1)
    """Optimizer steps to train for (the job's last step number)."""
    global_batch: int = Field(default=16, ge=1)
    """Samples per optimizer step, whatever the world size (gradient accumulation adjusts)."""
    micro_batch: int = Field(default=4, ge=1)
    """Samples per forward/backward on one rank."""
    lr: float = Field(default=3e-3, gt=0)
    """Peak learning rate."""
    warmup_steps: int = Field(default=10, ge=0)
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """The cosine decay ends at ``lr * min_lr_ratio`` on ``max_steps``."""
    weight_decay: float = Field(default=0.1, ge=0)
    grad_clip: float = Field(default=1.0, ge=0)
    """Clip the global gradient norm to this (0 turns clipping off)."""
    seed: int = 0
    """Seeds model init and the data order."""
    log_every_s: float = Field(default=5.0, gt=0)
    """Seconds between progress lines when the output is not a terminal."""
    eval_every_steps: int = Field(default=0, ge=0)
    """Evaluate on the recipe's eval data (``Recipe.build_eval_data``) after every this many
    steps and after the last one, logged as ``eval_loss`` (and the recipe's eval metrics as
    ``eval_<name>``); 0: never. Evaluation leaves the training state untouched."""
    eval_samples: int = Field(default=256, ge=1)
    """Samples of the eval data each evaluation uses (the first ones; fewer if it holds fewer)."""
    step_window: bool = True
    """How the driver hands out steps. ``true``: one call per rank per window of steps
    (``TrainWorker.train_window``): the rank trains in a loop of its own, streams each
    step's result back, and reads which steps it may run from the job's store, where the
    driver writes one grant per step for all ranks (:mod:`raypod.worker.grants`). ``false``:
    one ``train_step`` call per rank per step."""
    window_agents_from: int = Field(default=64, ge=0)
    """From this many ranks on, a window is opened through the node agents
    (``fault.node_agents``): each node's agent opens its ranks' windows and sends their results
    up as one list per step (``NodeAgent.window``), so the driver makes one call per node to
    open a window and collects one item per node and step. Below it, and with ``0``, the
    driver opens every rank's window itself (one hop less for each result)."""


class DataConfig(_Section):
    """Where the training data lives."""

    path: str = "~/.cache/raypod/data/stdlib_corpus.parquet"
    """A parquet file or folder: a local path or a pyarrow/fsspec URI."""


class CheckpointConfig(_Section):
    """Persistent checkpoints (torch.distributed.checkpoint)."""

    storage: str = "./raypod_runs"
    """Root for everything a job writes: ``<storage>/<name>/``. Local path or URI."""
    every_steps: int = Field(default=50, ge=0)
    """Persistent checkpoint interval in steps (0: only at the end)."""
    keep: int = Field(default=3, ge=1)
    """Committed checkpoints to keep; older ones are deleted."""
    async_save: bool = True
    """Write checkpoints in the background while training goes on."""
    memory_every_steps: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    """In-memory snapshot interval in steps (checkpointless recovery; 0: none). ``auto``:
    every step while a snapshot costs at most ``memory_stall_budget`` of the step time,
    else the shortest interval that keeps it there, and after failures at most Young's
    optimum for the failure rate seen (see :mod:`raypod.policies.cadence`). A lost rank
    replays at most this many steps."""
    memory_stall_budget: float = Field(default=0.01, gt=0, le=1)
    """``auto``: the share of the step time that in-memory snapshots may cost."""
    memory_max_every: int = Field(default=20, ge=1)
    """``auto``: the longest snapshot interval it picks."""
    signing_key_env: str | None = None
    """Name of an environment variable (of the driver) holding a key: each checkpoint's
    manifest is then signed with HMAC-SHA256 over its file digests, and a checkpoint whose
    manifest is unsigned or signed otherwise is not loaded. Unset at start: the job is refused."""


class FaultInjection(_Section):
    """One injected fault: fires once per job when ``rank`` starts ``step``.

    ``kill``: the rank's process dies. ``exception``: the step raises. ``hang``: the
    rank stops making progress (until it is killed). ``slow``: every step of the rank
    takes ``delay_s`` longer from ``step`` on (a straggler). ``nan``: the step's loss
    and gradients become NaN. ``preempt``: the rank's process receives SIGTERM, as a
    preempted or drained node's would. ``freeze``: the rank's process stops (SIGSTOP): its
    sockets stay open and nothing answers, not even its health threads (what a dead NCCL
    peer or a hung kernel looks like). ``freeze_node``: every rank process of the job on
    the rank's node stops at once (the firing rank last).
    """

    step: int = Field(ge=1)
    rank: int = Field(ge=0)
    kind: Literal["kill", "exception", "hang", "slow", "nan", "preempt", "freeze", "freeze_node"]
    delay_s: float = Field(default=1.0, gt=0)
    """``slow`` only: seconds added to each of the rank's steps."""
    at: Literal["step", "forward", "backward", "optimizer", "replica", "join"] = "step"
    """Where in the step it fires: before it (``step``); in the middle of the forward or the
    backward pass, between two sharded blocks, so that its peers are blocked inside an FSDP
    collective with it; just before the optimizer update; during the step's replica round,
    in the exchange thread (``kill`` and ``freeze`` kinds only); or while the rank joins a
    group whose next step is ``step``, before its rendezvous (``join``: the other ranks wait
    for it there)."""

    @model_validator(mode="after")
    def _where(self) -> FaultInjection:
        mid_step = ("kill", "exception", "hang", "freeze", "freeze_node")
        allowed = ("kill", "freeze", "freeze_node") if self.at == "replica" else mid_step
        if self.at != "step" and self.kind not in allowed:
            raise ValueError(f"fault.inject: a {self.kind} fault fires only at: step "
                             f"(at: {self.at} takes {', '.join(allowed)})")
        return self


class FaultConfig(_Section):
    """Failure handling."""

    max_failures: int = Field(default=3, ge=0)
    """Recoveries allowed before the job fails."""
    hang_timeout_s: float = Field(default=300.0, gt=0)
    """No step result from any rank for this long is a hang, whatever the heartbeats say."""
    hang_factor: float = Field(default=10.0, ge=0)
    """Declare a hang sooner: once no rank has finished a step for this many times the
    median of the recent steps (and at least ``hang_min_s``) while the heartbeats show a
    single rank behind all the others inside its training step, or not answering
    (0: only ``hang_timeout_s``). A wait that every rank shares, such as a slow save or
    a first compile, blames no rank and is left to ``hang_timeout_s``."""
    hang_min_s: float = Field(default=5.0, gt=0)
    """The shortest stall that ``hang_factor`` declares a hang."""
    pg_timeout_s: float = Field(default=300.0, gt=0)
    """Timeout of the torch process group's collectives (never torch's 30-minute default)."""
    heartbeat_s: float = Field(default=1.0, gt=0)
    """How often the driver asks every rank where it is (step and phase) and checks
    for draining nodes; a rank that does not answer within this is unresponsive."""
    silent_s: float = Field(default=1.0, ge=0)
    """A rank that has not answered the driver's liveness probe (a ping on a thread of its
    own, sent every quarter of this, answered within milliseconds even mid-step) for this
    many seconds is lost: frozen, or its node cut off. It is killed and the job recovers
    at once, at any moment of training, without waiting for the hang rules (0: off; a slow
    rank that still answers is left to ``hang_factor`` and ``straggler_factor``)."""
    node_agents: bool = True
    """Ping the ranks for ``silent_s`` from an agent on each node (one light actor, no CPU
    reserved), which answers the driver for all its node's ranks at once: the driver's cost
    per probe round is one call per node instead of one per rank (at 10,000 ranks the
    per-rank round outlasts ``silent_s``). A node whose agent has not answered yet is pinged
    rank by rank. False: the driver pings every rank itself."""
    agent_zones_from: int = Field(default=64, ge=1)
    """With more nodes than this, the driver asks one node agent per zone of about
    sqrt(nodes) agents, which gathers its zone's replies (a second tier: ~35 calls per probe
    round at 1,250 nodes instead of 1,250, whose round would outlast ``silent_s``)."""
    straggler_factor: float = Field(default=2.0, ge=0)
    """A rank whose own compute time per step (step time minus time spent waiting for
    the others) exceeds this many times the median of the other ranks' is slow (0: off)."""
    straggler_steps: int = Field(default=5, ge=1)
    """Consecutive slow steps before a rank is reported as a straggler."""
    replace_stragglers: bool = False
    """Replace a reported straggler (spare first) with no lost steps, instead of only reporting it."""
    loss_spike_factor: float = Field(default=0.0, ge=0)
    """A step whose loss exceeds this many times the running median of recent losses is
    rolled back and its batch skipped, like a NaN loss (0: only NaN/inf losses)."""
    max_bad_steps: int = Field(default=3, ge=0)
    """Batches that may be skipped for a NaN, infinite or spiking loss before the job fails."""
    throughput_alert_ratio: float = Field(default=0.25, ge=0, lt=1)
    """Raise a ``throughput_collapse`` alert event when the median throughput of the last
    few steps falls below this fraction of the job's running median (0: off)."""
    inject: list[FaultInjection] = Field(default_factory=list)
    """Faults to inject, for demos, tests and chaos runs."""
    max_node_failures: int = Field(default=2, ge=1)
    """A node that lost ranks this many times is not used again by the job."""
    lease_ttl_s: float = Field(default=30.0, ge=2)
    """The job's owner lease (``<job_dir>/lease/``) lasts this long without renewal; the
    driver renews it every quarter of it. A second driver of the same job is refused while
    it lasts; a dead driver's lease is taken over at once on its own host, else after it."""


class DoctorConfig(_Section):
    """Pre-flight health checks (``raypod doctor``, and before every job)."""

    enabled: bool = True
    """Check every rank's node when a group is placed; a failing node is excluded."""
    allreduce_mb: float = Field(default=4.0, gt=0)
    """Size of the all-reduce that measures the group's bandwidth."""
    min_allreduce_mb_s: float = Field(default=0.0, ge=0)
    """Fail the all-reduce check below this bus bandwidth in MB/s (0: only measure it)."""


class MLflowConfig(_Section):
    """Experiment tracking."""

    enabled: bool = True
    tracking_uri: str | None = None
    """Tracking server or store; default: ``MLFLOW_TRACKING_URI`` or a SQLite store under the job."""
    experiment: str = "raypod"
    run_name: str | None = None
    """Defaults to the job's ``name``."""
    log_model: bool = True
    """Log the final model as an MLflow model (transformers flavour for HF recipes, else pytorch)."""
    registered_model: str | None = Field(default=None, min_length=1)
    """Register the logged model under this name in the model registry (a new version per job end)."""


class JobConfig(_Section):
    """A whole raypod job."""

    name: str = Field(default="raypod-job", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    """The job's identity: its storage folder and its MLflow run are keyed by it."""
    recipe: RecipeConfig = Field(default_factory=RecipeConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    fault: FaultConfig = Field(default_factory=FaultConfig)
    doctor: DoctorConfig = Field(default_factory=DoctorConfig)
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)

    @model_validator(mode="after")
    def _check_cross_fields(self) -> JobConfig:
        if self.name.strip(".") == "":  # the pattern keeps '/' out; '.' and '..' are the other ways out
            raise ValueError(f"name '{self.name}' is not a folder of its own: the job's folder "
                             "<checkpoint.storage>/<name> would be the storage itself or outside it")
        s = self.scaling
        if s.min_workers > s.max_workers:
            raise ValueError(
                f"scaling.min_workers ({s.min_workers}) is larger than "
                f"scaling.max_workers ({s.max_workers})"
            )
        if self.parallel.strategy == "hsdp" and s.min_workers % self.parallel.replicas:
            raise ValueError(
                f"parallel.replicas ({self.parallel.replicas}) must divide "
                f"scaling.min_workers ({s.min_workers}) for hsdp"
            )
        for key in ("straggler_factor", "loss_spike_factor"):
            value = getattr(self.fault, key)
            if 0 < value <= 1:
                raise ValueError(f"fault.{key} ({value}) must be 0 (off) or larger than 1")
        for i, f in enumerate(self.fault.inject):
            if f.rank >= s.max_workers:
                raise ValueError(
                    f"fault.inject[{i}].rank ({f.rank}) is not a rank of a job with at most "
                    f"{s.max_workers} workers"
                )
        return self

    # ---- derived paths -------------------------------------------------------------
    @property
    def job_dir(self) -> str:
        """``<checkpoint.storage>/<name>``: a local absolute path or a URI."""
        return join_uri(resolve_storage(self.checkpoint.storage), self.name)

    def flat(self) -> dict[str, Any]:
        """The config as ``{"section.key": value}``, for MLflow params."""
        return flatten(self.model_dump(mode="json"))


# ---- helpers -------------------------------------------------------------------------


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into dotted keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one ``key.path=value`` override in place; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"--set '{override}' is not of the form key.path=value")
    path, _, text = override.partition("=")
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set '{override}' names no key")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {path}: the value '{text}' is not valid YAML ({e.problem})") from None
    node = raw
    for i, k in enumerate(keys[:-1]):
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {path}: '{'.'.join(keys[: i + 1])}' is not a section")
        node = nxt
    node[keys[-1]] = value


def _describe(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in e["loc"])
    loc = loc.replace(".[", "[")
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        return f"config key '{loc}' is not known (check its spelling and section)"
    if e["type"] == "value_error" and not loc:
        return msg.removeprefix("Value error, ")
    got = e.get("input")
    shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
    return f"config key '{loc}': {msg[0].lower() + msg[1:]}{shown}"


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                raw: dict[str, Any] | None = None) -> JobConfig:
    """Read a YAML config, apply overrides, validate it and check its recipe imports.

    Raises:
        ConfigError: one sentence naming the file, key or recipe at fault.
    """
    data: dict[str, Any] = copy.deepcopy(raw) if raw else {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}".split("\n")[0]) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections")
        data.update(loaded)
    for ov in overrides or []:
        apply_override(data, ov)
    recipe = data.get("recipe")
    if recipe is None or isinstance(recipe, dict):  # anything else is refused by validation below
        recipe = data["recipe"] = dict(recipe or {})
        dirs = recipe.get("import_dirs")
        if dirs is None or isinstance(dirs, list):
            here = [str(Path(path).resolve().parent)] if path is not None else []
            extra = [d for d in [*here, os.getcwd()] if d not in (dirs or [])]
            recipe["import_dirs"] = [*(dirs or []), *extra]
    try:
        cfg = JobConfig.model_validate(data)
    except ValidationError as e:
        where = f" in '{path}'" if path else ""
        raise ConfigError(_describe(e) + where) from None
    check_recipe(cfg)
    return cfg


_FOUND_IN: dict[str, str] = {}
"""Top-level module -> the ``recipe.import_dirs`` folder it was imported from (this process)."""


def import_target(target: str, dirs: list[str] | tuple[str, ...] = ()) -> Any:
    """Import ``package.module:Name`` (or ``package.module.Name``).

    The module is looked up on the Python path first, then in ``dirs`` (in order): a
    ``my_recipe.py`` beside the config file or in the current folder imports without
    ``PYTHONPATH``. The folder it came from is remembered for the ranks
    (:func:`recipe_pythonpath`).
    """
    mod_name, sep, attr = target.partition(":")
    if not sep:
        mod_name, _, attr = target.rpartition(".")
    if not mod_name or not attr:
        raise ConfigError(f"recipe.target '{target}' is not an import path like 'pkg.module:Class'")
    top = mod_name.split(".")[0]
    try:
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            where = [str(Path(d).expanduser().resolve()) for d in dirs]
            home = next((d for d in where if (Path(d) / f"{top}.py").is_file()
                         or (Path(d) / top).is_dir()), None)
            if e.name != top or home is None:
                raise
            if home not in sys.path:
                sys.path.append(home)
            module = importlib.import_module(mod_name)
            _FOUND_IN[top] = home
    except Exception as e:  # noqa: BLE001 - any import failure is the user's recipe
        looked = f" (looked on the Python path and in {', '.join(dirs)})" if dirs else ""
        raise ConfigError(f"recipe.target '{target}' cannot be imported: {type(e).__name__}: {e}"
                          f"{looked}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"recipe.target '{target}': module '{mod_name}' has no '{attr}'") from None


def check_recipe(cfg: JobConfig) -> None:
    """Check that the recipe imports, is a Recipe, and accepts ``recipe.args``."""
    from raypod.recipe import Recipe

    cls = import_target(cfg.recipe.target, cfg.recipe.import_dirs)
    if not (inspect.isclass(cls) and issubclass(cls, Recipe)):
        raise ConfigError(f"recipe.target '{cfg.recipe.target}' is not a raypod.Recipe subclass")
    try:
        inspect.signature(cls).bind(**cfg.recipe.args)
    except TypeError as e:
        raise ConfigError(f"recipe.args do not fit {cls.__name__}: {e}") from None


def recipe_pythonpath(cfg: JobConfig) -> list[str]:
    """The folders the ranks need on ``PYTHONPATH`` to import ``recipe.target`` (and so to
    unpickle the recipe): the ``recipe.import_dirs`` folder this process imported it from,
    if it was not on the Python path."""
    mod_name = cfg.recipe.target.partition(":")[0] if ":" in cfg.recipe.target \
        else cfg.recipe.target.rpartition(".")[0]
    home = _FOUND_IN.get(mod_name.split(".")[0])
    return [home] if home else []
