"""MoEMultiTaskModule: the sparse MoE-BART trained on many tasks at once, as one LightningModule."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim.lr_scheduler import LambdaLR

from ..data import MODEL_INPUTS, load_tokenizer
from ..errors import UsageError
from ..evaluation.task_evaluation import EvaluationResult, TaskEvaluation, gather_predictions, prediction_rows
from ..models import MoEOptions
from ..models.build import check_lengths
from ..models.compilation import compile_layers
from ..models.routing import route_table
from ..representations.unseen_routes import UnseenTasks
from ..runs import evaluation_stem, start_run_model, write_evaluation, write_predictions
from .distributed import check_unused_parameters
from .losses import label_smoothed_nll, reinforce_surrogate, sequence_nll, task_route_balance
from .optim import applied_learning_rates, build_optimizer
from .options import (
    OPTION_GROUPS,
    EvaluationOptions,
    LossOptions,
    OptimizationOptions,
    TransferOptions,
    check_checkpoint_tasks,
    module_options,
    task_lists,
)
from .schedules import StepSeeds, WarmupLinearDecay, warmup_steps_for

log = logging.getLogger(__name__)


class MoEMultiTaskModule(LightningModule):
    """Multi-task training of a sparse MoE-BART with task-aware routing (Ye et al. 2022; Gupta et al. 2022): the
    Lightning loop. Option groups document their fields (`training.options`); the other jobs of a run are callbacks
    (`training.callbacks`). The CLI links what the model needs from the data (task_names, …, max_input_length).

    Args:
        pretrained: A dense BART to upcycle (hub name or local folder, e.g. "facebook/bart-base": every expert
            starts as a copy of its layer), or a saved MoE-BART folder. None: a new BART of the `bart` sizes.
        bart: Sizes of a new BART (`BartConfig` fields: d_model, encoder_layers, …) over `SMALL_BART`.
        moe: How layers become experts and how tasks are routed (`num_tasks` is linked from the data).
        optim: Learning rates, AdamW and the warmup/decay schedule.
        loss: The training loss's label smoothing and auxiliary weights.
        evaluation: Generation and result files of validation, test and predict.
        transfer: Starting from an upstream run's weights (`init_from`), and which weights train.
        compile: torch.compile each BART layer and expert of the model (`models.compilation`) for the training and
            evaluation forwards, with dynamic shapes (a new batch or padded length does not recompile); generation
            stays eager. Off by default: on a 2-core CPU it measured no faster than eager (docs/performance.md).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        bart: dict[str, Any] | None = None,
        # dataclasses (or dicts), saved as dicts: torch.load(weights_only=True), the default since torch 2.6,
        # refuses pickled dataclasses. (Frozen-by-convention defaults, copied by asdict.)
        moe: MoEOptions = MoEOptions(),  # noqa: B008
        optim: OptimizationOptions = OptimizationOptions(),  # noqa: B008
        loss: LossOptions = LossOptions(),  # noqa: B008
        evaluation: EvaluationOptions = EvaluationOptions(),  # noqa: B008
        transfer: TransferOptions = TransferOptions(),  # noqa: B008
        task_names: list[str] | None = None,
        task_metrics: list[str] | None = None,
        task_partitions: list[str] | None = None,
        tokenizer_size: int | None = None,
        pad_token_id: int | None = None,
        tokenizer_path: str | None = None,
        max_target_length: int = 64,
        max_input_length: int | None = None,
        compile: bool = False,
    ):
        super().__init__()
        options = moe if isinstance(moe, MoEOptions) else MoEOptions.from_dict(moe)
        groups = module_options(options, optim=optim, loss=loss, evaluation=evaluation, transfer=transfer)
        self.optim, self.loss, self.evaluation, self.transfer = (groups[group] for group in OPTION_GROUPS)
        # max_input_length is only checked here (the data module keeps it): as a hyper-parameter it would clash
        # with the data module's when the logger merges both and they differ (a module built without it)
        self.save_hyperparameters(ignore=["max_input_length"])
        self.hparams.update({group: asdict(value) for group, value in groups.items()})
        self._tokenizer = None  # loaded on first use (`tokenizer`), here already for a new model's special ids
        start = start_run_model(
            options,
            task_names,
            pretrained=pretrained,
            bart=bart,
            tokenizer_size=tokenizer_size,
            pad_token_id=pad_token_id,
            tokenizer=(lambda: self.tokenizer) if tokenizer_path else None,
            **asdict(self.transfer),
        )
        self.model = start.model
        self._unseen: UnseenTasks | None = start.unseen  # init_from: unseen tasks whose routes wait for the data
        self._relearned_routes = start.relearned_routes  # init_from: a fit would learn the upstream's fixed routes
        self.hparams.update(start.architecture)  # an upstream run's architecture in effect, as with `--ckpt_path`
        self.hparams["moe"] = asdict(self.model.moe_options)  # the options in effect (a saved MoE-BART's own)
        num_tasks = self.model.task_table.num_tasks
        lists = task_lists(num_tasks, task_names, task_metrics, task_partitions)
        self.task_names, self.task_metrics, self.task_partitions = lists
        positions = self.model.config.max_position_embeddings
        check_lengths(positions, max_input_length=max_input_length, max_target_length=max_target_length)
        self.lr_schedule: WarmupLinearDecay | None = None
        self._seeds = StepSeeds()
        self._epoch_evaluation: TaskEvaluation | None = None  # of the running validation or test epoch
        self._predictions: list[dict[str, Any]] = []  # rows of the running predict epoch
        self._run_dir: Path | None = None  # set in `setup`
        # this step's gradient norms per group before clipping, left by `GroupGradientClipping` for the NaN guard's
        # finite check (`NanGuard`); empty without it
        self.pre_clip_grad_norms: dict[str, torch.Tensor] = {}
        self._checkpoint_step: int | None = None  # the global step of the checkpoint loaded, if any
        # for the command's end-of-run summary: the newest evaluation, its files' path without suffix and its step;
        # the newest predictions' folder and rows per task
        self.last_evaluation: tuple[EvaluationResult, Path, int] | None = None
        self.last_predictions: tuple[Path, dict[str, int]] | None = None
        self._compiled = False

    # --- routing, read by the callbacks ---------------------------------------------------------------

    @property
    def seen_tasks(self) -> list[int]:
        """Ids of the tasks trained on (partition "train")."""
        return [i for i, p in enumerate(self.task_partitions) if p == "train"]

    def route_table(self) -> torch.Tensor:
        """The model's current routes (T, L, E): `moe_mtl.models.routing.route_table`."""
        return route_table(self.model)

    # --- training ---------------------------------------------------------------------------------

    def forward(self, batch: dict[str, Any]):
        """The model's outputs for a batch (teacher forcing on `labels`; the loss is computed by the caller)."""
        inputs = {key: batch[key] for key in MODEL_INPUTS if key != "labels"}
        decoder_input_ids = self.model.prepare_decoder_input_ids_from_labels(batch["labels"])
        return self.model(**inputs, decoder_input_ids=decoder_input_ids)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # the random draws of a step (Gumbel noise, dropout) depend only on the run's seed and the step, so a run
        # resumed from any checkpoint (mid-epoch or at an epoch end) continues exactly as an uninterrupted one
        micro = batch_idx % self.trainer.accumulate_grad_batches
        self._seeds.seed(self.trainer.global_step, micro, self.global_rank)

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        out = self(batch)
        loss = label_smoothed_nll(out.logits, batch["labels"], self.loss.label_smoothing)
        size = len(batch["task_ids"])
        if out.aux_loss is not None:
            loss = loss + self.loss.aux_loss_weight * out.aux_loss
            self.log("train/aux_loss", out.aux_loss, batch_size=size)
        # the task-level balance term over every seen task's route (None: routes not being learned)
        balance = task_route_balance(self.model, self.seen_tasks) if self.loss.route_balance_weight else None
        if balance is not None:
            loss = loss + self.loss.route_balance_weight * balance
            self.log("train/route_balance", balance, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        if out.route_log_prob is not None:  # selection "reinforce": each example's routes scored by its own loss
            surrogate = reinforce_surrogate(out.route_log_prob, out.logits, batch["labels"], batch["task_ids"])
            loss = loss + surrogate
            self.log("train/reinforce_surrogate", surrogate, batch_size=size)
        if self.model.router is not None and self.model.router.learned:
            # only learned task routes have a τ (TwoStageTraining logs their stage)
            self.log("train/temperature", self.model.router.temperature.float(), batch_size=size)
        if self._trainer is not None:
            lrs = applied_learning_rates(self.trainer.optimizers[0])
            self.log_dict({f"lr/{name}": lr for name, lr in lrs.items()}, batch_size=size)
        return loss

    def setup(self, stage: str) -> None:
        # on every rank, here: `Trainer.log_dir` broadcasts, so reading it first in rank-0-only code hangs DDP
        self._run_dir = Path(self.evaluation.results_dir or self.trainer.log_dir or self.trainer.default_root_dir)
        if stage == "fit" and self._relearned_routes:  # said at fit only: evaluation does not change routes
            rank_zero_warn(self._relearned_routes)
        # init_from: unseen routes that need the data's tasks (a checkpoint about to be loaded brings its own)
        if self._unseen is not None and not self.trainer.ckpt_path:
            source, representation = self.transfer.unseen_routes, self.transfer.representation
            data = getattr(self.trainer, "datamodule", None)
            self._unseen.assign(self.model, source, representation, self.task_names, data, self.tokenizer)
            self._unseen = None

    def configure_model(self) -> None:
        # Lightning calls it in every verb's setup, once the module is on its strategy's device
        if self.hparams.compile and not self._compiled:
            compile_layers(self.model)
            self._compiled = True

    def on_train_start(self) -> None:
        self._seeds.start(self.trainer.strategy)  # after every restore (FSDP and DeepSpeed restore after fit start)

    def on_train_end(self) -> None:
        self._checkpoint_step = None  # the weights are now the fit's own, at the trainer's step

    def on_fit_start(self) -> None:
        check_unused_parameters(self.trainer, self.model)  # here, not in `setup`: see its docstring

    def configure_optimizers(self):
        optim, mixed = self.optim, isinstance(self.trainer.precision_plugin, MixedPrecision)
        optimizer = build_optimizer(self.model, optim.learning_rates(), optim.weight_decay, optim.betas, mixed)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if optim.warmup >= 1 and optim.warmup > total:  # the schedule would only warm up, never decay
            rank_zero_warn(
                f"model option `optim.warmup` is {optim.warmup:g} steps, longer than the run's {total}: the learning "
                "rate warms up over the whole run and never decays; give fewer steps, or a fraction (0.06: 6 %)"
            )
        self.lr_schedule = WarmupLinearDecay(warmup_steps_for(optim.warmup, total), total)
        scheduler = LambdaLR(optimizer, self.lr_schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- checkpoints ------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["moe_mtl"] = {"seed": self._seeds.base}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_tasks(checkpoint.get("hyper_parameters", {}).get("task_names"), self.task_names)
        # the resumed run keeps drawing the original run's numbers (TwoStageTraining restores the stage)
        self._seeds.resumed = checkpoint.get("moe_mtl", {}).get("seed")
        self._checkpoint_step = int(checkpoint.get("global_step", 0))

    @property
    def model_step(self) -> int:
        """The training step of the weights in use: the trainer's while fitting, else the loaded checkpoint's (the
        trainer counts 0 in `validate`, `test` and `predict`, which do not restore the training state)."""
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if fitting or self._checkpoint_step is None:
            return self.trainer.global_step if self._trainer is not None else 0
        return self._checkpoint_step

    # --- evaluation -------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.hparams.tokenizer_path is None:
                raise UsageError("decoding generated outputs needs `tokenizer_path` (linked from the data by the CLI)")
            self._tokenizer = load_tokenizer(self.hparams.tokenizer_path)
        return self._tokenizer

    @torch.no_grad()
    def generate(self, batch: dict[str, Any]) -> list[str]:
        """Generated output text per example (beam search, `num_beams`)."""
        # eager even where the layers are compiled: the key/value cache changes Python state at every step
        with torch.compiler.set_stance("force_eager"):
            ids = self.model.generate(
                batch["input_ids"],
                attention_mask=batch["attention_mask"],
                task_ids=batch["task_ids"],
                num_beams=self.evaluation.num_beams,
                max_new_tokens=self.hparams.max_target_length,
            )
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def on_validation_epoch_start(self) -> None:
        self._epoch_evaluation = TaskEvaluation(self.model.task_table.num_tasks, self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        nll, tokens = sequence_nll(self(batch).logits, batch["labels"])
        self._epoch_evaluation.add(
            batch["task_ids"], nll, tokens, batch["example_ids"].tolist(), self.generate(batch), batch["references"]
        )

    def _evaluation_end(self, stage: str) -> EvaluationResult:
        strategy = self.trainer.strategy
        result = self._epoch_evaluation.finish(
            stage,
            lambda sums: strategy.reduce(sums, reduce_op="sum"),
            self.task_names,
            self.task_metrics,
            self.task_partitions,
        )
        self._epoch_evaluation = None
        # every rank holds the same gathered values: synced by max, which leaves them exact and tells Lightning they
        # are (it warns once per key otherwise, ~70 warnings under DDP). A logged "step" is the loggers' step for
        # them: the weights' (Lightning's own is its batch counter, one behind the global step in fit, 0 otherwise)
        step = self.model_step
        self.log_dict({**result.metrics, "step": float(step)}, batch_size=1, sync_dist=True, reduce_fx="max")
        if not self.trainer.sanity_checking:
            ckpt_path = self.trainer.ckpt_path if self.trainer.state.fn != "fit" else None
            stem = evaluation_stem(self.run_dir / "evaluation", stage, self.current_epoch, step, ckpt_path)
            if self.trainer.is_global_zero:
                write_evaluation(stem, result, self.current_epoch, step)
            self.last_evaluation = (result, stem, step)
        return result

    @property
    def run_dir(self) -> Path:
        """Where evaluation files, route tables and predictions go: `results_dir`, else the logger's run folder.

        Resolved in `setup` on every rank, so that rank-0-only writers need no collective."""
        if self._run_dir is None:
            raise RuntimeError("`run_dir` is known once the Trainer has called `setup` on this module")
        return self._run_dir

    def on_validation_epoch_end(self) -> None:
        self._evaluation_end("val")

    def on_validation_end(self) -> None:
        # after the ModelCheckpoints (callbacks' hooks run first): left in the callback metrics, the "step" logged
        # with the scores would name the step checkpoints saved before the next validation (ModelCheckpoint reads it)
        self.trainer.callback_metrics.pop("step", None)

    def on_test_epoch_end(self) -> None:
        self._evaluation_end("test")

    on_test_epoch_start, test_step = on_validation_epoch_start, validation_step  # the same per-task evaluation

    # --- predict ----------------------------------------------------------------------------------

    def on_predict_epoch_start(self) -> None:
        self._predictions = []

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        inputs = self.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
        rows = prediction_rows(batch, inputs, self.generate(batch), self.task_names)
        self._predictions.extend(rows)
        return rows

    def on_predict_epoch_end(self) -> None:
        """Write `<run dir>/predictions/<task>.jsonl`, rows in example order, all ranks' rows gathered."""
        by_task = gather_predictions(self._predictions, self.device)
        self._predictions = []
        if not self.trainer.is_global_zero:
            return
        folder = self.run_dir / "predictions"
        write_predictions(folder, by_task)
        self.last_predictions = (folder, {task: len(rows) for task, rows in by_task.items()})
        log.info("wrote predictions of %d tasks to %s", len(by_task), folder)


__all__ = ["MoEMultiTaskModule"]
