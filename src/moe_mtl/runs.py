"""Run folders and the files in them: checkpoints, evaluation files, route tables, and the upstream run of
`--model.transfer.init_from`.

A run folder (`runs/<name>/version_N/`, the logger's folder of one `moe-mtl fit`) holds:

    checkpoints/best-step<N>.ckpt                   the best checkpoint by the monitored metric (ModelCheckpoint)
    checkpoints/last.ckpt                           the last one
    config.yaml                                     the run's options (LightningCLI)
    routes/step<N>.json                             route tables (`route_table_record`, RoutingMonitor)
    evaluation/<stage>-epoch<e>-step<s>.{csv,json}  one row per task, then the average (during fit)
    evaluation/<stage>-<checkpoint stem>.{csv,json} a checkpoint evaluated on its own
    predictions/<task>.jsonl                        generated outputs, in example order

The checkpoint of a run (the one rule, `run_checkpoint`): its single `checkpoints/best-step*.ckpt`, else its
`checkpoints/last.ckpt`; two or more best checkpoints and no choice made are ambiguous, and no checkpoint is
taken. A checkpoint file stands for the run folder it is in (`checkpoint_run_folder`).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic_files import atomic_path
from .errors import UsageError

# torch, models and representations are imported inside the functions that use them: `moe-mtl summarize` reads
# run folders through this module and must not pay for importing torch
if TYPE_CHECKING:
    import torch

    from .evaluation.task_evaluation import EvaluationResult
    from .models import MoEBartForConditionalGeneration, MoEOptions
    from .representations.unseen_routes import UnseenTasks

BEST_CHECKPOINT = re.compile(r"best-step(\d+)\.ckpt")
ROUTE_TABLE = re.compile(r"step(\d+)\.json")
RECORD_DECIMALS = 6  # float32 routes carry ~7 significant digits; more would only be noise in the JSON
MODEL_PREFIX = "model."  # the module's attribute holding the MoE-BART, in Lightning's state dict
# data options that decide which tasks a fit trains on: a resume (`fit --ckpt_path`) must keep them
RESUME_DATA_OPTIONS = ("source", "data_dir", "partition", "task_info", "skills", "hf", "train_partitions")


# --- the checkpoint of a run ------------------------------------------------------------------------------


def checkpoint_run_folder(checkpoint: Path) -> Path:
    """The run folder a checkpoint belongs to: `runs/x/version_0` for `runs/x/version_0/checkpoints/last.ckpt`."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def checkpoints_folder(folder: Path) -> Path:
    """The folder of a run's checkpoints: `folder/checkpoints`, or `folder` itself when it is that folder."""
    return folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder


def best_checkpoints(folder: Path) -> list[Path]:
    """The best checkpoints (`checkpoints/best-step*.ckpt`) of a run folder, by name."""
    return sorted(checkpoints_folder(folder).glob("best-step*.ckpt"))


def best_step(checkpoint: Path) -> int:
    """The step in a best checkpoint's name (`best-step60.ckpt` → 60)."""
    match = BEST_CHECKPOINT.fullmatch(checkpoint.name)
    if match is None:
        raise UsageError(f"{checkpoint} is not named like a best checkpoint (best-step<N>.ckpt)")
    return int(match.group(1))


