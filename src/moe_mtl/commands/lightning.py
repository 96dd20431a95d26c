"""`moe-mtl fit | validate | test | predict`: LightningCLI over `MoEMultiTaskModule` and `MultiTaskDataModule`.

`moe-mtl fit --config configs/quickstart.yaml`: what the model needs from the data is linked, never repeated in
configs; the resolved config is saved with each run; checkpoints are selected by val/score (or val/loss). Every
option value that can be checked is checked before data preparation or training (docs/errors.md).
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..data import MultiTaskDataModule
from ..data.tasks import partition_list
from ..errors import UsageError
from ..models import MoEOptions
from ..models.build import check_lengths, model_positions
from ..models.config import SHAPE_OPTIONS, fixed_route_options
from ..ownership import first_process, run_folder_lock
from ..pretrained import check_pretrained
from ..representations.files import read_task_embeddings
from ..runs import (
    checkpoint_fixed_routes,
    checkpoint_run_folder,
    checkpoint_train_partitions,
    read_checkpoint,
    read_upstream,
    resume_mismatch,
    run_tokenizer_path,
)
from ..training import MoEMultiTaskModule
from ..training.callbacks import CALLBACK_GROUPS, TwoStageTraining
from ..training.distributed import check_unused_parameters
from ..training.options import OPTION_GROUPS, module_options
from . import check_config_files, read_option_docs
from .run_summary import evaluation_summary, fit_summary, predict_summary

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
# model options a checkpoint decides (the shape of its weights); the rest (evaluation, learning rates, …) stay as
# the command gives them, and the linked ones come from the data (the module checks the tasks match)
CHECKPOINT_OPTIONS = ("pretrained", "bart", "moe")
# of `moe`, those that shape the weights (the rest, e.g. top_k or capacity_factor, may change at test time)
CHECKPOINT_MOE_OPTIONS = SHAPE_OPTIONS
# `fit --ckpt_path` names Lightning resolves itself (a requeued job's `last` may not exist yet)
RESUME_NAMES = ("last", "best", "hpc", "registry")
# subcommands that evaluate weights without training them
EVALUATION_COMMANDS = ("validate", "test", "predict")
# loggers whose run folder is save_dir/name/version: pointed at the checkpoint's run for EVALUATION_COMMANDS
FOLDER_LOGGERS = ("TensorBoardLogger", "CSVLogger")
# which way is better for each selection metric (the paper selects by val/score: loss and score disagree)
SELECTION_MODES = {"val/score": "max", "val/loss": "min"}


class MoEMTLCLI(LightningCLI):
    """LightningCLI with the data → model links and checkpoint selection by val/score or val/loss."""

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        # the main parser and each verb's: a prefix must not pass for another option (`--trainer.max_step` for
        # max_steps, fewshot's `--seed` for `--seed_everything`)
        return super().init_parser(**{"allow_abbrev": False, **kwargs})

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for source, target in DATA_LINKS.items():
            parser.link_arguments(f"data.{source}", f"model.{target}", apply_on="instantiate")
        parser.link_arguments("data.max_target_length", "model.max_target_length")
        parser.link_arguments("data.max_input_length", "model.max_input_length")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")  # first: `--ckpt_path best` reads it
        # last.ckpt, the newest state at every validation, for resuming: a ModelCheckpoint of its own, because
        # `save_last` (Lightning 2.6) rewrites last.ckpt only when a new best is saved, so it could lag far behind
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        # step<N>.ckpt on a schedule of steps, whatever the monitor (a monitored ModelCheckpoint saves nothing until
        # the metric exists): off unless `--checkpoint.every_n_train_steps` or `--step_checkpoint.*` asks
        parser.add_lightning_class_args(ModelCheckpoint, "step_checkpoint")
        # groups, not `trainer.callbacks` items, so that one flag changes them: a list item cannot be addressed.
        # LightningCLI instantiates every group and adds it to the trainer's callbacks; off is a setting
        # (`--two_stage.switch_step null`; τ is left alone where routes are not learned)
        for group, callback in CALLBACK_GROUPS.items():
            parser.add_lightning_class_args(callback, group)
        parser.add_argument(
            "--allow_untrained",
            type=bool,
            default=False,
            help="validate / test / predict without --ckpt_path, --model.pretrained or --model.transfer.init_from: "
            "evaluate the untrained initial weights (refused otherwise)",
        )
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
                "step_checkpoint.monitor": None,
                "step_checkpoint.filename": "step{step}",
                "step_checkpoint.auto_insert_metric_name": False,
                "step_checkpoint.every_n_epochs": 0,
                "step_checkpoint.enable_version_counter": False,
            }
        )

    def _parse_ckpt_path(self) -> None:
        """With `--ckpt_path`, take the model's architecture options and fixed routes (stage two) from the checkpoint,
        as LightningCLI does, but only those: LightningCLI would also override evaluation options given on the
        command line (`--model.evaluation.num_beams`, `--model.evaluation.results_dir`) with the checkpoint's values,
        silently."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        self.ckpt_contents = None  # read once here: `_check_transfer` looks at it again
        if not ckpt_path or (subcommand == "fit" and ckpt_path in RESUME_NAMES):
            return
        checkpoint = self.ckpt_contents = read_checkpoint(ckpt_path)  # tensors memory-mapped, not loaded
        hparams = checkpoint.get("hyper_parameters", {})
        kept = {key: hparams[key] for key in CHECKPOINT_OPTIONS if key in hparams}
        if "moe" in kept:
            kept["moe"] = {key: value for key, value in kept["moe"].items() if key in CHECKPOINT_MOE_OPTIONS}
            routes = checkpoint_fixed_routes(checkpoint)  # stage two's routes: the weights were trained with them
            kept["moe"].update(fixed_route_options(routes) if routes is not None else {})
        if kept:
            try:
                self.config = self.parser.parse_object({subcommand: {"model": kept}}, self.config)
            except SystemExit:
                sys.stderr.write(f"Parsing the model options saved in {ckpt_path} failed\n")
                raise

    def before_instantiate_classes(self) -> None:
        """Every value that can be checked before data preparation or training; then the settings that follow from
        the options (step checkpoints, the output folder of an evaluated checkpoint)."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        monitor, mode = config.checkpoint.monitor, config.checkpoint.mode
        # a ValueError raised here is a usage error: `main` prints its one line and exits 2
        if monitor in SELECTION_MODES and mode != SELECTION_MODES[monitor]:
            raise UsageError(
                f"checkpoint.monitor is {monitor!r} with checkpoint.mode {mode!r}; "
                f"use checkpoint.mode {SELECTION_MODES[monitor]!r} (higher score, lower loss is better)"
            )
        for item in listed_callbacks(config):
            class_path = getattr(item, "class_path", None)
            group = callback_group(class_path)
            if group is not None:
                raise UsageError(
                    f"trainer.callbacks lists {class_path}, which the `{group}` group already adds (it is always "
                    f"on): it would run twice. Move its init_args to `{group}:` (YAML) or `--{group}.*` flags and "
                    "drop it from trainer.callbacks"
                )
        if config.checkpoint.save_last:
            raise UsageError(
                f"checkpoint.save_last is {config.checkpoint.save_last!r}; leave it false: last.ckpt is written at "
                "every validation by `last_checkpoint` (checkpoint.save_last would keep a stale copy beside it)"
            )
        if config.checkpoint.save_on_exception:
            raise UsageError(
                "checkpoint.save_on_exception is true; leave it false: it would name its file like a best "
                "checkpoint, and save mid-step states. SIGTERM, SIGINT and SIGUSR1 save "
                "checkpoints/preempted-step<N>.ckpt at a step boundary (`preemption.*`)"
            )
        if self.subcommand == "fit":
            for option in ("max_steps", "max_epochs"):
                if config.trainer.get(option) == 0:
                    raise UsageError(
                        f"trainer.{option} is 0: nothing would be trained; give a number > 0 (or -1: no limit)"
                    )
        self._check_output_folders(config)
        self._check_model_options(config)
        self._add_progress_bar(config)
        self._schedule_step_checkpoints(config)
        if self.subcommand in EVALUATION_COMMANDS:
            self._evaluate_beside_checkpoint(config)
        self._check_transfer(config)
        if self.subcommand == "fit":
            self._resume_in_its_run(config)
        else:
            self._test_what_was_trained(config)

    @staticmethod
    def _check_model_options(config) -> None:
        """What the module, its MoE options, the callback groups and the model's positions check when built, now:
        LightningCLI builds them after the data module has prepared the data (the model's vocabulary is the data's)."""
        for option, part in (("model.pretrained", "model"), ("data.tokenizer", "tokenizer")):
            check_pretrained(config.get(option), f"--{option}", part)
        check_pretrained(config.two_stage.get("reinit_experts_from"), "--two_stage.reinit_experts_from")
        model = config.model.as_dict()
        module_options(**{group: model.get(group) for group in ("moe", *OPTION_GROUPS)})
        moe = {key: value for key, value in (model.get("moe") or {}).items() if key != "num_tasks"}  # linked
        options = MoEOptions.from_dict(moe)
        if options.task_embeddings is not None:
            read_task_embeddings(options.task_embeddings, None)
        for group, callback in CALLBACK_GROUPS.items():  # built again later (cheap, no side effects): their checks
            callback(**config[group].as_dict())
        # (an upstream run brings its own architecture: checked when built)
        if not config.get("model.transfer.init_from"):
            try:
                positions = model_positions(config.model.get("pretrained"), config.model.get("bart"))
            except OSError:  # a hub name offline, a folder without config.json: building the model says which
                positions = None
            if positions is not None:
                lengths = {option: config.data.get(option) for option in ("max_input_length", "max_target_length")}
                check_lengths(positions, **lengths)

    @staticmethod
    def _add_progress_bar(config) -> None:
        """`StepProgressBar` in place of Lightning's default rich bar (which reads "Epoch 0/-2" under `max_steps`),
        when the bar is on, rich is installed and no progress bar is configured."""
        callbacks = listed_callbacks(config)
        named = [getattr(item, "class_path", "") for item in callbacks]
        if config.trainer.enable_progress_bar is False or any("ProgressBar" in name for name in named):
            return
        if importlib.util.find_spec("rich") is None:  # Lightning's default is then the tqdm bar, which is right
            return
        progress = Namespace(class_path="moe_mtl.training.callbacks.StepProgressBar", init_args=Namespace())
        config.trainer.callbacks = [*callbacks, progress]

    @staticmethod
    def _check_output_folders(config) -> None:
        """The folders the command writes (results, logs, prepared data) can be written, checked before any work."""
        folders = {"trainer.default_root_dir": config.trainer.get("default_root_dir") or "."}
        logger = folder_logger(config)
        if logger is not None:
            folders["trainer.logger.init_args.save_dir"] = logger.init_args.save_dir
        for option in ("model.evaluation.results_dir", "data.output_dir"):
            value = config.get(option)
            if value:
                folders[option] = value
        for option, folder in folders.items():
            check_writable(Path(folder), option)

    @staticmethod
    def _schedule_step_checkpoints(config) -> None:
        """`checkpoint.every_n_train_steps` saves step<N>.ckpt on that schedule (`step_checkpoint`), whatever the
        monitor; `checkpoint` keeps choosing the best by its metric at validation."""
        steps = config.checkpoint.every_n_train_steps
        if not steps or config.checkpoint.monitor is None:
            return
        if config.step_checkpoint.every_n_train_steps not in (None, steps):
            raise UsageError(
                f"checkpoint.every_n_train_steps is {steps} and step_checkpoint.every_n_train_steps is "
                f"{config.step_checkpoint.every_n_train_steps}; give one of them"
            )
        config.step_checkpoint.every_n_train_steps = steps
        config.checkpoint.every_n_train_steps = None

    def _evaluate_beside_checkpoint(self, config) -> None:
        """validate / test / predict: refuse untrained weights unless asked for; with `--ckpt_path`, write into that
        checkpoint's run folder, under a folder named for it (`runs/x/version_0/best-step60/`)."""
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path:
            if not (config.model.get("pretrained") or config.get("model.transfer.init_from") or config.allow_untrained):
                raise UsageError(
                    f"{self.subcommand} has no weights to evaluate: give --ckpt_path (a checkpoint of `moe-mtl "
                    "fit`), --model.pretrained (a dense BART, zero-shot) or --model.transfer.init_from (an upstream "
                    "run); --allow_untrained true runs on the untrained initial weights"
                )
            return
        # the checkpoint's ModelCheckpoint states name its fit's folder, not this one's: nothing is saved here
        warnings.filterwarnings("ignore", "The dirpath has changed from", UserWarning)
        results_dir = config.get("model.evaluation.results_dir")
        if results_dir:  # an output folder the user chose: everything goes there, nothing beside the checkpoint
            folder = Path(results_dir)
        else:
            folder = checkpoint_run_folder(Path(ckpt_path)) / Path(ckpt_path).stem
            try:
                check_writable(folder, f"the folder beside --ckpt_path {ckpt_path}")
            except UsageError as error:
                raise UsageError(f"{error}, or choose one with --model.evaluation.results_dir") from None
        logger = folder_logger(config)
        if logger is not None:
            # the logger's folder is where `run_dir` (evaluation files, predictions) and config.yaml go
            logger.init_args.save_dir, logger.init_args.name = str(folder.parent), ""
            logger.init_args.version = folder.name
        elif config.trainer.logger in (None, True):
            config.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(save_dir=str(folder.parent), name="", version=folder.name),
            )
        else:  # no logger (or one without a folder): the module writes into `default_root_dir`
            config.trainer.default_root_dir = str(folder)

    def instantiate_classes(self) -> None:
        """As LightningCLI does; but a check that fails while the classes are built (the Trainer refusing its
        settings comes after the data module has trained and saved a tokenizer) leaves no folder it created."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._created = [new_folder(Path(folder)) for folder in (config.data.get("output_dir"),) if folder]
        try:
            super().instantiate_classes()
        except BaseException:
            self._remove_created()
            raise

    def _remove_created(self) -> None:
        for folder in self._created:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    def _run_subcommand(self, subcommand: str) -> None:
        """fit holds its run folder while it trains (`run_folder_lock`): a second fit of a folder in use is refused,
        and one whose version is left to the logger gets the next free folder, as the folder exists from now on."""
        if subcommand == "fit":  # refused by the strategy: before the run folder, the lock or the data exist
            try:
                check_unused_parameters(self.trainer, self.model.model)
                for callback in self.trainer.callbacks:
                    if isinstance(callback, TwoStageTraining):
                        callback.check_strategy(self.trainer, self.model.model)
            except UsageError:
                self._remove_created()
                raise
        # only a folder logger's log_dir is this run's own; another logger's save_dir may be shared by many runs
        folder_logged = type(self.trainer.logger).__name__ in FOLDER_LOGGERS
        log_dir = self.trainer.log_dir if subcommand == "fit" and first_process() and folder_logged else None
        if log_dir is None:
            return super()._run_subcommand(subcommand)
        with run_folder_lock(Path(log_dir)):
            return super()._run_subcommand(subcommand)

    # --- the end of each verb: a short summary (`run_summary`), once per job ------------------------------

    def _print_summary(self, lines: Sequence[str]) -> None:
        if self.trainer.is_global_zero:
            print("\n".join(lines), flush=True)

    def _config_files(self) -> list[str]:
        return [str(path) for path in self.config[self.subcommand].get("config") or []]

    def after_fit(self) -> None:
        self._print_summary(fit_summary(self.trainer, self.model, self._config_files()))

    def after_validate(self) -> None:
        self._print_summary(evaluation_summary("validate", self.trainer, self.model, self._config_files()))

    def after_test(self) -> None:
        self._print_summary(evaluation_summary("test", self.trainer, self.model, self._config_files()))

    def after_predict(self) -> None:
        self._print_summary(predict_summary(self.model))

    def _check_transfer(self, config) -> None:
        """`--model.transfer.init_from`: the data use the upstream run's tokenizer. `fit --ckpt_path` that is no
        resume (other tasks, or nothing left to train): a usage error pointing to `--model.transfer.init_from`."""
        ckpt_path = config.get("ckpt_path")
        if self.subcommand == "fit" and self.ckpt_contents is not None:
            why = resume_mismatch(self.ckpt_contents, config.data.as_dict(), config.trainer.max_steps)
            if why is not None:
                raise UsageError(
                    f"fit --ckpt_path {ckpt_path} resumes that run, but {why}. To train a new run from its weights "
                    f"(other tasks, few-shot), use --model.transfer.init_from {ckpt_path} without --ckpt_path"
                )
        if config.get("model.transfer.init_from"):
            upstream = read_upstream(config.model.transfer.init_from)
            config.data.tokenizer = run_tokenizer_path(upstream, config.data.tokenizer)

    def _resume_in_its_run(self, config) -> None:
        """`fit --ckpt_path <run>/checkpoints/x.ckpt` (a resume: `_check_transfer` refused any other) logs and saves
        into that run's folder, as the run it continues: the logger's own choice would be a new version_<n+1>."""
        ckpt_path, logger = config.get("ckpt_path"), folder_logger(config)
        if self.ckpt_contents is None or logger is None or Path(ckpt_path).parent.name != "checkpoints":
            return
        run = checkpoint_run_folder(Path(ckpt_path))
        logger.init_args.save_dir, logger.init_args.name, logger.init_args.version = str(run.parent), "", run.name

    def _test_what_was_trained(self, config) -> None:
        """test / predict of a checkpoint: `data.test_partitions` unset tests the partitions it trained on; tasks it
        never trained, routed by task-table rows nothing trained, are tested only with a loud warning."""
        if (
            self.ckpt_contents is None
            or self.subcommand not in ("test", "predict")
            or "test_partitions" not in config.data
        ):
            return
        trained = checkpoint_train_partitions(self.ckpt_contents)
        if config.data.test_partitions is None:
            config.data.test_partitions = trained
            rank_zero_info(
                f"{self.subcommand}: the tasks the checkpoint trained (data.test_partitions {trained}); its unseen "
                "tasks: --data.test_partitions test with --model.transfer.init_from <run> and "
                "--model.transfer.unseen_routes nearest (README: zero-shot)"
            )
            return
        untrained = [part for part in partition_list(config.data.test_partitions) if part not in trained]
        moe = (self.ckpt_contents.get("hyper_parameters") or {}).get("moe") or {}
        routed_by_task_rows = (moe.get("routing") == "token" or moe.get("routes") == "learned") and not moe.get(
            "task_embeddings"
        )
        if untrained and routed_by_task_rows and not config.get("model.transfer.init_from"):
            rank_zero_warn(
                f"{self.subcommand} of tasks the checkpoint never trained (data.test_partitions {untrained}; it "
                f"trained {trained}): they are routed by task-table rows nothing trained, so their scores mean "
                "nothing. Give their routes with --model.transfer.init_from <run> --model.transfer.unseen_routes "
                "nearest (or representation, average, random), or test the trained tasks (--data.test_partitions "
                f"{trained[0] if trained else 'train'})"
            )


def new_folder(folder: Path) -> Path | None:
    """The outermost folder that writing into `folder` would create (None: `folder` exists already)."""
    if folder.exists():
        return None
    while not folder.parent.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def listed_callbacks(config) -> list:
    """`trainer.callbacks` as a list (a config may give one callback, or none)."""
    listed = config.trainer.callbacks or []
    return listed if isinstance(listed, list) else [listed]


def folder_logger(config):
    """`trainer.logger` if it is one of `FOLDER_LOGGERS` (its run folder is save_dir/name/version), else None."""
    logger = config.trainer.logger
    return logger if getattr(logger, "class_path", "").rpartition(".")[2] in FOLDER_LOGGERS else None


def check_writable(folder: Path, option: str) -> None:
    """A ValueError naming `option` unless files can be created in `folder` (or in the folder that would hold it)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{option} is {folder}, but {existing} is a file, not a folder; give a folder to write into")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UsageError(
            f"{option} is {folder}, which cannot be written ({error.strerror}); give a writable folder"
        ) from None


