"""Callbacks that change or watch routing: temperature annealing, two-stage training, the routing monitor.

Each does one job through `MoEMultiTaskModule`'s public routing state (`model`, `stage`, `route_table`,
`enter_stage_two`) and has `state_dict`/`load_state_dict`, so a resumed run restores it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from transformers import AutoConfig, BartForConditionalGeneration

from ..analysis.extras import available
from ..errors import UsageError
from ..evaluation.analysis import (
    expert_utilisation,
    route_entropy,
    route_heatmap,
    route_table_record,
    write_route_table,
)
from .module import require_unused_parameter_detection
from .schedules import TEMPERATURE_SCHEDULES, TemperatureSchedule, temperature_at


@dataclass
class TemperaturePlan:
    """A temperature schedule: `temperature_at(step, start, end, schedule, rate, total_steps)`."""

    start: float = 2.0
    end: float = 0.1
    schedule: TemperatureSchedule = "exp"
    rate: float = 3e-4
    total_steps: int | None = None

    def __post_init__(self) -> None:
        if self.schedule not in TEMPERATURE_SCHEDULES:
            raise UsageError(
                f"TemperatureAnnealing: schedule is {self.schedule!r}; allowed: {', '.join(TEMPERATURE_SCHEDULES)}"
            )
        if not (self.start > 0 and self.end > 0):
            raise UsageError(f"TemperatureAnnealing: start ({self.start}) and end ({self.end}) must be > 0")
        if self.rate < 0:
            raise UsageError(f"TemperatureAnnealing: rate is {self.rate}; it must be >= 0")

    def at(self, step: int, total_steps: int) -> float:
        return temperature_at(step, self.start, self.end, self.schedule, self.rate, self.total_steps or total_steps)


class TemperatureAnnealing(Callback):
    """Anneal the router's selection temperature τ, set before every optimizer step: step s (counted from 0)
    runs at τ(s), so after N steps the router holds τ(N − 1).

    Default (the paper's stage one): τ = max(2.0 · exp(−3e-4 · step), 0.1). "linear" and "cosine" go from
    `start` to `end` over `total_steps` (default: the run's training steps). With `stage_two`, a second
    schedule runs from the two-stage switch on (e.g. the paper's softmax τ 300 → 1.0, rate 1e-4); without
    it, the stage-two temperature set at the switch is kept. The module logs τ as train/temperature. Only
    learned task routes have a τ: with fixed routes or token routing the callback does nothing. The `moe-mtl`
    command always has it, in its `temperature` group (`--temperature.rate 0` keeps τ at `start`).

    Args:
        start: τ at step 0.
        end: τ at the end (linear, cosine) or its floor (exp).
        schedule: "exp", "linear" or "cosine".
        rate: r of the exp schedule.
        total_steps: Steps of a linear or cosine schedule; None: the trainer's estimated training steps.
        stage_two: Schedule after the two-stage switch, counted from the switch step.
    """

    def __init__(
        self,
        start: float = 2.0,
        end: float = 0.1,
        schedule: TemperatureSchedule = "exp",
        rate: float = 3e-4,
        total_steps: int | None = None,
        stage_two: TemperaturePlan | None = None,
    ):
        self.plan = TemperaturePlan(start, end, schedule, rate, total_steps)
        self.stage_two = stage_two
        self.temperature: float | None = None

    def temperature_for(self, trainer: Trainer, pl_module: LightningModule) -> float | None:
        """τ for the coming optimizer step (None: leave the module's τ alone)."""
        total = max(1, int(trainer.estimated_stepping_batches))
        if getattr(pl_module, "stage", 1) == 2:
            if self.stage_two is None:
                return None
            since = trainer.global_step - pl_module.stage_info.get("switch_step", 0)
            return self.stage_two.at(max(0, since), max(1, total - pl_module.stage_info.get("switch_step", 0)))
        return self.plan.at(trainer.global_step, total)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.apply(trainer, pl_module)

    def apply(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Set τ for the coming optimizer step (TwoStageTraining calls it again right after its switch).
        Fixed routes and token routing have no τ: nothing to anneal."""
        router = pl_module.model.router
        if router is None or not router.learned:
            return
        temperature = self.temperature_for(trainer, pl_module)
        if temperature is not None:
            pl_module.model.set_temperature(temperature)
            self.temperature = temperature

    def state_dict(self) -> dict[str, Any]:
        stage_two = asdict(self.stage_two) if self.stage_two else None
        return {"plan": asdict(self.plan), "stage_two": stage_two, "temperature": self.temperature}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        mine = self.state_dict()
        if (state_dict["plan"], state_dict["stage_two"]) != (mine["plan"], mine["stage_two"]):
            rank_zero_warn(
                f"TemperatureAnnealing: the checkpoint's schedule {state_dict['plan']} (stage two: "
                f"{state_dict['stage_two']}) differs from this run's {mine['plan']} ({mine['stage_two']}); "
                "the resumed run follows this run's"
            )
        self.temperature = state_dict["temperature"]


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
    the learning-rate warmup/decay optionally restarts. A run resumed in stage two stays there: the module
    restores the fixed routes from its checkpoint and nothing is frozen or re-initialised again.

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
        self.switched_at: int | None = None

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
            require_unused_parameter_detection(trainer, "TwoStageTraining fixes the routes in stage two")
            if self.reinit_experts_from is not None:  # found now, not hours into the run at the switch
                self._check_dense(pl_module)

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
        if self.switch_step and self.restart_lr_schedule and pl_module.stage == 1:
            pl_module.restart_lr_schedule(0, self.switch_step)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        window_start = batch_idx % trainer.accumulate_grad_batches == 0  # never mid-accumulation
        if self.switch_step is not None and trainer.global_step >= self.switch_step and window_start:
            self._switch(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.switch_epoch is not None and trainer.current_epoch >= self.switch_epoch:
            self._switch(trainer, pl_module)

    def _switch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.stage == 2:
            return
        changed = pl_module.enter_stage_two(self.routes, self.temperature)
        for callback in trainer.callbacks:
            if isinstance(callback, TemperatureAnnealing):
                # it may have run before this callback in this batch: the switch step gets the stage-two τ too
                callback.apply(trainer, pl_module)
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
            pl_module.restart_lr_schedule()
        self.switched_at = trainer.global_step
        rank_zero_info(
            f"TwoStageTraining: stage two from step {trainer.global_step} (epoch {trainer.current_epoch}): "
            f"{self.routes} routes, router and task table frozen, experts "
            f"{'re-initialised from ' + self.reinit_experts_from if self.reinit_experts_from else 'kept'}, "
            f"optimizer state cleared for {cleared} parameters"
        )
        for logger in trainer.loggers:
            logger.log_metrics({"train/stage_switch": float(trainer.global_step)}, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"switched_at": self.switched_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.switched_at = state_dict["switched_at"]


class RoutingMonitor(Callback):
    """Routing statistics in TensorBoard every `every_n_steps` optimizer steps, and the route table as JSON
    at every validation (for learning-dynamics plots).

    Per routed layer, over the seen (training) tasks: routing/entropy_per_task/<layer> (the mean entropy
    of each task's route; low = decisive routes), routing/entropy_task_avg/<layer> (entropy of the
    task-averaged route; high = tasks spread over the experts), routing/utilisation/<layer>/expert<e>
    (share of routing mass); the same entropies averaged over layers; and routing/route_map, a
    task × (layer, expert) heatmap of every task's route (with matplotlib: labelled with task names, partitions,
    layers and experts, and a colour bar; else an unlabelled image). Route tables go to
    `<run dir>/routes/step<N>.json`.

    Args:
        every_n_steps: Optimizer steps between two logs.
        heatmap: Also log the route map image (TensorBoard loggers only).
        heatmap_every_n_steps: Optimizer steps between two route maps (a multiple of `every_n_steps`; drawing the
            labelled figure costs about as much as a few hundred training steps of the quick start).
        save_route_tables: Save the route table as JSON at each validation.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        heatmap: bool = True,
        heatmap_every_n_steps: int = 500,
        save_route_tables: bool = True,
    ):
        if every_n_steps < 1:
            raise UsageError(f"RoutingMonitor: `every_n_steps` is {every_n_steps}; it must be >= 1")
        if heatmap_every_n_steps < 1 or heatmap_every_n_steps % every_n_steps:
            raise UsageError(
                f"RoutingMonitor: `heatmap_every_n_steps` is {heatmap_every_n_steps}; it must be a positive multiple "
                f"of `every_n_steps` ({every_n_steps})"
            )
        self.every_n_steps = every_n_steps
        self.heatmap = heatmap
        self.heatmap_every_n_steps = heatmap_every_n_steps
        self.save_route_tables = save_route_tables
        self.last_logged_step = -1
        # (step, route table) logged since the last training batch: token routing's table holds the gate weights
        # since the previous read, so a validation at a logged step saves this one instead of reading an empty one
        self._logged_routes: tuple[int, torch.Tensor] | None = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._logged_routes = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self.last_logged_step:
            self.last_logged_step = step
            self.log_routes(trainer, pl_module)

    def log_routes(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Log the routing statistics at the current step; returns the scalars logged."""
        routes = pl_module.route_table().float().cpu()  # (T, L, E)
        self._logged_routes = (trainer.global_step, routes)
        seen = routes[pl_module.seen_tasks or list(range(routes.shape[0]))]
        per_task, averaged = route_entropy(seen)
        utilisation = expert_utilisation(seen)
        metrics = {
            "routing/entropy_per_task/mean": per_task.mean().item(),
            "routing/entropy_task_avg/mean": averaged.mean().item(),
        }
        for j, layer in enumerate(pl_module.model.routed_layer_names):
            metrics[f"routing/entropy_per_task/{layer}"] = per_task[j].item()
            metrics[f"routing/entropy_task_avg/{layer}"] = averaged[j].item()
            for expert, share in enumerate(utilisation[j].tolist()):
                metrics[f"routing/utilisation/{layer}/expert{expert}"] = share
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            route_map = self.heatmap and step % self.heatmap_every_n_steps == 0
            if route_map and isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                self._log_route_map(logger, pl_module, routes, step)
        return metrics

    @staticmethod
    def _log_route_map(logger: TensorBoardLogger, pl_module: LightningModule, routes: torch.Tensor, step: int) -> None:
        """The route map as a figure labelled with task names (grouped by partition) and layers/experts; without
        matplotlib (the optional extra `analysis`), the unlabelled numpy image."""
        if not available("matplotlib.figure"):
            logger.experiment.add_image("routing/route_map", route_heatmap(routes), step, dataformats="CHW")
            return
        from ..analysis.plots import route_heatmap_figure  # matplotlib is imported only where it is installed

        figure = route_heatmap_figure(
            routes, pl_module.task_names, pl_module.model.routed_layer_names, pl_module.task_partitions, "partition"
        )
        logger.experiment.add_figure("routing/route_map", figure, step, close=True)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.save_route_tables or trainer.sanity_checking or not trainer.is_global_zero:
            return
        step = pl_module.model_step  # in `validate` of a checkpoint, its step (the trainer counts 0)
        if self._logged_routes is not None and self._logged_routes[0] == step:
            routes = self._logged_routes[1]
        else:
            routes = pl_module.route_table().float().cpu()
        record = route_table_record(routes, pl_module.task_names, pl_module.model.routed_layer_names, step)
        write_route_table(pl_module.run_dir / "routes" / f"step{step}.json", record)

    def state_dict(self) -> dict[str, Any]:
        return {"last_logged_step": self.last_logged_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_logged_step = state_dict["last_logged_step"]
