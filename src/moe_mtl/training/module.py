"""MoEMultiTaskModule: the sparse MoE-BART trained on many tasks at once, as one LightningModule."""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim.lr_scheduler import LambdaLR

from ..data import MODEL_INPUTS, load_tokenizer
from ..errors import UsageError
from ..evaluation.task_evaluation import EvaluationResult, TaskEvaluation, gather_predictions
from ..models import MoEOptions
from ..models.build import build_model, check_lengths, special_token_ids
from ..models.conversion import TASK_TABLE_KEY
from ..models.routing import SPARSE_SELECTIONS, route_table
from ..representations.files import configured_representations
from ..representations.unseen_routes import UnseenTasks
from ..runs import evaluation_stem, start_from_upstream, write_evaluation, write_predictions
from .callbacks.two_stage import fix_routes
from .distributed import require_unused_parameter_detection
from .losses import label_smoothed_nll, reinforce_surrogate, route_balance, sequence_nll
from .optim import build_param_groups
from .options import check_checkpoint_tasks, check_module_options, check_task_lists
from .schedules import WarmupLinearDecay, warmup_steps_for

log = logging.getLogger(__name__)


def step_seed(seed: int, step: int, micro_batch: int, rank: int) -> int:
    """The torch seed of one training micro-batch: a hash of the run's seed, the optimizer step, the micro-batch
    in the accumulation window and the rank, so the draws are fresh everywhere and a resume repeats them."""
    state = np.random.SeedSequence([seed % 2**64, step, micro_batch, rank]).generate_state(2, np.uint64)
    return int(state[0]) % 2**63