def run_checkpoint(folder: Path) -> Path | None:
    """THE checkpoint of a run folder (see the module docstring): its single best checkpoint, else its last one;
    None when it has neither, or several best ones."""
    best = best_checkpoints(folder)
    last = checkpoints_folder(folder) / "last.ckpt"
    if len(best) == 1:
        return best[0]
    return last if not best and last.is_file() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """The Lightning checkpoint of `init_from`: a .ckpt file, or a run folder's checkpoint (`run_checkpoint`); a
    folder may also be `checkpoints/` itself."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".ckpt":
            raise UsageError(f"model option `transfer.init_from` {str(path)!r} is not a Lightning checkpoint (.ckpt)")
        return path
    if not path.is_dir():
        raise UsageError(
            f"model option `transfer.init_from` {str(path)!r} does not exist; give a .ckpt file or the folder of a "
            "`moe-mtl fit` run (with checkpoints/best-step*.ckpt or checkpoints/last.ckpt)"
        )
    checkpoint = run_checkpoint(path)
    if checkpoint is not None:
        return checkpoint
    folder = checkpoints_folder(path)
    best = best_checkpoints(path)
    found = sorted(p.name for p in folder.glob("*.ckpt"))
    why = f"{len(best)} best checkpoints" if best else "no best-step*.ckpt and no last.ckpt"
    raise UsageError(
        f"model option `transfer.init_from` {str(path)!r}: {why} in {folder} (found: {found or 'no .ckpt file'}); "
        "give the .ckpt file to start from"
    )


def read_checkpoint(path: str | Path, option: str = "ckpt_path") -> dict[str, Any]:
    """The Lightning checkpoint at `path` on the CPU, weights only, tensors memory-mapped (not loaded); a usage
    error naming `option` and the file if it is missing or not one."""
    import torch

    if not Path(path).is_file():
        raise UsageError(f"{option} {path} does not exist; give a checkpoint file (.ckpt) of `moe-mtl fit`")
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except Exception as error:  # torch raises pickle, zip and runtime errors alike; its text is about mmap
        raise UsageError(
            f"{option} {path} cannot be read as a checkpoint ({type(error).__name__}): not a complete file written "
            "by torch.save; give a checkpoint file (.ckpt) of `moe-mtl fit`"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UsageError(f"{option} {path} is not a Lightning checkpoint (no state_dict); give one of `moe-mtl fit`")
    return checkpoint


# --- the upstream run of `init_from` ----------------------------------------------------------------------


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
        from .models import MoEOptions

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
    checkpoint = read_checkpoint(path, "model option `transfer.init_from`")
    hparams = checkpoint.get("hyper_parameters") or {}
    if "moe" not in hparams or "task_names" not in hparams:
        raise UsageError(
            f"model option `transfer.init_from`: {path} is not a checkpoint of a `moe-mtl fit` run (no MoE-BART "
            "hyper-parameters and weights)"
        )
    state = {
        key[len(MODEL_PREFIX) :]: value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(MODEL_PREFIX)
    }
    data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    return UpstreamRun(path, dict(hparams), data, state, checkpoint_fixed_routes(checkpoint))


def checkpoint_fixed_routes(checkpoint: Mapping[str, Any]) -> str | None:
    """How the learned routes of a checkpoint's model are fixed ("argmax" or "softmax": stage two, or a run that
    froze its router), else None. Read from its `moe` hyper-parameters; a checkpoint of an earlier moe-mtl kept
    the stage apart, in "moe_mtl"."""
    from .models.config import STAGE_ROUTES

    moe = (checkpoint.get("hyper_parameters") or {}).get("moe") or {}
    if moe.get("freeze_router") and moe.get("selection") in STAGE_ROUTES:  # (freeze_router: learned routes only)
        return moe["selection"]
    old = checkpoint.get("moe_mtl") or {}
    return (old.get("stage_info") or {}).get("routes", "argmax") if old.get("stage") == 2 else None


@dataclass
class RunStart:
    """The model a run starts from (`start_run_model`), and what is still due once the data are known."""

    model: MoEBartForConditionalGeneration  # in train mode
    # {"pretrained", "bart"} of an upstream run (`init_from`), the new run's hyper-parameters; {} otherwise
    architecture: dict[str, Any]
    unseen: UnseenTasks | None  # unseen tasks whose routes need the data's tasks (computed representations)
    relearned_routes: str | None  # the warning for a fit that would learn the upstream's fixed routes again


def start_from_upstream(
    init_from: str,
    configured: MoEOptions,
    task_names: list[str],
    *,
    pretrained: str | None,
    bart: dict[str, Any] | None,
    tokenizer_size: int | None,
    unseen_routes: str,
    representation: str,
) -> RunStart:
    """A new run from the upstream run `init_from` (`read_upstream`) over the tasks `task_names`: its MoE-BART
    (`models.build.build_from_upstream`: architecture and weights, rows mapped by task name, the `configured`
    non-shape options); unseen tasks get `unseen_routes` (see `representations.unseen_routes`).

    A new fit from an upstream run is not a resume: the weights come from the upstream checkpoint, the optimizer,
    step counter and learning-rate schedule are new. `pretrained` and `bart` are the new run's model options:
    unset, or the upstream run's own."""
    from lightning.pytorch.utilities import rank_zero_info

    from .data.tasks import shortened
    from .models.build import build_from_upstream
    from .models.config import adopt_saved_shape
    from .models.conversion import TASK_TABLE_KEY
    from .representations.unseen_routes import NEEDS_REPRESENTATIONS, UnseenTasks, check_source

    upstream = read_upstream(init_from)
    architecture = {}
    for option, given in (("pretrained", pretrained), ("bart", bart)):
        kept = upstream.hparams.get(option)
        if given is not None and given != kept:
            raise UsageError(
                f"model option `{option}` is {given!r}, but {upstream.describe()} has {kept!r}: with "
                f"`transfer.init_from` the architecture is the upstream run's; leave `{option}` unset"
            )
        architecture[option] = kept
    check_vocabulary(upstream, tokenizer_size)
    if configured.task_embeddings is not None:
        raise UsageError(
            f"MoE option `task_embeddings` is {configured.task_embeddings!r}, but with `transfer.init_from` the task "
            "table is the upstream run's (rows by task name; unseen tasks: `transfer.unseen_routes`, e.g. "
            "'representation' with `transfer.representation: <file>`); set it to null"
        )
    options = adopt_saved_shape(configured, upstream.options, upstream.describe())
    check_source(unseen_routes, representation, options.routing)
    model, rows = build_from_upstream(upstream, options, task_names)
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
                "model option `transfer.unseen_routes` is 'learned', but moe.freeze_task_table is true: the new rows "
                "could not be trained; set moe.freeze_task_table false"
            )
        if options.selection == "argmax":
            raise UsageError(
                "model option `transfer.unseen_routes` is 'learned', but moe.selection 'argmax' passes no gradient to "
                "the new rows; allowed: softmax, gumbel, gumbel_st, switch, reinforce"
            )
        if model.router is not None and model.router.learned:
            for param in model.router.parameters():  # the router stays as trained, the new rows learn
                param.requires_grad_(False)
    if unseen_routes not in NEEDS_REPRESENTATIONS or Path(representation).is_file():
        unseen.assign(model, unseen_routes, representation, task_names)  # needs no data: routes set from the start
        unseen = None
    return RunStart(model, architecture, unseen, relearned)


