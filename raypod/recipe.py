"""The user's side of a job: a recipe supplies model, optimizer, data and loss.

raypod owns the training loop (like torchtitan or Lightning), so it can re-run a
step, snapshot state and re-form the process group. A recipe only builds things.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # torch is imported where it is used, so Ray Data tasks importing raypod stay light
    import torch
    from torch import nn

    from raypod.config import JobConfig

log = logging.getLogger("raypod.recipe")


@dataclass(frozen=True)
class RankContext:
    """What a recipe may need to know about the rank it is building for."""

    rank: int
    world_size: int
    device: torch.device
    config: JobConfig


class SampleSource(Protocol):
    """Map-style data: a fixed number of samples, fetched by id.

    raypod decides which ids each rank consumes at each step (seeded, per epoch), so
    the data position is part of the training state and resumes exactly. A source
    that also has ``stream(rank, world_size, order, first, last)`` (a Ray Data
    dataset of rows ``{step, ids, windows}``) and ``to_batch(windows)``, such as
    :class:`raypod.data.stream.TokenWindows`, is streamed to each rank through Ray
    Data instead (see :mod:`raypod.data.stream`).
    """

    def __len__(self) -> int: ...

    def get_batch(self, ids: Sequence[int]) -> Any:
        """Return the batch made of the samples ``ids`` (on CPU), sliceable along its first axis."""
        ...


class Recipe:
    """Base class for recipes. Subclass it and point ``recipe.target`` at the subclass.

    The constructor receives ``recipe.args`` as keyword arguments.
    """

    def check_data(self, config: JobConfig) -> None:
        """Runs once on the driver before Ray starts: quick checks of ``data.path``.

        Raise :class:`raypod.config.ConfigError` with one sentence for bad data.
        """

    def prepare_data(self, config: JobConfig) -> None:
        """Runs once on the driver, Ray connected, before any worker starts: prepare the data
        (for example tokenise it with Ray Data).

        Raise :class:`raypod.config.ConfigError` with one sentence for bad data.
        """

    def build_model(self, ctx: RankContext) -> nn.Module:
        """Build the full model on CPU (same seed on every rank); raypod shards it."""
        raise NotImplementedError

    shard_root_only: bool = False
    """Set ``True`` to accept FSDP2/HSDP wrapping only the root module (one all-gather of the
    whole model per forward) when :meth:`shard_units` returns nothing; otherwise such a job
    is refused before any worker starts."""

    mlflow_flavor: str = "pytorch"
    """The MLflow model flavour the final model is logged with (``transformers`` for
    recipes whose :meth:`export_pretrained` writes ``save_pretrained`` output)."""

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """The modules FSDP2 wraps one by one (the transformer blocks).

        Default: the repeated blocks found in the model (:func:`repeated_blocks`): every
        outermost ``nn.ModuleList`` whose entries are all of one class (``model.layers``
        of a Llama, ``transformer.h`` of a GPT-2, ``blocks``, ...).
        """
        return repeated_blocks(model)

    def build_optimizer(self, model: nn.Module, ctx: RankContext) -> torch.optim.Optimizer:
        """Default: AdamW with ``train.lr`` and ``train.weight_decay`` (decay on matrices only)."""
        import torch

        t = ctx.config.train
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": t.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        fused = next(model.parameters()).is_cuda  # one kernel for the whole update on GPUs
        return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.95), fused=fused)

    def build_data(self, ctx: RankContext) -> SampleSource:
        """The training samples, addressable by id."""
        raise NotImplementedError

    def build_eval_data(self, ctx: RankContext) -> SampleSource | None:
        """Held-out samples for evaluation every ``train.eval_every_steps`` (default: none).

        Each evaluation runs :meth:`evaluate` on the first ``train.eval_samples`` of them,
        split over the ranks.
        """
        return None

    def loss(self, model: nn.Module, batch: Any,
             device: torch.device) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        """Mean loss over the samples of ``batch`` (move the batch to ``device`` here).

        May return ``(loss, {"name": value, ...})``: extra per-step metrics (scalars or
        0-d tensors, means over the batch), averaged over the step's samples and logged
        beside raypod's own (whose names win a clash).
        """
        raise NotImplementedError

    def evaluate(self, model: nn.Module, batch: Any,
                 device: torch.device) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        """Mean eval loss over ``batch`` (run under ``torch.no_grad`` with the model in eval
        mode). Default: :meth:`loss`. Logged as ``eval_loss``, extra metrics as ``eval_<name>``."""
        return self.loss(model, batch, device)

    def export_pretrained(self, state_dict: dict[str, torch.Tensor], out_dir: str) -> bool:
        """Write the final model in the recipe's own format (e.g. ``save_pretrained``) into the
        local folder ``out_dir`` from its full state dict; return whether anything was written.

        Called on rank 0 at the end of a successful job; raypod publishes the folder as
        ``<job_dir>/final_model_hf/``. Default: nothing (``final_model.pt`` is written anyway).
        """
        return False

    def tokens_per_sample(self) -> int:
        """Tokens in one sample, for tokens/s and MFU (1 for non-language models)."""
        return 1

    def flops_per_token(self, model: nn.Module) -> float:
        """Training FLOPs per token (for MFU); 0 when unknown."""
        return 0.0


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The entries of every outermost ``nn.ModuleList`` whose entries share one class and hold
    parameters: the repeated blocks of a transformer, in module order.

    ``model.layers`` (Llama), ``model.model.layers``, ``transformer.h`` (GPT-2), ``blocks``;
    lists nested inside a found block (the experts of an MoE layer) are not split further.
    """
    from torch import nn

    found: list[nn.Module] = []
    inside: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if (isinstance(mod, nn.ModuleList) and len(mod) > 0
                and len({type(m) for m in mod}) == 1
                and next(mod.parameters(), None) is not None):
            found.extend(mod)
            inside.append(name)
    return found


