"""Starting a new run from a trained one (`--model.init_from`): the upstream run's checkpoint, its architecture,
and its weights mapped onto a task table of other tasks.

A new fit from an upstream run is not a resume: the weights come from the upstream checkpoint, the optimizer, step
counter and learning-rate schedule are new. Task-table rows (and every other per-task tensor) are mapped by task
NAME: a task the upstream run trained on keeps its row; the others are the tasks whose route comes from
`transfer.unseen_routes`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import AutoConfig, BartConfig

from ..data import load_tokenizer
from ..data.tasks import shortened
from ..errors import UsageError
from ..models import MoEBartConfig, MoEBartForConditionalGeneration, MoEOptions
from ..models.build import SMALL_BART, special_token_ids
from ..models.config import adopt_saved_shape
from .unseen_routes import NEEDS_REPRESENTATIONS, UnseenTasks, check_source

TASK_TABLE_KEY = "model.encoder.task_table.embedding.weight"
# per-task tensors of the model, first dimension = task id: mapped by task name, not copied whole
PER_TASK_WEIGHTS = (
    TASK_TABLE_KEY,
    "model.encoder.router.fixed_routes",
    "model.encoder.router.override_mask",
    "model.encoder.router.override_routes",
)
# of the weights, those the new run's options decide (the configured temperature, not the annealed one)
CONFIGURED_WEIGHTS = ("model.encoder.router.temperature",)
# weights a checkpoint from before they existed lacks; the new model's defaults stand
OPTIONAL_WEIGHTS = ("model.encoder.router.override_mask", "model.encoder.router.override_routes")
MODEL_PREFIX = "model."  # the module's attribute holding the MoE-BART, in Lightning's state dict
# data options that decide which tasks a fit trains on: a resume (`fit --ckpt_path`) must keep them
RESUME_DATA_OPTIONS = ("source", "data_dir", "partition", "task_info", "skills", "hf", "train_partitions")


def resolve_checkpoint(path: str | Path) -> Path:
    """The Lightning checkpoint of `init_from`: a .ckpt file, or a run folder's single best checkpoint
    (`checkpoints/best-step*.ckpt`), else its `checkpoints/last.ckpt`; a folder may also be `checkpoints/` itself."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".ckpt":
            raise UsageError(f"model option `init_from` {str(path)!r} is not a Lightning checkpoint (.ckpt)")
        return path
    if not path.is_dir():
        raise UsageError(
            f"model option `init_from` {str(path)!r} does not exist; give a .ckpt file or the folder of a "
            "`moe-mtl fit` run (with checkpoints/best-step*.ckpt or checkpoints/last.ckpt)"
        )
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    best = sorted(folder.glob("best-step*.ckpt"))
    if len(best) == 1:
        return best[0]
    if not best and (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    found = sorted(p.name for p in folder.glob("*.ckpt"))
    why = f"{len(best)} best checkpoints" if best else "no best-step*.ckpt and no last.ckpt"
    raise UsageError(
        f"model option `init_from` {str(path)!r}: {why} in {folder} (found: {found or 'no .ckpt file'}); "
        "give the .ckpt file to start from"
    )


@dataclass
class UpstreamRun:
    """What a new run takes from an upstream run's checkpoint."""

    path: Path
    hparams: dict[str, Any]  # the module's hyper-parameters
    data_hparams: dict[str, Any]  # the data module's
    state_dict: dict[str, torch.Tensor]  # the MoE-BART's weights (no "model." prefix)
    stage_routes: str | None = None  # "argmax" or "softmax" if it ended in stage two (its routes fixed), else None

    @property
    def options(self) -> MoEOptions:
        return MoEOptions.from_dict(self.hparams["moe"])

    @property
    def task_names(self) -> list[str]:
        return list(self.hparams["task_names"])

    @property
    def trained_tasks(self) -> list[str]:
        """Names of the tasks the upstream run trained on (partitions of its `train_partitions`), table order.

        Tasks in its table that it did not train on (held-out tasks of the same suite) have untrained rows, so
        they count as unseen here."""
        parts = self.data_hparams.get("train_partitions", "train")
        parts = {parts} if isinstance(parts, str) else set(parts)
        partitions = self.hparams.get("task_partitions") or ["train"] * len(self.task_names)
        return [name for name, part in zip(self.task_names, partitions, strict=True) if part in parts]

    @property
    def tokenizer_path(self) -> str | None:
        return self.hparams.get("tokenizer_path")

    def describe(self) -> str:
        return f"the upstream run {self.path}"


def read_upstream(init_from: str | Path) -> UpstreamRun:
    """The checkpoint of `init_from` (see `resolve_checkpoint`), read on the CPU with weights only."""
    path = resolve_checkpoint(init_from)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise UsageError(f"model option `init_from`: {path} could not be read as a checkpoint ({err})") from None
    hparams = checkpoint.get("hyper_parameters") or {}
    if "moe" not in hparams or "task_names" not in hparams or "state_dict" not in checkpoint:
        raise UsageError(
            f"model option `init_from`: {path} is not a checkpoint of a `moe-mtl fit` run (no MoE-BART "
            "hyper-parameters and weights)"
        )
    state = {
        key[len(MODEL_PREFIX) :]: value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(MODEL_PREFIX)
    }
    training = checkpoint.get("moe_mtl") or {}  # MoEMultiTaskModule.on_save_checkpoint's
    stage_routes = (training.get("stage_info") or {}).get("routes") if training.get("stage") == 2 else None
    data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    return UpstreamRun(path, dict(hparams), data, state, stage_routes)


def upstream_config(upstream: UpstreamRun, options: MoEOptions, sizes: dict[str, Any], special: dict[str, int]):
    """The MoE-BART config of the new run: the upstream architecture (its `pretrained` model's config, or a
    new BART of `sizes` over the upstream vocabulary with the `special` token ids) with `options`."""
    pretrained = upstream.hparams.get("pretrained")
    if pretrained is not None:
        try:
            config = AutoConfig.from_pretrained(pretrained)
        except OSError as err:
            raise UsageError(
                f"{upstream.describe()} was built from `pretrained` {pretrained!r}, whose config cannot be read "
                f"now ({err}); its architecture is needed to rebuild the model"
            ) from None
        return MoEBartConfig.from_bart_config(config, options)
    vocab_size = upstream.state_dict["model.shared.weight"].shape[0]
    return MoEBartConfig.from_bart_config(BartConfig(vocab_size=vocab_size, **special, **sizes), options)


def task_row_map(upstream_names: list[str], names: list[str], trained: list[str]) -> list[int | None]:
    """For each task of `names`, its row in the upstream table if the upstream run trained on it, else None."""
    index = {name: i for i, name in enumerate(upstream_names)}
    trained_set = set(trained)
    return [index[name] if name in trained_set else None for name in names]


@torch.no_grad()
def load_upstream_weights(model: MoEBartForConditionalGeneration, upstream: UpstreamRun, rows: list[int | None]):
    """Copy the upstream weights into `model`, name by name; per-task tensors row by row (`rows[i]`: the upstream
    row of task i, None: left as the new model has it). A missing, extra or differently shaped weight is an error
    naming it."""
    source = upstream.state_dict
    target = model.state_dict()
    extra = sorted(set(source) - set(target))
    if extra:
        raise UsageError(f"{upstream.describe()} has weights the new model lacks: {shortened(extra)}")
    missing = sorted(set(target) - set(source) - set(OPTIONAL_WEIGHTS))
    if missing:
        raise UsageError(f"{upstream.describe()} lacks weights of the new model: {shortened(missing)}")
    mapped = [(new, old) for new, old in enumerate(rows) if old is not None]
    new_ids = torch.tensor([new for new, _ in mapped], dtype=torch.long)
    old_ids = torch.tensor([old for _, old in mapped], dtype=torch.long)
    for name, weight in target.items():
        if name in CONFIGURED_WEIGHTS or name not in source:
            continue
        value = source[name]
        per_task = name in PER_TASK_WEIGHTS
        if (value.shape[1:] if per_task else value.shape) != (weight.shape[1:] if per_task else weight.shape):
            raise UsageError(
                f"weight {name} has shape {tuple(value.shape)} in {upstream.describe()} and {tuple(weight.shape)} "
                "in the new model; the architecture options (bart sizes, pretrained, MoE shape options) must match"
            )
        if per_task:
            weight[new_ids] = value[old_ids].to(weight.dtype)
        else:
            weight.copy_(value)


def run_tokenizer_path(upstream: UpstreamRun, tokenizer: str | None) -> str:
    """The tokenizer of a run started from `upstream`: the upstream one when none is given (nothing is retrained or
    re-tokenised with another vocabulary); a given one must have exactly the upstream vocabulary."""
    from ..data import load_tokenizer  # loads tokenizers: only when a run starts

    path = upstream.tokenizer_path
    if path is None:
        raise UsageError(f"{upstream.describe()} records no `tokenizer_path`; give data option `tokenizer`")
    if tokenizer is None or tokenizer == path:
        return path
    if load_tokenizer(tokenizer).get_vocab() != load_tokenizer(path).get_vocab():
        raise UsageError(
            f"init_from with a mismatched vocabulary: data option `tokenizer` {tokenizer!r} has another vocabulary "
            f"than the tokenizer of {upstream.describe()} ({path}); leave `tokenizer` unset to use the upstream one"
        )
    return tokenizer


def resume_mismatch(checkpoint: dict[str, Any], data: Mapping[str, Any], max_steps: int | None) -> str | None:
    """Why `fit --ckpt_path checkpoint` with data options `data` would train nothing or other tasks than the
    checkpoint's run (its data options differ, or its step is already `max_steps`); None for a true resume."""
    saved = checkpoint.get("datamodule_hyper_parameters") or {}
    for option in RESUME_DATA_OPTIONS:
        if option not in saved or option not in data:
            continue
        given, kept = data[option], saved[option]
        if option == "train_partitions":
            given, kept = ([v] if isinstance(v, str) else list(v) for v in (given, kept))
        if given != kept:
            return f"data option `{option}` is {given!r}, but the checkpoint's run has {kept!r}"
    step = checkpoint.get("global_step", 0)
    if max_steps is not None and max_steps >= 0 and step >= max_steps:
        return f"the checkpoint is at step {step}, and trainer.max_steps is {max_steps}: nothing would train"
    return None


def check_vocabulary(upstream: UpstreamRun, tokenizer_size: int | None) -> None:
    """The new run's tokenizer must be the upstream one's size (token ids index the trained embeddings)."""
    size = upstream.hparams.get("tokenizer_size")
    if tokenizer_size is not None and size is not None and tokenizer_size != size:
        raise UsageError(
            f"init_from with a mismatched vocabulary: the data's tokenizer has {tokenizer_size} tokens, "
            f"{upstream.describe()} was trained with {size} ({upstream.tokenizer_path}); use that tokenizer "
            "(leave data option `tokenizer` unset, or set it to the upstream one)"
        )


@dataclass
class UpstreamStart:
    """A new run's start from an upstream run (`build_from_upstream`)."""

    model: MoEBartForConditionalGeneration  # in train mode
    architecture: dict[str, Any]  # {"pretrained", "bart"} of the upstream run: the new run's hyper-parameters
    unseen: UnseenTasks | None  # unseen tasks whose routes need the data's tasks (computed representations)
    relearned_routes: str | None  # the warning for a fit that would learn the upstream's fixed routes again


def build_from_upstream(
    init_from: str,
    configured: MoEOptions,
    task_names: list[str],
    *,
    pretrained: str | None,
    bart: dict[str, Any] | None,
    tokenizer_size: int | None,
    unseen_routes: str,
    representation: str,
) -> UpstreamStart:
    """The upstream run's MoE-BART over the tasks `task_names`: its architecture and weights, rows mapped by task
    name, the `configured` non-shape options; unseen tasks get `unseen_routes` (see `transfer.unseen_routes`).

    `pretrained` and `bart` are the new run's model options: unset, or the upstream run's own."""
    upstream = read_upstream(init_from)
    architecture = {}
    for option, given in (("pretrained", pretrained), ("bart", bart)):
        kept = upstream.hparams.get(option)
        if given is not None and given != kept:
            raise UsageError(
                f"model option `{option}` is {given!r}, but {upstream.describe()} has {kept!r}: with "
                f"`init_from` the architecture is the upstream run's; leave `{option}` unset"
            )
        architecture[option] = kept
    check_vocabulary(upstream, tokenizer_size)
    if configured.task_embeddings is not None:
        raise UsageError(
            f"MoE option `task_embeddings` is {configured.task_embeddings!r}, but with `init_from` the task table "
            "is the upstream run's (rows by task name; unseen tasks: `unseen_routes`, e.g. 'representation' with "
            "`representation: <file>`); set it to null"
        )
    options = adopt_saved_shape(configured, upstream.options, upstream.describe())
    check_source(unseen_routes, representation, options.routing)
    tokenizer_path = upstream.tokenizer_path
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
    special = special_token_ids(tokenizer, upstream.hparams.get("pad_token_id"))
    sizes = {**SMALL_BART, **(upstream.hparams.get("bart") or {})}
    model = MoEBartForConditionalGeneration(upstream_config(upstream, options, sizes, special))
    rows = task_row_map(upstream.task_names, task_names, upstream.trained_tasks)
    load_upstream_weights(model, upstream, rows)
    model.set_temperature(options.temperature)
    relearned = None
    relearning = options.routes == "learned" and not options.freeze_router and unseen_routes != "learned"
    if upstream.stage_routes is not None and relearning:  # ("learned" unseen routes: the router stays frozen)
        relearned = (
            f"{upstream.describe()} ended in stage two, its routes fixed ({upstream.stage_routes} of the router, "
            f"router and task table frozen), but this run's MoE options learn routes again (selection "
            f"{options.selection!r}, router not frozen): training can change every task's route. To train on the "
            f"routes as they were, set moe.selection {upstream.stage_routes!r}, moe.freeze_router true and "
            "moe.freeze_task_table true"
        )
    trained = [upstream.task_names.index(name) for name in upstream.trained_tasks]
    unseen = UnseenTasks(
        unseen=[i for i, row in enumerate(rows) if row is None],
        seen=[i for i, row in enumerate(rows) if row is not None],
        seen_rows=upstream.state_dict[TASK_TABLE_KEY][trained].float(),
        seed=options.route_seed,
    )
    names = f" ({shortened([task_names[i] for i in unseen.unseen])})" if unseen.unseen else ""
    rank_zero_info(
        f"init_from {upstream.path}: {len(unseen.seen)} tasks keep their trained rows; {len(unseen.unseen)} unseen "
        f"tasks{names} get {unseen_routes!r} routes"
    )
    if unseen_routes == "learned":
        if options.freeze_task_table:
            raise UsageError(
                "model option `unseen_routes` is 'learned', but moe.freeze_task_table is true: the new rows "
                "could not be trained; set moe.freeze_task_table false"
            )
        if options.selection == "argmax":
            raise UsageError(
                "model option `unseen_routes` is 'learned', but moe.selection 'argmax' passes no gradient to the "
                "new rows; allowed: softmax, gumbel, gumbel_st, switch, reinforce"
            )
        if model.router is not None and model.router.learned:
            for param in model.router.parameters():  # the router stays as trained, the new rows learn
                param.requires_grad_(False)
    if unseen_routes not in NEEDS_REPRESENTATIONS or Path(representation).is_file():
        unseen.assign(model, unseen_routes, representation, task_names)  # needs no data: routes set from the start
        unseen = None
    return UpstreamStart(model.train(), architecture, unseen, relearned)


__all__ = [
    "TASK_TABLE_KEY",
    "UpstreamRun",
    "UpstreamStart",
    "build_from_upstream",
    "check_vocabulary",
    "load_upstream_weights",
    "read_upstream",
    "resolve_checkpoint",
    "resume_mismatch",
    "run_tokenizer_path",
    "task_row_map",
    "upstream_config",
]