class MoEMultiTaskModule(LightningModule):
    """Multi-task training of a sparse MoE-BART with task-aware routing (Ye et al. 2022; Gupta et al. 2022).

    Training: label-smoothed NLL plus the weighted auxiliary (load-balancing) loss of token routing;
    AdamW with separate learning rates for backbone, router and task table, warmup then linear decay. The other jobs
    of a run are callbacks (`moe_mtl.training.callbacks`, always on in the `moe-mtl` command): per-group clipping,
    the NaN guard, expert-sparse updates, temperature annealing, two-stage training, preemption.
    Validation and test: loss, generation and each task's CrossFit metric, their average, per task in the logger
    and in a CSV and JSON file per evaluation. Predict: generated outputs per task as JSONL.

    What the model needs from the data (tasks, vocabulary, pad id, tokenizer) is linked from
    `MultiTaskDataModule` by the CLI; set it by hand only when using the module alone.

    Args:
        pretrained: A dense BART to upcycle (hub name or local folder, e.g. "facebook/bart-base": every expert
            starts as a copy of its layer), or a saved MoE-BART folder. None: a new BART of the `bart` sizes.
        bart: Sizes of a new BART (`BartConfig` fields: d_model, encoder_layers, …) over `SMALL_BART`.
        moe: How layers become experts and how tasks are routed (`num_tasks` is linked from the data); a
            `MoEOptions` or its dict form, kept in the hyper-parameters as a dict.
        task_names: Name per task id (linked).
        task_metrics: CrossFit metric per task id (linked).
        task_partitions: "train", "dev" or "test" per task id (linked); routing statistics use the "train" tasks.
        tokenizer_size: Tokens of the tokenizer (linked); a new model's vocabulary size.
        pad_token_id: Padding id of the tokenizer (linked).
        tokenizer_path: Tokenizer name or folder (linked), loaded to decode generated outputs.
        max_target_length: Most tokens to generate (linked from the data's maximum target length).
        max_input_length: Longest input in tokens (linked from the data); with `max_target_length`, checked against
            the model's positions when the module is built, before any data is prepared.
        label_smoothing: ε of the label-smoothed training loss.
        aux_loss_weight: Weight of the token-routing load-balancing loss in the training loss.
        lr: Learning rate of the backbone (experts and every other BART weight).
        router_lr: Learning rate of the router networks and token gates.
        task_lr: Learning rate of the task table.
        two_speed_lr: Ye et al.'s two learning-rate speeds: router and task table train at `router_lr` and
            `task_lr`, faster than the experts (released: 1e-3 and 1e-2 vs 1e-5, INK-USC/CrossTaskMoE
            example_scripts/train_routing_bart.sh). False (the ablation): every group at `lr`.
        route_balance_weight: Weight of the task-level balance term while routes are learned (stage one):
            KL(mean route of the seen tasks ‖ uniform) per routed layer, from softmax(router logits) over the
            whole task table, so that tasks spread over the experts instead of sharing the expert that every
            task's gradient favours; 0: off (the paper has no such term).
        weight_decay: AdamW weight decay of matrices (none on biases and LayerNorm weights).
        betas: AdamW betas.
        warmup: Warmup before the linear decay: a fraction of the training steps if below 1, else a step count.
        num_beams: Beams of generation in validation, test and predict.
        results_dir: Folder of evaluation files, route tables and predictions; None: the logger's run folder.
        init_from: Start from the weights of an upstream `moe-mtl fit` run: its Lightning checkpoint (.ckpt), or its
            run folder (its single checkpoints/best-step*.ckpt, else checkpoints/last.ckpt). Not a resume: the
            optimizer, step counter and lr schedule are new. The architecture (bart sizes, pretrained, MoE shape
            options) is the upstream run's; the configured non-shape MoE options apply. Task-table rows are mapped
            by task name: a task the upstream run trained on keeps its row, the others get `unseen_routes`. With
            `moe-mtl test` and no `--ckpt_path`, this is zero-shot evaluation.
        unseen_routes: Route of a task the upstream run did not train on (`init_from`): "representation" (its
            representation as its row, through the trained router), "nearest" (the row of the nearest trained task
            by cosine similarity of representations), "average" (uniform weights over experts), "random" (seeded by
            moe.route_seed: top_k random experts per routed layer), "learned" (a new row, the mean of the trained
            rows, trained on the task's data; the router is frozen). See `moe_mtl.representations.unseen_routes`.
        representation: Task representations of "representation" and "nearest": "text" or "fisher" (computed with
            the model's own encoder, cached in `<data output_dir>/representations`), or a representation file.
        finetune: Which weights train: "all", or "task_table" only (everything else frozen, e.g. with
            `unseen_routes: learned`).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        bart: dict[str, Any] | None = None,
        moe: MoEOptions = MoEOptions(),  # noqa: B008 (a frozen-by-convention default, copied by asdict)
        task_names: list[str] | None = None,
        task_metrics: list[str] | None = None,
        task_partitions: list[str] | None = None,
        tokenizer_size: int | None = None,
        pad_token_id: int | None = None,
        tokenizer_path: str | None = None,
        max_target_length: int = 64,
        max_input_length: int | None = None,
        label_smoothing: float = 0.1,
        aux_loss_weight: float = 0.01,
        lr: float = 1e-5,
        router_lr: float = 1e-3,
        task_lr: float = 1e-2,
        two_speed_lr: bool = True,
        route_balance_weight: float = 0.0,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup: float = 0.06,
        num_beams: int = 4,
        results_dir: str | None = None,
        init_from: str | None = None,
        unseen_routes: Literal["representation", "nearest", "average", "random", "learned"] = "nearest",
        representation: str = "text",
        finetune: Literal["all", "task_table"] = "all",
    ):
        super().__init__()
        check_module_options(locals())
        options = moe if isinstance(moe, MoEOptions) else MoEOptions.from_dict(moe)
        # hyper-parameters of plain types only: torch.load(weights_only=True), the default since torch 2.6,
        # refuses a pickled MoEOptions, so neither resuming nor `load_from_checkpoint` could read the checkpoint
        moe = asdict(options)
        # max_input_length is only checked here (the data module keeps it): as a hyper-parameter it would clash
        # with the data module's when the logger merges both and they differ (a module built without it)
        self.save_hyperparameters(ignore=["max_input_length"])
        self._tokenizer = None  # loaded on first use (`tokenizer`), here already for a new model's special ids
        self._unseen: UnseenTasks | None = None  # init_from: unseen tasks whose routes wait for the data (`setup`)
        self._relearned_routes: str | None = None  # init_from: a fit would learn the upstream's fixed routes again
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
            self.model, self._unseen, self._relearned_routes = start.model, start.unseen, start.relearned_routes
            self.hparams.update(start.architecture)  # the architecture in effect, as with `--ckpt_path`
        else:
            special = {}
            if pretrained is None:
                special = special_token_ids(self.tokenizer if tokenizer_path else None, pad_token_id)
            vectors = configured_representations(options, task_names)
            self.model = build_model(pretrained, bart, options, tokenizer_size, special, vectors)
        self.hparams["moe"] = asdict(self.model.moe_options)  # the options in effect (a saved MoE-BART's own)
        if finetune == "task_table":
            for name, param in self.model.named_parameters():
                param.requires_grad_(name == TASK_TABLE_KEY)
        num_tasks = self.model.task_table.num_tasks
        self.task_names = task_names or [f"task{i}" for i in range(num_tasks)]
        self.task_metrics = task_metrics or ["EM"] * num_tasks
        self.task_partitions = task_partitions or ["train"] * num_tasks
        check_task_lists(num_tasks, self.task_names, self.task_metrics, self.task_partitions)
        positions = self.model.config.max_position_embeddings
        check_lengths(positions, max_input_length=max_input_length, max_target_length=max_target_length)
        self.lr_schedule: WarmupLinearDecay | None = None
        # the routing state, saved with the weights (it is theirs: `load_from_checkpoint` restores it): 2 once the
        # routes are fixed (`enter_stage_two`), with {"routes", "switch_step"}
        self.stage = 1
        self.stage_info: dict[str, Any] = {}
        self.planned_switch_step: int | None = None  # stage two's first step, told by TwoStageTraining beforehand
        self._seed_base = 0  # set at fit start
        self._resumed_seed: int | None = None
        self._evaluation: TaskEvaluation | None = None  # of the running validation or test epoch
        self._predictions: list[dict[str, Any]] = []  # rows of the running predict epoch
        self._run_dir: Path | None = None  # set in `setup`
        # this step's gradient norms per group before clipping, left by `GroupGradientClipping` for the NaN guard's
        # finite check (`NanGuard`); empty without it
        self.pre_clip_grad_norms: dict[str, torch.Tensor] = {}
        self._checkpoint_step: int | None = None  # the global step of the checkpoint loaded, if any

    # --- routing state, read and changed by the callbacks -----------------------------------------

    @property
    def seen_tasks(self) -> list[int]:
        """Ids of the tasks trained on (partition "train")."""
        return [i for i, p in enumerate(self.task_partitions) if p == "train"]

    def route_table(self) -> torch.Tensor:
        """The model's current routes (T, L, E): `moe_mtl.models.routing.route_table`."""
        return route_table(self.model)

    def enter_stage_two(self, routes: Literal["argmax", "softmax"] = "argmax", temperature: float | None = None):
        """Fix the routes (Ye et al.'s second stage, `fix_routes`) and record it in the routing state. Returns the
        parameters frozen."""
        frozen = fix_routes(self.model, routes, temperature)
        self.stage = 2
        self.stage_info = {"routes": routes, "switch_step": self.trainer.global_step if self._trainer else 0}
        return frozen

    # --- starting from an upstream run (init_from) ------------------------------------------------

    def assign_unseen_routes(self, datamodule=None) -> None:
        """Give the unseen tasks of an `init_from` run the routes still due (`setup` calls it): those of
        computed representations ("text", "fisher"), which need the data module's tasks."""
        if self._unseen is not None:
            hp = self.hparams
            source, representation = hp.unseen_routes, hp.representation
            self._unseen.assign(self.model, source, representation, self.task_names, datamodule, self.tokenizer)
            self._unseen = None

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
        torch.manual_seed(step_seed(self._seed_base, self.trainer.global_step, micro, self.global_rank))

    def training_step(self, batch: dict[str, Any], batch_idx: int):
        out = self(batch)
        loss = label_smoothed_nll(out.logits, batch["labels"], self.hparams.label_smoothing)
        size = len(batch["task_ids"])
        if out.aux_loss is not None:
            loss = loss + self.hparams.aux_loss_weight * out.aux_loss
            self.log("train/aux_loss", out.aux_loss, batch_size=size)
        balance = self._route_balance()
        if balance is not None:
            loss = loss + self.hparams.route_balance_weight * balance
            self.log("train/route_balance", balance, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        if out.route_log_prob is not None:  # selection "reinforce": each example's routes scored by its own loss
            surrogate = reinforce_surrogate(out.route_log_prob, out.logits, batch["labels"], batch["task_ids"])
            loss = loss + surrogate
            self.log("train/reinforce_surrogate", surrogate, batch_size=size)
        if self.model.router is not None and self.model.router.learned:
            # only learned task routes have a τ and two stages: fixed routes are neither learned nor "stage one"
            self.log("train/temperature", self.model.router.temperature.float(), batch_size=size)
            self.log("train/stage", float(self.stage), batch_size=size)
        self._log_learning_rates(size)
        return loss

    def _log_learning_rates(self, batch_size: int) -> None:
        for group in self.trainer.optimizers[0].param_groups if self._trainer else []:
            if not group["name"].endswith("no_decay"):
                # what the step applies: a frozen group (router, task table in stage two) moves nothing
                applied = group["lr"] if any(p.requires_grad for p in group["params"]) else 0.0
                self.log(f"lr/{group['name']}", applied, batch_size=batch_size)

    def _route_balance(self) -> torch.Tensor | None:
        """The task-level balance term over every seen task's route (None: off, or routes not being learned)."""
        router = self.model.router
        if not self.hparams.route_balance_weight or router is None or not router.learned or router.frozen:
            return None
        tasks = torch.tensor(self.seen_tasks or range(self.model.task_table.num_tasks), device=self.device)
        return route_balance(router.logits(self.model.task_table(tasks)).softmax(-1))

    def setup(self, stage: str) -> None:
        # on every rank, here: `Trainer.log_dir` broadcasts, so reading it first in rank-0-only code hangs DDP
        self._run_dir = Path(self.hparams.results_dir or self.trainer.log_dir or self.trainer.default_root_dir)
        if stage == "fit" and self._relearned_routes:  # said at fit only: evaluation does not change routes
            rank_zero_warn(self._relearned_routes)
        # init_from: unseen routes that need the data's tasks (a checkpoint about to be loaded brings its own)
        if self._unseen is not None and not self.trainer.ckpt_path:
            self.assign_unseen_routes(datamodule=getattr(self.trainer, "datamodule", None))

    def on_train_start(self) -> None:
        # after every restore (FSDP and DeepSpeed restore after `on_fit_start`): the checkpoint's seed when resuming,
        # else the run's (`seed_everything`; rank 0's, so all ranks agree even without it)
        seed = self._resumed_seed
        if seed is None:
            seed = self.trainer.strategy.broadcast(torch.initial_seed(), src=0)
        elif seed != torch.initial_seed():
            rank_zero_info(f"resumed: random draws continue the checkpoint's seed {seed}, not {torch.initial_seed()}")
        self._seed_base = int(seed)
        self._resumed_seed = None

    def on_train_end(self) -> None:
        self._checkpoint_step = None  # the weights are now the fit's own, at the trainer's step

    def on_fit_start(self) -> None:
        # here, not in `setup`: the routes of a run resumed in stage two are restored only after `setup`
        options, router = self.model.moe_options, self.model.router
        if options.routing == "token":
            require_unused_parameter_detection(self.trainer, "token routing sends a rank's tokens to some experts")
        elif options.routes in ("random", "given") or router.selection in ("argmax", *SPARSE_SELECTIONS):
            hard = f"{router.selection} selection" if options.routes == "learned" else f"{options.routes} routes"
            require_unused_parameter_detection(self.trainer, f"routes are hard ({hard}), unchosen experts idle")
        elif options.routes == "average" and not options.freeze_task_table:
            require_unused_parameter_detection(self.trainer, "average routes leave the task table unused")

    def configure_optimizers(self):
        hp = self.hparams
        lrs = {"backbone": hp.lr, "router": hp.router_lr, "task_table": hp.task_lr}
        if not hp.two_speed_lr:  # the ablation: routing learns at the experts' speed
            lrs = dict.fromkeys(lrs, hp.lr)
        groups = build_param_groups(self.model, lrs, hp.weight_decay)
        # fused on the CPU: one vectorised kernel for every tensor, ~4x faster than torch's CPU default (a Python
        # loop per tensor); about a tenth of a quick-start step. Not under mixed precision: a fused optimizer
        # unscales 16-mixed grads itself, after `GroupGradientClipping` would have read them scaled, and Lightning's
        # mixed-precision plugin (bf16 too) refuses `gradient_clip_val` with it. Elsewhere torch's default (foreach)
        on_cpu = all(param.device.type == "cpu" for group in groups for param in group["params"])
        mixed = isinstance(self.trainer.precision_plugin, MixedPrecision)
        fused = True if on_cpu and not mixed else None
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), fused=fused)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        self.lr_schedule = WarmupLinearDecay(warmup_steps_for(hp.warmup, total), total)
        scheduler = LambdaLR(optimizer, self.lr_schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def restart_lr_schedule(self, start_step: int | None = None, total_steps: int | None = None) -> None:
        """Start a new warmup and linear decay at `start_step` (default: now) lasting `total_steps` (default: the
        remaining steps); a training stage of its own, as in the paper's two stages."""
        if self.lr_schedule is None:
            return
        start = self.trainer.global_step if start_step is None else start_step
        total = total_steps or max(1, int(self.trainer.estimated_stepping_batches) - start)
        self.lr_schedule.restart(start, total, warmup_steps_for(self.hparams.warmup, total))
        for config in self.trainer.lr_scheduler_configs:  # this step's lr was set already: recompute it
            # `LRScheduler.step` computes the lr of step `last_epoch + 1`, sets it and what `get_last_lr()` reports
            config.scheduler.last_epoch -= 1
            with warnings.catch_warnings():  # at fit start no optimizer step has run yet, which it would warn about
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step()`", UserWarning)
                config.scheduler.step()

    # --- checkpoints ------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["moe_mtl"] = {
            "stage": self.stage,
            "stage_info": self.stage_info,
            "seed": self._seed_base,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # runs before the weights load: re-fix stage-two routes so the run goes on in stage two
        check_checkpoint_tasks(checkpoint.get("hyper_parameters", {}).get("task_names"), self.task_names)
        state = checkpoint.get("moe_mtl", {})
        if state.get("stage") == 2:
            self.enter_stage_two(state["stage_info"]["routes"])
            self.stage_info = state["stage_info"]
        self._resumed_seed = state.get("seed")  # the resumed run keeps drawing the original run's numbers
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
        ids = self.model.generate(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            task_ids=batch["task_ids"],
            num_beams=self.hparams.num_beams,
            max_new_tokens=self.hparams.max_target_length,
        )
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    def _evaluation_step(self, batch: dict[str, Any]) -> None:
        nll, tokens = sequence_nll(self(batch).logits, batch["labels"])
        self._evaluation.add(
            batch["task_ids"], nll, tokens, batch["example_ids"].tolist(), self.generate(batch), batch["references"]
        )

    def _evaluation_end(self, stage: str) -> EvaluationResult:
        strategy = self.trainer.strategy
        result = self._evaluation.finish(
            stage,
            lambda sums: strategy.reduce(sums, reduce_op="sum"),
            self.task_names,
            self.task_metrics,
            self.task_partitions,
        )
        self._evaluation = None
        # every rank holds the same gathered values: synced by max, which leaves them exact and tells Lightning they
        # are (it warns once per key otherwise, ~70 warnings under DDP). (No "step" metric to move the point in
        # TensorBoard: ModelCheckpoint would take it for the step in its file names.)
        self.log_dict(result.metrics, batch_size=1, sync_dist=True, reduce_fx="max")
        if not self.trainer.sanity_checking and self.trainer.is_global_zero:
            ckpt_path = self.trainer.ckpt_path if self.trainer.state.fn != "fit" else None
            step = self.model_step
            stem = evaluation_stem(self.run_dir / "evaluation", stage, self.current_epoch, step, ckpt_path)
            write_evaluation(stem, result, self.current_epoch, step)
        return result

    @property
    def run_dir(self) -> Path:
        """Where evaluation files, route tables and predictions go: `results_dir`, else the logger's run folder.

        Resolved in `setup` on every rank, so that rank-0-only writers need no collective."""
        if self._run_dir is None:
            raise RuntimeError("`run_dir` is known once the Trainer has called `setup` on this module")
        return self._run_dir

    def on_validation_epoch_start(self) -> None:
        self._evaluation = TaskEvaluation(self.model.task_table.num_tasks, self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluation_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._evaluation_end("val")

    def on_test_epoch_start(self) -> None:
        self._evaluation = TaskEvaluation(self.model.task_table.num_tasks, self.device)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluation_step(batch)

    def on_test_epoch_end(self) -> None:
        self._evaluation_end("test")

    # --- predict ----------------------------------------------------------------------------------

    def on_predict_epoch_start(self) -> None:
        self._predictions = []

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        inputs = self.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
        rows = [
            {
                "task": self.task_names[task],
                "example_id": example,
                "input": text,
                "prediction": prediction,
                "references": list(references),
            }
            for task, example, text, prediction, references in zip(
                batch["task_ids"].tolist(),
                batch["example_ids"].tolist(),
                inputs,
                self.generate(batch),
                batch["references"],
                strict=True,
            )
        ]
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
        log.info("wrote predictions of %d tasks to %s", len(by_task), folder)


__all__ = ["MoEMultiTaskModule", "step_seed"]