def check_sharding(config: JobConfig, recipe: Recipe) -> None:
    """Refuse, before any worker starts, an FSDP2/HSDP job that would wrap only the root module.

    Builds the model on the meta device (no memory, no init: :func:`_skip_meta_init`) and asks
    the recipe for its :meth:`Recipe.shard_units`. Nothing to check for DDP, for a job of one
    rank, or for a recipe that sets ``shard_root_only = True``.

    Raises:
        ConfigError: one sentence naming ``recipe.target``.
    """
    import torch

    from raypod.config import ConfigError

    if (config.parallel.strategy not in ("fsdp", "hsdp") or config.scaling.max_workers < 2
            or recipe.shard_root_only):
        return
    ctx = RankContext(rank=0, world_size=config.scaling.max_workers, device=torch.device("meta"),
                      config=config)
    try:
        with torch.device("meta"), _skip_meta_init():
            model = recipe.build_model(ctx)
    except Exception as e:  # noqa: BLE001 - a model that cannot be built on meta is checked by the ranks
        log.info("shard check skipped: %s cannot build its model on the meta device: %s: %s",
                 type(recipe).__name__, type(e).__name__, e)
        return
    if recipe.shard_units(model):
        return
    raise ConfigError(
        f"recipe.target '{config.recipe.target}' gives FSDP2 no blocks to shard one by one "
        f"({type(recipe).__name__}.shard_units found no nn.ModuleList of repeated blocks in "
        f"{type(model).__name__}), so parallel.strategy '{config.parallel.strategy}' would wrap only the "
        "root module (the whole model gathered on every rank at each forward): return the blocks from "
        "shard_units, set shard_root_only = True on the recipe to accept that, or use parallel.strategy ddp")


def _skip_meta_init() -> Any:
    """A torch-function mode (local to this thread) under which the in-place ``torch.nn.init``
    calls return a meta tensor untouched. On the meta device an initialiser such as
    ``normal_`` computes nothing yet imports TorchDynamo (torch's reference ops are wrapped by
    it): 0.8 s of CPU at every job's start, for a module the driver never needs otherwise.
    The modules built, and so :func:`check_sharding`'s verdict, are the same."""
    import torch
    from torch.overrides import TorchFunctionMode

    class _SkipInit(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if getattr(func, "__module__", None) == "torch.nn.init" and func.__name__.endswith("_"):
                tensor = args[0] if args else kwargs.get("tensor")
                if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                    return tensor
            return func(*args, **kwargs)

    return _SkipInit()


def build_recipe(config: JobConfig) -> Recipe:
    """Instantiate ``recipe.target`` with ``recipe.args``.

    Raises:
        ConfigError: the constructor raised; one sentence naming ``recipe.target`` and the error.
    """
    from raypod.config import ConfigError, import_target

    cls = import_target(config.recipe.target, config.recipe.import_dirs)
    try:
        return cls(**config.recipe.args)
    except ConfigError:  # already one sentence naming the key (a missing package, a bad argument)
        raise
    except Exception as e:  # noqa: BLE001 - any constructor failure is the user's recipe or its args
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"recipe.target '{config.recipe.target}' could not be built with recipe.args: "
                          f"{type(e).__name__}: {msg}".rstrip(": ")) from None


def exports_pretrained(recipe: Recipe) -> bool:
    """Whether the recipe overrides :meth:`Recipe.export_pretrained` (its own export format)."""
    return type(recipe).export_pretrained is not Recipe.export_pretrained
