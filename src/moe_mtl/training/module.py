"""MoEMultiTaskModule: the sparse MoE-BART trained on many tasks at once, as one LightningModule."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim.lr_scheduler import LambdaLR

from ..data import METRICS, MODEL_INPUTS, PARTITIONS, load_tokenizer
from ..errors import UsageError
from ..evaluation.results import evaluation_stem, write_evaluation, write_predictions
from ..evaluation.task_evaluation import EvaluationResult, TaskEvaluation, gather_predictions
from ..models import MoEOptions
from ..models.build import build_model, check_lengths, special_token_ids
from ..models.routing import SPARSE_SELECTIONS, hard_top_k
from ..transfer.init_from import TASK_TABLE_KEY, build_from_upstream
from ..transfer.unseen_routes import UnseenTasks
from .losses import label_smoothed_nll, reinforce_surrogate, route_balance, sequence_nll
from .optim import build_param_groups, drop_unrouted_expert_grads, expert_usage, group_grad_norms
from .schedules import WarmupLinearDecay, warmup_steps_for

log = logging.getLogger(__name__)

STAGE_ROUTES = ("argmax", "softmax")
FINETUNE = ("all", "task_table")


def step_seed(seed: int, step: int, micro_batch: int, rank: int) -> int:
    """The torch seed of one training micro-batch: a hash of the run's seed, the optimizer step, the micro-batch
    in the accumulation window and the rank, so the draws are fresh everywhere and a resume repeats them."""
    state = np.random.SeedSequence([seed % 2**64, step, micro_batch, rank]).generate_state(2, np.uint64)
    return int(state[0]) % 2**63


NUMERIC_OPTIONS = {
    # 0 holds a group where it is (e.g. routes pinned while the experts train)
    "lr": (lambda v: v >= 0, "a learning rate >= 0"),
    "router_lr": (lambda v: v >= 0, "a learning rate >= 0"),
    "task_lr": (lambda v: v >= 0, "a learning rate >= 0"),
    "label_smoothing": (lambda v: 0 <= v < 1, "a value in [0, 1) (0: none; the paper's 0.1)"),
    "weight_decay": (lambda v: v >= 0, "a value >= 0"),
    "aux_loss_weight": (lambda v: v >= 0, "a weight >= 0"),
    "route_balance_weight": (lambda v: v >= 0, "a weight >= 0"),
    "warmup": (lambda v: v >= 0, "a fraction of the steps in [0, 1) or a step count >= 1"),
}


def check_module_options(options: Mapping[str, Any]) -> None:
    """The module's options that need no data or model, against what they allow: the CLI checks them before the data
    are prepared, the module when it is built (torch would say only "Invalid learning rate", at the first step)."""
    for name, (valid, allowed) in NUMERIC_OPTIONS.items():
        value = options.get(name)
        if value is not None and (not math.isfinite(value) or not valid(value)):
            raise UsageError(f"model option `{name}` is {value}; give {allowed}")
    betas = options.get("betas")
    if betas is not None and (len(betas) != 2 or not all(0 <= beta < 1 for beta in betas)):
        raise UsageError(f"model option `betas` is {list(betas)}; give two values in [0, 1), e.g. [0.9, 0.999]")
    if options.get("num_beams") is not None and options["num_beams"] < 1:
        raise UsageError(f"model option `num_beams` is {options['num_beams']}; it must be >= 1 (1: greedy decoding)")
    if options.get("nan_policy", "stop") not in ("stop", "skip"):
        raise UsageError(f"model option `nan_policy` is {options['nan_policy']!r}; allowed: 'stop', 'skip'")
    finetune = options.get("finetune", "all")
    if finetune not in FINETUNE:
        raise UsageError(f"model option `finetune` is {finetune!r}; allowed: {', '.join(map(repr, FINETUNE))}")
    moe = options.get("moe") or {}
    frozen_table = moe.freeze_task_table if isinstance(moe, MoEOptions) else moe.get("freeze_task_table", False)
    if finetune == "task_table" and frozen_table:
        raise UsageError(
            "model option `finetune` is 'task_table', but moe.freeze_task_table is true: nothing would train"
        )


def require_unused_parameter_detection(trainer, why: str) -> None:
    """DDP must be told that some parameters (experts, the task table) get no gradient in a step, or it stops
    with "Expected to have finished reduction in the prior iteration"."""
    strategy = trainer.strategy
    plain_ddp = isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)
    if plain_ddp and not strategy._ddp_kwargs.get("find_unused_parameters", False):
        raise UsageError(
            f"{why}, so some parameters get no gradient in a step; DDP needs to know: use trainer option "
            "`strategy: ddp_find_unused_parameters_true` (or DDPStrategy(find_unused_parameters=True))"
        )


class MoEMultiTaskModule(LightningModule):
    """Multi-task training of a sparse MoE-BART with task-aware routing (Ye et al. 2022; Gupta et al. 2022).

    Training: label-smoothed NLL plus the weighted auxiliary (load-balancing) loss of token routing;
    AdamW with separate learning rates for backbone, router and task table, warmup then linear decay (each group
    clipped to its own norm by the `GroupGradientClipping` callback); expert-sparse updates; a NaN policy.
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
        expert_sparse_updates: An expert that got zero routing weight from every example of the global
            batch (all ranks, all accumulated micro-batches) is left exactly as it is by the optimizer step.
        nan_policy: On a non-finite training loss, "stop" with an error naming the step and task, or "skip"
            the batch (on every rank) and count it.
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
            rows, trained on the task's data; the router is frozen). See `moe_mtl.transfer.unseen_routes`.
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
        expert_sparse_updates: bool = True,
        nan_policy: Literal["stop", "skip"] = "stop",
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
            start = build_from_upstream(
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
            self.model = build_model(pretrained, bart, options, tokenizer_size, special, task_names)
        self.hparams["moe"] = asdict(self.model.moe_options)  # the options in effect (a saved MoE-BART's own)
        if finetune == "task_table":
            for name, param in self.model.named_parameters():
                param.requires_grad_(name == TASK_TABLE_KEY)
        num_tasks = self.model.task_table.num_tasks
        self.task_names = task_names or [f"task{i}" for i in range(num_tasks)]
        self.task_metrics = task_metrics or ["EM"] * num_tasks
        self.task_partitions = task_partitions or ["train"] * num_tasks
        for option, values, allowed in (
            ("task_names", self.task_names, None),
            ("task_metrics", self.task_metrics, METRICS),
            ("task_partitions", self.task_partitions, PARTITIONS),
        ):
            if len(values) != num_tasks:
                raise UsageError(f"`{option}` names {len(values)} tasks; the model's task table has {num_tasks}")
            unknown = sorted(set(values) - set(allowed)) if allowed else []
            if unknown:  # found now rather than at the end of the first validation
                raise UsageError(f"`{option}` has {unknown}; allowed: {', '.join(map(repr, allowed))}")
        positions = self.model.config.max_position_embeddings
        check_lengths(positions, max_input_length=max_input_length, max_target_length=max_target_length)
        self.lr_schedule: WarmupLinearDecay | None = None
        self.stage = 1  # two-stage training: 2 once routes are fixed (see `enter_stage_two`)
        self.stage_info: dict[str, Any] = {}
        self.skipped_batches = 0
        self._used: torch.Tensor | None = None  # (L, E) experts used since the last optimizer step
        self._skip_step = False  # nan_policy "skip": a batch since the last optimizer step had a non-finite loss
        self._seed_base = 0  # set at fit start
        self._resumed_seed: int | None = None
        self._token_routes: dict[str, torch.Tensor] = {}  # token routing: per-task gate sums for `route_table`
        self._evaluation: TaskEvaluation | None = None  # of the running validation or test epoch
        self._predictions: list[dict[str, Any]] = []  # rows of the running predict epoch
        self._run_dir: Path | None = None  # set in `setup`
        # this step's gradient norms per group before clipping, left by `GroupGradientClipping` (its callback hook
        # runs just before ours) for the finite check; empty without it
        self.pre_clip_grad_norms: dict[str, torch.Tensor] = {}
        self._checkpoint_step: int | None = None  # the global step of the checkpoint loaded, if any

    # --- routing state, read and changed by the callbacks -----------------------------------------

    @property
    def seen_tasks(self) -> list[int]:
        """Ids of the tasks trained on (partition "train")."""
        return [i for i, p in enumerate(self.task_partitions) if p == "train"]

    @torch.no_grad()
    def route_table(self) -> torch.Tensor:
        """Current routes (T, L, E) as distributions, one per task and routed layer.

        Learned task routes: the selection probabilities: softmax(logits / τ) for softmax, switch and reinforce,
        softmax(logits) for gumbel selection (the Gumbel-max probability of each expert), one-hot argmax
        for argmax selection (stage two). Fixed routes: their table. Overridden tasks
        (`TaskRouter.set_route_overrides`): their override, normalised. Token routing: the mean gate weight
        per task over the training batches since the last call (uniform for tasks not seen since).
        """
        router = self.model.router
        if router is None:
            return self._token_route_table()
        if not router.learned:
            table = router.fixed_routes.float() / router.fixed_routes.float().sum(-1, keepdim=True)
        else:
            task_ids = torch.arange(self.model.task_table.num_tasks, device=self.device)
            logits = router.logits(self.model.task_table(task_ids))
            if router.selection == "argmax":
                table = hard_top_k(logits, router.top_k)
            else:
                sampled_at_tau = router.selection in ("softmax", *SPARSE_SELECTIONS)  # π = softmax(logits / τ)
                temperature = router.temperature.float() if sampled_at_tau else 1.0
                table = (logits / temperature).softmax(-1)
        overrides = router.override_routes.float()  # tasks routed by `set_route_overrides`
        overrides = overrides / overrides.sum(-1, keepdim=True).clamp_min(torch.finfo(overrides.dtype).tiny)
        return torch.where(router.override_mask[:, None, None], overrides, table)

    def _record_token_routes(self, routes, task_ids: torch.Tensor) -> None:
        layers = self.model.routed_layer_names
        sums = self._token_routes.setdefault(
            "sums", torch.zeros(self.model.task_table.num_tasks, len(layers), self.model.moe_options.num_experts)
        )
        counts = self._token_routes.setdefault("counts", torch.zeros(self.model.task_table.num_tasks))
        for j, layer in enumerate(layers):
            weights = routes[layer].weights.detach().float()  # (B, T, E), 0 at padding
            per_example = weights.sum(1) / weights.sum((1, 2)).clamp_min(1e-9)[:, None]  # (B, E)
            sums[:, j].index_add_(0, task_ids.cpu(), per_example.cpu())
        counts.index_add_(0, task_ids.cpu(), torch.ones(len(task_ids)))

    def _token_route_table(self) -> torch.Tensor:
        num_tasks, num_experts = self.model.task_table.num_tasks, self.model.moe_options.num_experts
        table = torch.full((num_tasks, len(self.model.routed_layer_names), num_experts), 1.0 / num_experts)
        if self._token_routes:
            seen = self._token_routes["counts"] > 0
            table[seen] = self._token_routes["sums"][seen] / self._token_routes["counts"][seen, None, None]
            self._token_routes = {}
        return table

    def enter_stage_two(self, routes: Literal["argmax", "softmax"] = "argmax", temperature: float | None = None):
        """Fix the routes (Ye et al.'s second stage): the router's argmax per task and layer, or its softmax
        at `temperature`; freeze router and task table. Returns the parameters frozen here."""
        router = self.model.router
        if router is None or not router.learned:
            raise UsageError(
                "two-stage training needs learned task routes (MoE options routing='task', routes='learned')"
            )
        if routes not in STAGE_ROUTES:
            raise UsageError(f"stage-two routes are {routes!r}; allowed: {', '.join(STAGE_ROUTES)}")
        router.selection = routes
        if temperature is not None:
            router.set_temperature(temperature)
        frozen = [*router.parameters(), *self.model.task_table.parameters()]
        router.freeze(True)
        self.model.task_table.freeze(True)
        self.model.config.moe = {
            **self.model.config.moe,
            "selection": routes,
            "freeze_task_table": True,
            "freeze_router": True,
        }
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
        # logged before the NaN policy: a step that skips its batch shows its own non-finite loss, not the
        # previous step's (Lightning logs the last value again for a key that a step does not log)
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
        for group in self.trainer.optimizers[0].param_groups if self._trainer else []:
            if not group["name"].endswith("no_decay"):
                # what the step applies: a frozen group (router, task table in stage two) moves nothing
                applied = group["lr"] if any(p.requires_grad for p in group["params"]) else 0.0
                self.log(f"lr/{group['name']}", applied, batch_size=size)
        if not self._loss_is_finite(loss, batch):
            # not None: Lightning refuses a skipped training_step under DDP. A zero loss through every trainable
            # parameter keeps each rank's backward and all-reduce; `on_before_optimizer_step` then drops all
            # grads, so the optimizer leaves every parameter (and its Adam state) as it is
            self._skip_step = True
            return torch.stack([p.sum() for p in self.parameters() if p.requires_grad]).sum() * 0.0
        if out.routes:
            used = expert_usage(self.model, out.expert_mask)
            self._used = used if self._used is None else self._used | used
            if self.model.router is None:
                self._record_token_routes(out.routes, batch["task_ids"])
        return loss

    def _route_balance(self) -> torch.Tensor | None:
        """The task-level balance term over every seen task's route (None: off, or routes not being learned)."""
        router = self.model.router
        if not self.hparams.route_balance_weight or router is None or not router.learned or router.frozen:
            return None
        tasks = torch.tensor(self.seen_tasks or range(self.model.task_table.num_tasks), device=self.device)
        return route_balance(router.logits(self.model.task_table(tasks)).softmax(-1))

    def _loss_is_finite(self, loss: torch.Tensor, batch: dict[str, Any]) -> bool:
        """Apply the NaN policy; every rank takes the same decision (a skip on one rank alone hangs DDP)."""
        bad = (~torch.isfinite(loss.detach())).float()
        if self._trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if bad.item() == 0:
            return True
        tasks = sorted(set(batch["task_names"]))
        where = (
            f"task {', '.join(tasks)}" if not torch.isfinite(loss.detach()) else f"another rank (this rank: {tasks})"
        )
        message = f"non-finite training loss at step {self.global_step} (epoch {self.current_epoch}), {where}"
        if self.hparams.nan_policy == "stop":
            raise FloatingPointError(f"{message}; set `nan_policy: skip` to skip such batches")
        self.skipped_batches += 1
        log.warning("%s: batch skipped (%d so far)", message, self.skipped_batches)
        self.log("train/skipped_batches", float(self.skipped_batches), batch_size=len(batch["task_ids"]))
        return False

    def _grads_are_finite(self, optimizer) -> bool:
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:  # 16-mixed: GradScaler skips such steps
            return True
        # the clipped groups' norms come from the clipping callback: one read of the grads instead of two (the
        # check was ~7% of a quick-start step on the CPU as a pair of kernels per tensor)
        norms = group_grad_norms(optimizer, known=self.pre_clip_grad_norms)
        return not norms or bool(torch.stack(list(norms.values())).isfinite().all())  # one device sync

    def on_before_optimizer_step(self, optimizer) -> None:
        # grads are complete here (accumulated, all-reduced), so every rank takes the same decision. Dropping
        # unrouted experts' grads below leaves them as they are: those grads are zero or absent.
        if not self._skip_step and not self._grads_are_finite(optimizer):
            message = f"non-finite gradients at step {self.global_step} (epoch {self.current_epoch}), finite loss"
            if self.hparams.nan_policy == "stop":
                raise FloatingPointError(f"{message}; set `nan_policy: skip` to skip such steps")
            self.skipped_batches += 1
            log.warning("%s: step skipped (%d so far)", message, self.skipped_batches)
            self._skip_step = True
        if self._skip_step:  # a non-finite loss or gradient: the whole step is skipped
            self._skip_step, self._used = False, None
            for param in self.parameters():
                param.grad = None
            return
        if self._used is None:
            return
        used = self._used.float()
        if self.trainer.world_size > 1:  # an expert used on any rank was updated there, so keep it
            used = self.trainer.strategy.reduce(used, reduce_op="sum")
        self._used = None
        if self.hparams.expert_sparse_updates:
            drop_unrouted_expert_grads(self.model, used > 0)

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        local_grads = isinstance(strategy, SingleDeviceStrategy | DDPStrategy) and not isinstance(
            strategy, DeepSpeedStrategy
        )
        if stage == "fit" and self.hparams.expert_sparse_updates and not local_grads:
            raise UsageError(
                f"expert_sparse_updates cannot keep unrouted experts unchanged under {type(strategy).__name__}: "
                "it holds the gradients in its own buffers. Set `expert_sparse_updates: false`, or train with "
                "strategy 'ddp' or one device"
            )
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
            scheduler = config.scheduler
            groups = scheduler.optimizer.param_groups
            for group, base_lr, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
                group["lr"] = base_lr * factor(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports

    # --- checkpoints ------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["moe_mtl"] = {
            "stage": self.stage,
            "stage_info": self.stage_info,
            "skipped": self.skipped_batches,
            "seed": self._seed_base,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # runs before the weights load: re-fix stage-two routes so the run goes on in stage two
        saved_tasks = checkpoint.get("hyper_parameters", {}).get("task_names")
        if saved_tasks is not None and list(saved_tasks) != list(self.task_names):
            pairs = zip(saved_tasks, self.task_names, strict=False)
            first = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(saved_tasks), len(self.task_names)))
            raise UsageError(
                f"the checkpoint's {len(saved_tasks)} tasks differ from the data's {len(self.task_names)} from task id "
                f"{first} on; task ids index the task table, so use the data options (source, partition) of training"
            )
        state = checkpoint.get("moe_mtl", {})
        if state.get("stage") == 2:
            self.enter_stage_two(state["stage_info"]["routes"])
            self.stage_info = state["stage_info"]
        self.skipped_batches = state.get("skipped", 0)
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