def start_run_model(
    options: MoEOptions,
    task_names: list[str] | None,
    *,
    pretrained: str | None,
    bart: dict[str, Any] | None,
    tokenizer_size: int | None,
    pad_token_id: int | None,
    tokenizer: Callable[[], Any] | None,
    init_from: str | None,
    unseen_routes: str,
    representation: str,
    finetune: str,
) -> RunStart:
    """The model a run starts from: the upstream run's (`init_from`, `start_from_upstream`), else the model of
    `pretrained` or a new one of the `bart` sizes (`models.build.build_model`, task representations of the MoE
    option `task_embeddings`); with `finetune` "task_table", only the task table trains.

    `tokenizer` loads the data's tokenizer (None: none is linked): a new model takes its special token ids."""
    from .models.build import build_model, special_token_ids
    from .models.conversion import TASK_TABLE_KEY
    from .representations.files import configured_representations

    if init_from is not None:
        names = task_names or [f"task{i}" for i in range(options.num_tasks)]
        start = start_from_upstream(
            init_from,
            options,
            names,
            pretrained=pretrained,
            bart=bart,
            tokenizer_size=tokenizer_size,
            unseen_routes=unseen_routes,
            representation=representation,
        )
    else:
        special = {}
        if pretrained is None:
            special = special_token_ids(tokenizer() if tokenizer else None, pad_token_id)
        vectors = configured_representations(options, task_names)
        start = RunStart(build_model(pretrained, bart, options, tokenizer_size, special, vectors), {}, None, None)
    if finetune == "task_table":
        for name, param in start.model.named_parameters():
            param.requires_grad_(name == TASK_TABLE_KEY)
    return start


def run_tokenizer_path(upstream: UpstreamRun, tokenizer: str | None) -> str:
    """The tokenizer of a run started from `upstream`: the upstream one when none is given (nothing is retrained or
    re-tokenised with another vocabulary); a given one must have exactly the upstream vocabulary."""
    from .data import load_tokenizer  # loads tokenizers: only when a run starts

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


def check_vocabulary(upstream: UpstreamRun, tokenizer_size: int | None) -> None:
    """The new run's tokenizer must be the upstream one's size (token ids index the trained embeddings)."""
    size = upstream.hparams.get("tokenizer_size")
    if tokenizer_size is not None and size is not None and tokenizer_size != size:
        raise UsageError(
            f"init_from with a mismatched vocabulary: the data's tokenizer has {tokenizer_size} tokens, "
            f"{upstream.describe()} was trained with {size} ({upstream.tokenizer_path}); use that tokenizer "
            "(leave data option `tokenizer` unset, or set it to the upstream one)"
        )


def checkpoint_train_partitions(checkpoint: Mapping[str, Any]) -> list[str]:
    """The partitions a checkpoint's run trained on (its data module's `train_partitions`)."""
    from .data.tasks import partition_list

    return partition_list((checkpoint.get("datamodule_hyper_parameters") or {}).get("train_partitions", "train"))


