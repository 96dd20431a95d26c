"""TwoStageTraining: Ye et al.'s two stages, learn the routes, then fix them and train the experts."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from transformers import AutoConfig, BartForConditionalGeneration

from ...errors import UsageError
from ...models.config import STAGE_ROUTES, fixed_route_options
from ...runs import checkpoint_fixed_routes
from ..distributed import require_unused_parameter_detection
from ..schedules import recompute_learning_rates, warmup_steps_for


def fix_routes(model, routes: Literal["argmax", "softmax"] = "argmax", temperature: float | None = None):
    """Fix the routes of `model` (a MoE-BART with learned task routes) for stage two: the router's argmax per task
    and layer, or its softmax at `temperature`; router and task table frozen, and said so in its config (a saved
    model loads with them). Returns the parameters frozen here."""
    router = model.router
    if router is None or not router.learned:
        raise UsageError("two-stage training needs learned task routes (MoE options routing='task', routes='learned')")
    if routes not in STAGE_ROUTES:
        raise UsageError(f"stage-two routes are {routes!r}; allowed: {', '.join(STAGE_ROUTES)}")
    router.selection = routes
    if temperature is not None:
        router.set_temperature(temperature)
    frozen: list[torch.nn.Parameter] = [*router.parameters(), *model.task_table.parameters()]
    router.freeze(True)
    model.task_table.freeze(True)
    model.config.moe = {**model.config.moe, **fixed_route_options(routes)}
    return frozen


class TwoStageTraining(Callback):
    """Ye et al.'s two-stage training: learn routes, then fix them and train the experts.

    On with `switch_step` or `switch_epoch`; with neither (the default) it is off and the run trains in one
    stage (the `moe-mtl` command always has this callback, in its `two_stage` group: `--two_stage.switch_step
    null` turns a config's two stages off). On, it needs learned task routes: fixed routes (random, average,
    given) and token routing have nothing to learn in stage one.

    At the switch (the first optimizer step at or after `switch_step`, or the start of epoch
    `switch_epoch`): the routes become the router's argmax per task and layer, or its softmax at
    `temperature`; router and task table are frozen; experts (and the other BART weights) are optionally
    re-initialised from a dense checkpoint; optimizer state is cleared for every parameter changed;
    the learning-rate warmup/decay optionally restarts. A run resumed in stage two stays there: this callback
    fixes the routes again from its checkpoint state, and nothing is frozen or re-initialised again.

    The stage is this callback's state (`switched_at`, `stage`; logged as train/stage). The weights need only the
    fixed-route options, which the switch writes into the module's `moe` hyper-parameters and the model's config:
    `load_from_checkpoint`, `validate`/`test`/`predict --ckpt_path` and an exported model build stage two from
    them without this callback. `TemperatureAnnealing` reads the switch step with `stage_two_start`.

    Args:
        switch_step: Optimizer step at which stage two begins (None, with `switch_epoch` None: one stage).
        switch_epoch: Epoch at whose start stage two begins (instead of `switch_step`).
        routes: Stage-two routes: "argmax" (hard, only the chosen expert runs) or "softmax" at `temperature`.
        temperature: τ of softmax routes at the switch (the paper: 300, annealed to 1.0 by TemperatureAnnealing's
            `stage_two`); None keeps the current τ.
        reinit_experts_from: Dense BART (hub name or folder) whose weights overwrite experts, embeddings and
            layer norms at the switch, as the paper does; None keeps the stage-one weights.
        reset_optimizer_state: Clear the Adam moments of the frozen and re-initialised parameters.
        restart_lr_schedule: Treat each stage as a run of its own for the learning rate: with `switch_step`,
            stage one's warmup and linear decay span steps 0 to the switch; stage two starts a new warmup and
            decay over the remaining steps.
    """

    def __init__(
        self,
        switch_step: int | None = None,
        switch_epoch: int | None = None,
        routes: Literal["argmax", "softmax"] = "argmax",
        temperature: float | None = None,
        reinit_experts_from: str | None = None,
        reset_optimizer_state: bool = True,
        restart_lr_schedule: bool = True,
    ):
        if switch_step is not None and switch_epoch is not None:
            raise UsageError(
                f"TwoStageTraining: `switch_step` is {switch_step} and `switch_epoch` {switch_epoch}; give at most "
                "one of them (neither: single-stage training)"
            )
        for option, value in (("switch_step", switch_step), ("switch_epoch", switch_epoch)):
            if value is not None and value < 0:
                raise UsageError(f"TwoStageTraining: `{option}` is {value}; it must be >= 0")
        if routes not in ("argmax", "softmax"):
            raise UsageError(f"TwoStageTraining: `routes` is {routes!r}; allowed: 'argmax', 'softmax'")
        self.switch_step = switch_step
        self.switch_epoch = switch_epoch
        self.routes = routes
        self.temperature = temperature
        self.reinit_experts_from = reinit_experts_from
        self.reset_optimizer_state = reset_optimizer_state
        self.restart_lr_schedule = restart_lr_schedule
        self.switched_at: int | None = None  # the optimizer step of the switch, once switched

    @property
    def stage(self) -> int:
        """1 until the switch, 2 after it."""
        return 1 if self.switched_at is None else 2

    @property
    def enabled(self) -> bool:
        """Whether a switch is scheduled (else the run trains in one stage)."""
        return self.switch_step is not None or self.switch_epoch is not None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        router = pl_module.model.router
        learned = router is not None and router.learned
        if not self.enabled:
            if learned and stage == "fit":
                rank_zero_info("TwoStageTraining: no `switch_step` or `switch_epoch`: single-stage training")
            stage_two = {"routes": self.routes != "argmax", "temperature": self.temperature is not None}
            stage_two["reinit_experts_from"] = self.reinit_experts_from is not None
            unused = [option for option, given in stage_two.items() if given]
            if unused and stage == "fit":  # options of a stage that never comes: said, not ignored
                rank_zero_warn(
                    f"TwoStageTraining: {', '.join(f'two_stage.{option}' for option in unused)} given, but no "
                    "two_stage.switch_step or switch_epoch: there is no stage two, so they do nothing"
                )
            return
        if not learned:
            options = pl_module.model.moe_options
            option = "switch_step" if self.switch_step is not None else "switch_epoch"
            raise UsageError(
                f"TwoStageTraining needs learned task routes (MoE options routing='task', routes='learned'); this "
                f"model has routing={options.routing!r}, routes={options.routes!r}. Turn two-stage training off "
                f"with `--two_stage.{option} null` (YAML: `two_stage: {{{option}: null}}`)"
            )
        if stage == "fit":
            self.check_strategy(trainer, pl_module.model)
            if self.reinit_experts_from is not None:  # found now, not hours into the run at the switch
                self._check_dense(pl_module)

    def check_strategy(self, trainer: Trainer, model) -> None:
        """A scheduled stage two leaves unchosen experts without a gradient: DDP must be told (a UsageError if not).
        Also called by the CLI before the data is prepared, so that the refusal leaves nothing written."""
        if self.enabled and model.router is not None and model.router.learned:
            require_unused_parameter_detection(trainer, "TwoStageTraining fixes the routes in stage two")

    def _check_dense(self, pl_module: LightningModule) -> None:
        try:
            dense = AutoConfig.from_pretrained(self.reinit_experts_from)
        except OSError as err:
            raise UsageError(
                f"TwoStageTraining: `reinit_experts_from` {self.reinit_experts_from!r} cannot be loaded ({err}); "
                "give a dense BART folder (or a hub name reachable from every node)"
            ) from err
        mine = pl_module.model.config
        sizes = ("d_model", "encoder_layers", "decoder_layers", "encoder_ffn_dim", "decoder_ffn_dim", "vocab_size")
        differ = [
            f"{key} {getattr(dense, key, None)} vs {getattr(mine, key)}"
            for key in sizes
            if getattr(dense, key, None) != getattr(mine, key)
        ]
        if differ:
            raise UsageError(
                f"TwoStageTraining: `reinit_experts_from` {self.reinit_experts_from!r} does not match the model: "
                + ", ".join(differ)
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the paper's stage one is a run of its own: its warmup and decay span the steps up to the switch
        # (a resumed run then restores its schedule from the checkpoint)
        if self.switch_step and self.restart_lr_schedule and self.switched_at is None:
            self._restart_schedule(trainer, pl_module, 0, self.switch_step)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.switched_at is not None:
            return
        last_step, epochs = int(trainer.estimated_stepping_batches), trainer.max_epochs
        if self.switch_step is not None and self.switch_step >= last_step:
            rank_zero_warn(
                f"TwoStageTraining: two_stage.switch_step is {self.switch_step}, but the run ends at step "
                f"{last_step}: stage two never starts. Lower --two_stage.switch_step, raise trainer.max_steps, or "
                "train in one stage with --two_stage.switch_step null"
            )
        by_epochs = trainer.max_steps in (None, -1) and epochs not in (None, -1)
        if self.switch_epoch is not None and by_epochs and self.switch_epoch >= epochs:
            rank_zero_warn(
                f"TwoStageTraining: two_stage.switch_epoch is {self.switch_epoch}, but the run trains {epochs} "
                "epochs: stage two never starts. Lower --two_stage.switch_epoch or raise trainer.max_epochs"
            )

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        window_start = batch_idx % trainer.accumulate_grad_batches == 0  # never mid-accumulation
        if self.switch_step is not None and trainer.global_step >= self.switch_step and window_start:
            self._switch(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.switch_epoch is not None and trainer.current_epoch >= self.switch_epoch:
            self._switch(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        router = pl_module.model.router
        if router is not None and router.learned:  # fixed routes and token routing have no stages
            pl_module.log("train/stage", float(self.stage), batch_size=len(batch["task_ids"]))

    def _switch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.switched_at is not None:
            return
        changed = self._fix_routes(pl_module)
        if self.reinit_experts_from is not None:
            dense = BartForConditionalGeneration.from_pretrained(self.reinit_experts_from)
            pl_module.model.load_dense_state_dict(dense.state_dict())
            frozen = {id(p) for p in changed}
            changed += [p for p in pl_module.model.parameters() if id(p) not in frozen]
        cleared = 0
        if self.reset_optimizer_state:
            for optimizer in trainer.optimizers:
                for param in changed:
                    cleared += optimizer.state.pop(param, None) is not None
        if self.restart_lr_schedule:
            self._restart_schedule(trainer, pl_module, trainer.global_step)
        self.switched_at = trainer.global_step
        rank_zero_info(
            f"TwoStageTraining: stage two from step {trainer.global_step} (epoch {trainer.current_epoch}): "
            f"{self.routes} routes, router and task table frozen, experts "
            f"{'re-initialised from ' + self.reinit_experts_from if self.reinit_experts_from else 'kept'}, "
            f"optimizer state cleared for {cleared} parameters"
        )
        for logger in trainer.loggers:
            logger.log_metrics({"train/stage_switch": float(trainer.global_step)}, step=trainer.global_step)

    def _fix_routes(self, pl_module: LightningModule, routes: str | None = None) -> list[torch.nn.Parameter]:
        """`fix_routes`, and the options in effect into the module's hyper-parameters (saved with checkpoints)."""
        frozen = fix_routes(pl_module.model, routes or self.routes, self.temperature if routes is None else None)
        pl_module.hparams["moe"] = asdict(pl_module.model.moe_options)
        return frozen

    @staticmethod
    def _restart_schedule(trainer: Trainer, pl_module: LightningModule, start: int, total: int | None = None) -> None:
        """A new warmup and linear decay of the module's schedule from step `start`, over `total` steps (default:
        the remaining ones): a training stage of its own, as in the paper's two stages."""
        schedule = getattr(pl_module, "lr_schedule", None)
        if schedule is None:
            return
        total = total or max(1, int(trainer.estimated_stepping_batches) - start)
        schedule.restart(start, total, warmup_steps_for(pl_module.optim.warmup, total))
        recompute_learning_rates(config.scheduler for config in trainer.lr_scheduler_configs)

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # after the weights load, before the optimizers are built (and DDP wraps the model): a run resumed in
        # stage two trains with its routes fixed, as the run that saved it did
        state = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
        if state.get("switched_at") is not None:
            self.switched_at = state["switched_at"]  # (again in `load_state_dict`)
            self._fix_routes(pl_module, state.get("routes") or checkpoint_fixed_routes(checkpoint) or "argmax")
            return
        old = checkpoint.get("moe_mtl") or {}  # earlier checkpoints: the module kept the stage
        if old.get("stage") == 2:
            self.switched_at = old["stage_info"].get("switch_step", checkpoint.get("global_step", 0))
            self._fix_routes(pl_module, old["stage_info"].get("routes", "argmax"))

    def state_dict(self) -> dict[str, Any]:
        return {"switched_at": self.switched_at, "routes": self.routes}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.switched_at = state_dict["switched_at"]


def stage_two_start(trainer: Trainer) -> int | None:
    """The optimizer step from which the run routes in stage two: the switch step once switched, else the planned
    `switch_step`; None: one stage (no `TwoStageTraining`, or a `switch_epoch` not reached yet)."""
    for callback in trainer.callbacks:
        if isinstance(callback, TwoStageTraining):
            return callback.switched_at if callback.switched_at is not None else callback.switch_step
    return None
