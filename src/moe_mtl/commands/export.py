"""`moe-mtl export`: a trained run's tasks as plain transformers BART folders (and, with `--all`, the whole MoE-BART).

The mapping (which expert each task runs, the dense weights) is `moe_mtl.models.conversion`; this module reads the
checkpoint, sets the generation config `moe-mtl predict` uses, and writes the folders (docs/export.md).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jsonargparse import ArgumentParser
from transformers import GenerationConfig

from ..analysis.run import RunFolder
from ..errors import UsageError
from ..models.conversion import dense_model, task_experts
from . import read_option_docs

if TYPE_CHECKING:
    from ..training import MoEMultiTaskModule

MOE_FOLDER = "moe_bart"  # `--all`: <out>/moe_bart/, beside the task folders
TASK_NAMES_FILE = "task_names.json"  # `--all`: task names by task id, the `task_ids` the MoE-BART takes


def build_export_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="moe-mtl export",
        allow_abbrev=False,
        description="Export tasks of a trained run as plain transformers BART folders (model, tokenizer and the "
        "generation settings of `moe-mtl predict`) at <out>/<task>/; each computes what the MoE-BART computes for "
        "its task. Tasks with soft routes, and token routing, are refused (docs/export.md).",
    )
    parser.add_argument("--ckpt_path", required=True, help="Lightning checkpoint of a `moe-mtl fit` run (.ckpt)")
    parser.add_argument(
        "--task", action="append", default=None, help="name of a task to export; repeat the option for more"
    )
    parser.add_argument("--out", required=True, help="folder the exports are written to: <out>/<task>/")
    parser.add_argument(
        "--all",
        action="store_true",
        help=f"also save the whole MoE-BART (save_pretrained, with tokenizer and {TASK_NAMES_FILE}) to "
        f"<out>/{MOE_FOLDER}/, for any routes",
    )
    return parser


def prediction_generation_config(base: GenerationConfig, module: MoEMultiTaskModule) -> GenerationConfig:
    """`base` with what `MoEMultiTaskModule.generate` passes to `generate` on top of it (`moe-mtl predict`): the
    run's beams and its maximum target length as the most new tokens."""
    config = copy.deepcopy(base)
    config.num_beams = module.evaluation.num_beams
    config.max_new_tokens = module.hparams.max_target_length
    return config


def load_run(ckpt_path: str) -> tuple[MoEMultiTaskModule, dict[str, Any]]:
    """The module of a `moe-mtl fit` checkpoint (eval mode, CPU) and its data module's hyper-parameters."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise UsageError(f"--ckpt_path {path} is not a file; give a checkpoint of a `moe-mtl fit` run (.ckpt)")
    run = RunFolder.resolve(path)
    try:
        module = run.load_module()
        data = dict(run.checkpoint_contents.get("datamodule_hyper_parameters") or {})
    except Exception as err:  # unreadable in any way (not a zip, not a Lightning checkpoint, not ours)
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise UsageError(f"--ckpt_path {path} could not be loaded as a `moe-mtl fit` checkpoint ({reason})") from err
    return module, data


def export_run(
    module: MoEMultiTaskModule, tasks: Sequence[str], out: Path, whole: bool, data: dict[str, Any]
) -> dict[str, Path]:
    """Write each task of `tasks` as a dense BART folder under `out` (and the MoE-BART if `whole`); returns
    folder per task (and `MOE_FOLDER`). Every task is checked before anything is written."""
    ids = {name: task_id for task_id, name in enumerate(module.task_names)}
    unknown = [task for task in tasks if task not in ids]
    if unknown:
        raise UsageError(f"--task {', '.join(unknown)}: not a task of this run; its tasks: {', '.join(ids)}")
    if whole and MOE_FOLDER in tasks:
        raise UsageError(f"--task {MOE_FOLDER} would share <out>/{MOE_FOLDER}/ with --all; export it without --all")
    model = module.model
    try:
        experts = {task: task_experts(model, ids[task], task) for task in dict.fromkeys(tasks)}
    except ValueError as err:
        raise UsageError(f"{err}; --all exports the whole MoE-BART instead") from err
    generation = prediction_generation_config(model.generation_config, module)
    tokenizer = module.tokenizer
    if data.get("max_input_length") is not None:  # `tokenizer(text, truncation=True)` cuts inputs as the data did
        tokenizer.model_max_length = data["max_input_length"]
    written = {}
    for task, chosen in experts.items():
        dense = dense_model(model, chosen)
        dense.generation_config = copy.deepcopy(generation)
        written[task] = out / task
        dense.save_pretrained(written[task])
        tokenizer.save_pretrained(written[task])
        routes = ", ".join(f"{layer} → {expert}" for layer, expert in chosen.items())
        print(f"exported task {task} (experts {routes}) to {written[task]}")
    if whole:
        written[MOE_FOLDER] = out / MOE_FOLDER
        model.generation_config = generation
        model.save_pretrained(written[MOE_FOLDER])
        tokenizer.save_pretrained(written[MOE_FOLDER])
        (written[MOE_FOLDER] / TASK_NAMES_FILE).write_text(json.dumps(list(module.task_names), indent=1) + "\n")
        print(f"saved the MoE-BART ({len(ids)} tasks, named by task id in {TASK_NAMES_FILE}) to {written[MOE_FOLDER]}")
    return written


def main(args: Sequence[str]) -> dict[str, Path]:
    """`moe-mtl export`: bad options, unknown tasks, unreadable checkpoints and refused routes are usage errors
    (one line, exit 2)."""
    read_option_docs(args)
    parser = build_export_parser()
    options = parser.parse_args(list(args))
    if not options.task and not options.all:
        parser.error("nothing to export: name tasks with --task NAME (repeatable), or give --all")
    try:
        module, data = load_run(options.ckpt_path)
        return export_run(module, options.task or [], Path(options.out), options.all, data)
    except ValueError as err:
        parser.error(" ".join(str(err).split()))  # one line, whatever the message wrapped