def callback_group(class_path: str | None) -> str | None:
    """The `CALLBACK_GROUPS` group whose callback (or a subclass) `class_path` names, if any."""
    module, _, name = (class_path or "").rpartition(".")
    try:
        callback = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None  # not ours to judge: jsonargparse reports a class that cannot be imported
    return next((g for g, c in CALLBACK_GROUPS.items() if isinstance(callback, type) and issubclass(callback, c)), None)


def run_lightning(args: Sequence[str] | None = None) -> MoEMTLCLI:
    """fit / validate / test / predict through LightningCLI (`args` None: the command line)."""
    argv = sys.argv[1:] if args is None else args
    read_option_docs(argv)
    check_config_files(argv)
    if args is None:
        return build_cli(None)
    # given `args` (fewshot's cells, tests), LightningCLI warns at every run that the process's own command line is
    # not empty, though it is not read; sys.argv itself stays (a DDP launcher starts the other ranks with it)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "LightningCLI's args parameter is intended to run", UserWarning)
        return build_cli(list(args))


def build_cli(args: list[str] | None) -> MoEMTLCLI:
    return MoEMTLCLI(
        MoEMultiTaskModule,
        MultiTaskDataModule,
        # a requeued job writes config.yaml into the same run folder again
        save_config_kwargs={"overwrite": True},
        # the batch samplers shard by rank themselves
        trainer_defaults={"use_distributed_sampler": False},
        auto_configure_optimizers=False,
        parser_kwargs={"description": __doc__},
        args=args,
    )


def main(args: Sequence[str] | None = None) -> MoEMTLCLI:
    """Run the verb `args[0]` with its options `args[1:]` (None: the command line, which LightningCLI reads itself)."""
    return run_lightning(args)