def resume_mismatch(checkpoint: dict[str, Any], data: Mapping[str, Any], max_steps: int | None) -> str | None:
    """Why `fit --ckpt_path checkpoint` with data options `data` would train nothing or other tasks than the
    checkpoint's run (its data options differ, or its step is already `max_steps`); None for a true resume."""
    from .data.tasks import partition_list

    saved = checkpoint.get("datamodule_hyper_parameters") or {}
    for option in RESUME_DATA_OPTIONS:
        if option not in saved or option not in data:
            continue
        given, kept = data[option], saved[option]
        if option == "train_partitions":
            given, kept = partition_list(given), partition_list(kept)
        if given != kept:
            return f"data option `{option}` is {given!r}, but the checkpoint's run has {kept!r}"
    step = checkpoint.get("global_step", 0)
    if max_steps is not None and max_steps >= 0 and step >= max_steps:
        return f"the checkpoint is at step {step}, and trainer.max_steps is {max_steps}: nothing would train"
    return None


# --- evaluation files -------------------------------------------------------------------------------------


def evaluation_stem(folder: Path, stage: str, epoch: int, step: int, checkpoint: str | None = None) -> Path:
    """The path (no suffix) of one evaluation's files: named by the checkpoint evaluated on its own, else by
    the epoch and step of the fit."""
    if checkpoint:
        return folder / f"{stage}-{Path(checkpoint).stem}"
    return folder / f"{stage}-epoch{epoch}-step{step}"


def write_evaluation(stem: Path, result: EvaluationResult, epoch: int, step: int) -> None:
    """`stem`.csv (a row per task, then "average") and `stem`.json (the same, with stage, epoch and step)."""
    from .evaluation.task_evaluation import ROW_FIELDS

    with atomic_path(stem.with_suffix(".csv")) as temp, open(temp, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(ROW_FIELDS))
        writer.writeheader()
        writer.writerows(result.rows)
        writer.writerow({"task": "average", "score": result.score, "loss": result.loss})
    average = {"loss": result.loss, "score": result.score}
    summary = {"stage": result.stage, "epoch": epoch, "step": step, "average": average, "tasks": result.rows}
    with atomic_path(stem.with_suffix(".json")) as temp:
        temp.write_text(json.dumps(summary, indent=1) + "\n")


def write_predictions(folder: Path, by_task: Mapping[str, list[dict[str, Any]]]) -> None:
    """`folder`/<task>.jsonl, one JSON row per example, in the given order."""
    for task, rows in by_task.items():
        with atomic_path(folder / f"{task}.jsonl") as temp, open(temp, "w") as file:
            for row in rows:
                file.write(json.dumps(row) + "\n")


# --- route tables -----------------------------------------------------------------------------------------


def route_table_path(run_dir: Path, step: int) -> Path:
    """Where a run's route table at `step` is saved: `<run_dir>/routes/step<step>.json`."""
    return Path(run_dir) / "routes" / f"step{step}.json"


def route_table_record(
    routes: torch.Tensor, task_names: Sequence[str], layer_names: Sequence[str], step: int
) -> dict[str, Any]:
    """A JSON-ready record of the route table (T, L, E) at a training step.

    {"step", "tasks", "layers", "num_experts", "routes": T×L×E nested lists of floats rounded to 6 decimals}.
    """
    from .evaluation.routes import check_routes

    check_routes(routes)
    num_tasks, num_layers, num_experts = routes.shape
    for option, names, expected, axis in (
        ("task_names", task_names, num_tasks, "tasks"),
        ("layer_names", layer_names, num_layers, "layers"),
    ):
        if len(names) != expected:
            raise UsageError(
                f"{option}: got {len(names)} names, expected {expected} for routes of shape "
                f"{tuple(routes.shape)} ({expected} {axis})"
            )
    values = routes.detach().float().cpu().tolist()
    return {
        "step": int(step),
        "tasks": [str(name) for name in task_names],
        "layers": [str(name) for name in layer_names],
        "num_experts": num_experts,
        "routes": [[[round(p, RECORD_DECIMALS) for p in layer] for layer in task] for task in values],
    }


def write_route_table(path: str | Path, record: dict[str, Any]) -> None:
    """Write `record` as JSON to `path`, creating its folder; atomic, so a reader never sees half a file."""
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(record), encoding="utf-8")


def read_route_tables(run_dir: Path) -> list[dict[str, Any]]:
    """The saved route tables (`route_table_record`s) of a run folder, by step."""
    files = [p for p in (Path(run_dir) / "routes").glob("step*.json") if ROUTE_TABLE.fullmatch(p.name)]
    return sorted((json.loads(p.read_text()) for p in files), key=lambda record: record["step"])
