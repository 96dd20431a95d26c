"""The `moe-mtl` command (also `python -m moe_mtl`).

Subcommands:
    fit, validate, test, predict   LightningCLI over `MoEMultiTaskModule` and `MultiTaskDataModule`
              (`moe-mtl fit --config configs/quickstart.yaml`); what the model needs from the data is
              linked, never repeated in configs; the resolved config is saved with each run.
    upcycle   turn a dense BART (hub name or local folder) into a saved MoE-BART: every expert a
              copy of the dense weights at its position (Ye et al.), MoE options from `MoEOptions`.
    represent task representations (text, Fisher) of a config's tasks, written to a file for
              `--model.moe.task_embeddings` (`moe_mtl.transfer.representations`).
    analyze   route analysis of a run or checkpoint (heatmap, dynamics, feature correlation, route–skill
              agreement, expert disabling) into `<run>/analysis/` (`moe_mtl.analysis`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser, set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .analysis.command import run_analyze
from .data import MultiTaskDataModule
from .models import MoEBartForConditionalGeneration, MoEOptions
from .models.config import SHAPE_OPTIONS
from .training import MoEMultiTaskModule, TemperatureAnnealing, TwoStageTraining
from .transfer.init_from import read_upstream, resume_mismatch, run_tokenizer_path
from .transfer.representations import run_represent

# datamodule fact → model option, set when the datamodule is instantiated
DATA_LINKS = {
    "num_tasks": "moe.num_tasks",
    "task_names": "task_names",
    "task_metrics": "task_metrics",
    "task_partitions": "task_partitions",
    "vocab_size": "tokenizer_size",
    "pad_token_id": "pad_token_id",
    "tokenizer_path": "tokenizer_path",
}
# model options a checkpoint decides (the shape of its weights); the rest (num_beams, results_dir, learning rates,
# …) stay as the command gives them, and the linked ones come from the data (the module checks the tasks match)
CHECKPOINT_OPTIONS = ("pretrained", "bart", "moe")
# of `moe`, those that shape the weights (the rest, e.g. top_k or capacity_factor, may change at test time)
CHECKPOINT_MOE_OPTIONS = SHAPE_OPTIONS
# callbacks with a CLI group of their own (`--two_stage.switch_step`), always on: group → class
CALLBACK_GROUPS = {"two_stage": TwoStageTraining, "temperature": TemperatureAnnealing}
# which way is better for each selection metric (the paper selects by val/score: loss and score disagree)
SELECTION_MODES = {"val/score": "max", "val/loss": "min"}


class MoEMTLCLI(LightningCLI):
    """LightningCLI with the data → model links and checkpoint selection by val/score or val/loss."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for source, target in DATA_LINKS.items():
            parser.link_arguments(f"data.{source}", f"model.{target}", apply_on="instantiate")
        parser.link_arguments("data.max_target_length", "model.max_target_length")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")  # first: `--ckpt_path best` reads it
        # last.ckpt, the newest state at every validation, for resuming: a ModelCheckpoint of its own, because
        # `save_last` (Lightning 2.6) rewrites last.ckpt only when a new best is saved, so it could lag far behind
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        # groups, not `trainer.callbacks` items, so that one flag changes them: a list item cannot be addressed.
        # LightningCLI instantiates every group and adds it to the trainer's callbacks; off is a setting
        # (`--two_stage.switch_step null`; τ is left alone where routes are not learned)
        for group, callback in CALLBACK_GROUPS.items():
            parser.add_lightning_class_args(callback, group)
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/score",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best-step{step}",
                "checkpoint.auto_insert_metric_name": False,
                "last_checkpoint.monitor": None,
                "last_checkpoint.save_top_k": 1,
                "last_checkpoint.filename": "last",
                "last_checkpoint.enable_version_counter": False,
            }
        )

    def _parse_ckpt_path(self) -> None:
        """With `--ckpt_path`, take the model's architecture options from the checkpoint, as LightningCLI does, but
        only those: LightningCLI would also override evaluation options given on the command line (`--model.num_beams`,
        `--model.results_dir`) with the checkpoint's values, silently."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)  # hparams only
        hparams = checkpoint.get("hyper_parameters", {})
        kept = {key: hparams[key] for key in CHECKPOINT_OPTIONS if key in hparams}
        if "moe" in kept:
            kept["moe"] = {key: value for key, value in kept["moe"].items() if key in CHECKPOINT_MOE_OPTIONS}
        if kept:
            try:
                self.config = self.parser.parse_object({subcommand: {"model": kept}}, self.config)
            except SystemExit:
                sys.stderr.write(f"Parsing the model options saved in {ckpt_path} failed\n")
                raise

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        monitor, mode = config.checkpoint.monitor, config.checkpoint.mode
        # usage errors like jsonargparse's own (usage, tip, message; exit code 2), not a traceback
        parser = self._subcommand_parsers[self.subcommand] if self.subcommand else self.parser
        if monitor in SELECTION_MODES and mode != SELECTION_MODES[monitor]:
            parser.error(
                f"checkpoint.monitor is {monitor!r} with checkpoint.mode {mode!r}; "
                f"use checkpoint.mode {SELECTION_MODES[monitor]!r} (higher score, lower loss is better)"
            )
        listed = config.trainer.callbacks or []
        for item in listed if isinstance(listed, list) else [listed]:
            class_path = getattr(item, "class_path", None)
            group = callback_group(class_path)
            if group is not None:
                parser.error(
                    f"trainer.callbacks lists {class_path}, which the `{group}` group already adds (it is always "
                    f"on): it would run twice. Move its init_args to `{group}:` (YAML) or `--{group}.*` flags and "
                    "drop it from trainer.callbacks"
                )
        if config.checkpoint.save_last:
            parser.error(
                f"checkpoint.save_last is {config.checkpoint.save_last!r}; leave it false: last.ckpt is written at "
                "every validation by `last_checkpoint` (checkpoint.save_last would keep a stale copy beside it)"
            )
        self._check_transfer(config, parser)

    def _check_transfer(self, config, parser) -> None:
        """`--model.init_from`: the data use the upstream run's tokenizer. `fit --ckpt_path` that is no resume (other
        tasks, or nothing left to train): a usage error pointing to `--model.init_from`."""
        ckpt_path = config.get("ckpt_path")
        if self.subcommand == "fit" and ckpt_path and Path(ckpt_path).is_file():
            checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True)
            why = resume_mismatch(checkpoint, config.data.as_dict(), config.trainer.max_steps)
            if why is not None:
                parser.error(
                    f"fit --ckpt_path {ckpt_path} resumes that run, but {why}. To train a new run from its weights "
                    f"(other tasks, few-shot), use --model.init_from {ckpt_path} without --ckpt_path"
                )
        if config.model.get("init_from"):
            try:
                upstream = read_upstream(config.model.init_from)
                config.data.tokenizer = run_tokenizer_path(upstream, config.data.tokenizer)
            except ValueError as err:
                parser.error(str(err))


def callback_group(class_path: str | None) -> str | None:
    """The `CALLBACK_GROUPS` group whose callback (or a subclass) `class_path` names, if any."""
    module, _, name = (class_path or "").rpartition(".")
    try:
        callback = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None  # not ours to judge: jsonargparse reports a class that cannot be imported
    return next((g for g, c in CALLBACK_GROUPS.items() if isinstance(callback, type) and issubclass(callback, c)), None)


def read_option_docs(argv: Sequence[str]) -> None:
    """Read option help from attribute docstrings (MoEOptions' fields) only when the command prints help: reading
    them for every class the parser holds (Trainer, callbacks, …) takes ~4 s of every command's start-up."""
    set_parsing_settings(docstring_parse_attribute_docstrings=any(arg in ("-h", "--help") for arg in argv))


def run_lightning(args: Sequence[str] | None = None) -> MoEMTLCLI:
    """fit / validate / test / predict through LightningCLI (`args` None: the command line)."""
    read_option_docs(sys.argv[1:] if args is None else args)
    return MoEMTLCLI(
        MoEMultiTaskModule,
        MultiTaskDataModule,
        # a requeued job writes config.yaml into the same run folder again
        save_config_kwargs={"overwrite": True},
        # the batch samplers shard by rank themselves
        trainer_defaults={"use_distributed_sampler": False},
        auto_configure_optimizers=False,
        parser_kwargs={"description": __doc__},
        args=None if args is None else list(args),
    )


def upcycle(dense: str, output: str, moe: MoEOptions) -> MoEBartForConditionalGeneration:
    """Upcycle the dense BART `dense` with the options `moe` and save the MoE-BART to `output`."""
    model = MoEBartForConditionalGeneration.from_dense(dense, **vars(moe))
    model.save_pretrained(output)
    return model


def build_upcycle_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="moe-mtl upcycle", description=upcycle.__doc__)
    parser.add_argument("--dense", required=True, help="dense BART: hub name (online) or local folder")
    parser.add_argument("--output", required=True, help="folder the MoE-BART is saved to")
    parser.add_argument("--config", action="config", help="YAML file with any of these options")
    parser.add_class_arguments(MoEOptions, "moe")
    return parser


def run_upcycle(args: Sequence[str]) -> MoEBartForConditionalGeneration:
    parser = build_upcycle_parser()
    config = parser.parse_args(list(args))
    try:
        options = parser.instantiate(config)
        model = upcycle(options.dense, options.output, options.moe)
    except ValueError as err:  # a bad option value: a usage error, not a traceback
        parser.error(str(err))
    layers = ", ".join(model.routed_layer_names)
    print(f"saved MoE-BART ({model.moe_options.num_experts} experts; routed: {layers}) to {options.output}")
    return model


# subcommands of their own (not LightningCLI's): name → runner of the remaining arguments
COMMANDS: dict[str, Callable[[Sequence[str]], Any]] = {
    "upcycle": run_upcycle,
    "represent": run_represent,
    "analyze": run_analyze,
    "fewshot": lambda args: importlib.import_module("moe_mtl.experiments.fewshot").run_fewshot(args),
    "summarize": lambda args: importlib.import_module("moe_mtl.experiments.summary").run_summarize(args),
}


def main(args: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] and argv[0] in COMMANDS:
        read_option_docs(argv)  # run_lightning sets it for the Lightning commands
        COMMANDS[argv[0]](argv[1:])
    else:
        run_lightning(args)
