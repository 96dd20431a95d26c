"""RoutingMonitor: routing statistics in the logger, route maps in TensorBoard and route tables as JSON files."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from ...errors import UsageError
from ...evaluation.routes import expert_utilisation, route_entropy
from ...models.routing import route_table
from ...runs import route_table_path, route_table_record, write_route_table


class TokenRouteSums:
    """Token routing's routes (T, L, E): per task, the mean over training examples of each example's share of gate
    weight per expert, summed by `add` and read by `table` (which leaves the sums as they are; `reset` clears them)."""

    def __init__(self, num_tasks: int, layers: list[str], num_experts: int):
        self.layers = layers
        self.sums = torch.zeros(num_tasks, len(layers), num_experts)
        self.counts = torch.zeros(num_tasks)

    def add(self, routes, task_ids: torch.Tensor) -> None:
        """Add one batch: `routes` a forward pass's `RouteRecord`s by layer, `task_ids` (B,)."""
        for j, layer in enumerate(self.layers):
            weights = routes[layer].weights.detach().float()  # (B, T, E), 0 at padding
            per_example = weights.sum(1) / weights.sum((1, 2)).clamp_min(1e-9)[:, None]  # (B, E)
            self.sums[:, j].index_add_(0, task_ids.cpu(), per_example.cpu())
        self.counts.index_add_(0, task_ids.cpu(), torch.ones(len(task_ids)))

    def table(self) -> torch.Tensor:
        """The mean routes since the last `reset`; uniform for the tasks without a batch since."""
        num_experts = self.sums.shape[-1]
        table = torch.full(self.sums.shape, 1.0 / num_experts)
        seen = self.counts > 0
        table[seen] = self.sums[seen] / self.counts[seen, None, None]
        return table

    def reset(self) -> None:
        self.sums.zero_()
        self.counts.zero_()


class RoutingMonitor(Callback):
    """Routing statistics in TensorBoard every `every_n_steps` optimizer steps, and the route table as JSON
    at every validation (for learning-dynamics plots).

    Per routed layer, over the seen (training) tasks: routing/entropy_per_task/<layer> (the mean entropy
    of each task's route; low = decisive routes), routing/entropy_task_avg/<layer> (entropy of the
    task-averaged route; high = tasks spread over the experts), routing/utilisation/<layer>/expert<e>
    (share of routing mass); the same entropies averaged over layers; and routing/route_map, a
    task × (layer, expert) heatmap of every task's route (with matplotlib: labelled with task names, partitions,
    layers and experts, and a colour bar; without matplotlib, a warning and no map). Route tables go to
    `<run dir>/routes/step<N>.json`.

    Routes are `moe_mtl.models.routing.route_table` of the model; under token routing, which has no table, the mean
    gate weights of the training batches since the previous log (`TokenRouteSums`, gathered by a forward hook on
    the model that this callback adds at fit start and removes at its end).

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
        self.token_routes: TokenRouteSums | None = None  # token routing's gate sums since the last log
        self._batch_routes: tuple[Any, torch.Tensor] | None = None  # this training batch's (routes, task ids)
        self._reset_due = False  # the sums were logged: cleared at the next batch (a validation still reads them)
        self._hook = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        model = pl_module.model
        if stage != "fit" or model.router is not None or self._hook is not None:
            return
        self.token_routes = TokenRouteSums(
            model.task_table.num_tasks, model.routed_layer_names, model.moe_options.num_experts
        )
        self._hook = model.register_forward_hook(self._keep_batch_routes, with_kwargs=True)

    def _keep_batch_routes(self, model, args, kwargs, output) -> None:
        if model.training and torch.is_grad_enabled() and output.routes:  # training forward passes only
            self._batch_routes = (output.routes, kwargs["task_ids"])

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._reset_due and self.token_routes is not None:
            self.token_routes.reset()
        self._reset_due = False

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if self._batch_routes is not None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if loss is None or torch.isfinite(loss).all():  # a non-finite batch is not one the routes learned from
                self.token_routes.add(*self._batch_routes)
            self._batch_routes = None
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self.last_logged_step:
            self.last_logged_step = step
            self.log_routes(trainer, pl_module)

    def log_routes(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Log the routing statistics at the current step; returns the scalars logged."""
        routes = self.routes(pl_module)  # (T, L, E)
        self._reset_due = True
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
        matplotlib (the optional extra `analysis`) a warning, once, and no map."""
        if importlib.util.find_spec("matplotlib") is None:
            rank_zero_warn(
                "RoutingMonitor: no route map in TensorBoard without matplotlib (pip install moe-mtl[analysis])"
            )
            return
        from ...evaluation.routes import route_heatmap_figure  # matplotlib is imported only where it is installed

        figure = route_heatmap_figure(
            routes, pl_module.task_names, pl_module.model.routed_layer_names, pl_module.task_partitions, "partition"
        )
        logger.experiment.add_figure("routing/route_map", figure, step, close=True)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.save_route_tables or trainer.sanity_checking or not trainer.is_global_zero:
            return
        step = pl_module.model_step  # in `validate` of a checkpoint, its step (the trainer counts 0)
        routes = self.routes(pl_module)
        record = route_table_record(routes, pl_module.task_names, pl_module.model.routed_layer_names, step)
        write_route_table(route_table_path(pl_module.run_dir, step), record)

    def routes(self, pl_module: LightningModule) -> torch.Tensor:
        """The routes (T, L, E) of the model now, on the CPU: its route table, or token routing's gate means."""
        if self.token_routes is not None:
            return self.token_routes.table()
        return route_table(pl_module.model).float().cpu()

    def state_dict(self) -> dict[str, Any]:
        return {"last_logged_step": self.last_logged_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_logged_step = state_dict["last_logged_step"]
