"""Expert disabling: re-evaluate with one expert of one routed layer disabled; the score drop per task and group.

Disabling is a mask on the routes, not a copy of the model: the disabled routes of every task are installed
with `TaskRouter.set_route_overrides`, the dev split is validated by a Lightning `Trainer`, and the router's
previous overrides are put back. Every task routes to its next-best expert at that layer:

- learned routes: the expert's logit is masked (−inf) and the router's evaluation rule applied to the rest (the
  hard top-k of a router still learning or on argmax selection; softmax(logits/τ) of a frozen softmax or gumbel
  router, i.e. its route renormalised over the remaining experts, without gumbel noise);
- fixed routes (average, random, given) and tasks with overrides: the expert's weight is removed and the route
  renormalised over the remaining experts; a route entirely on the disabled expert becomes uniform over the rest.

Token routing has no per-task route to mask: disabling refuses it with a ValueError.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from ..data import MultiTaskDataModule
from ..data.encoding import collate
from ..errors import UsageError
from ..models.routing import TaskRouter, hard_top_k
from ..training import MoEMultiTaskModule


def without_expert(routes: torch.Tensor, expert: int) -> torch.Tensor:
    """Routes (..., E) with `expert`'s weight removed and renormalised over the rest; a route with all its weight
    on `expert` becomes uniform over the other experts."""
    num_experts = routes.shape[-1]
    if not 0 <= expert < num_experts or num_experts < 2:
        raise UsageError(f"expert: got {expert} for {num_experts} experts; allowed: 0 to {num_experts - 1}, E >= 2")
    kept = routes.clone().float()
    kept[..., expert] = 0.0
    total = kept.sum(-1, keepdim=True)
    uniform = torch.full_like(kept, 1.0 / (num_experts - 1))
    uniform[..., expert] = 0.0
    return torch.where(total > 0, kept / total.clamp_min(1e-30), uniform)


def _task_router(module: MoEMultiTaskModule) -> TaskRouter:
    router = module.model.router
    if router is None:
        raise UsageError(
            "expert disabling needs task-level routes (MoE option routing='task'); token routing has no per-task "
            "route to mask"
        )
    return router


@torch.no_grad()
def evaluation_routes(module: MoEMultiTaskModule) -> torch.Tensor:
    """The routes (T, L, E) the model evaluates every task with (overrides included), on the CPU."""
    router = _task_router(module)
    task_ids = torch.arange(module.model.task_table.num_tasks, device=module.device)
    training = router.training
    router.eval()
    try:
        return router(task_ids, module.model.task_table).float().cpu()
    finally:
        router.train(training)


@torch.no_grad()
def routes_without_expert(module: MoEMultiTaskModule, layer: int, expert: int) -> torch.Tensor:
    """Evaluation routes (T, L, E) of every task with `expert` of routed layer `layer` disabled (see the module
    docstring for the rule); the other layers keep their routes."""
    router = _task_router(module)
    num_layers, num_experts = router.num_layers, router.num_experts
    if not 0 <= layer < num_layers:
        raise UsageError(f"layer: got {layer}; allowed: 0 to {num_layers - 1} ({module.model.routed_layer_names})")
    if not 0 <= expert < num_experts or num_experts < 2:
        raise UsageError(f"expert: got {expert} for {num_experts} experts; allowed: 0 to {num_experts - 1}, E >= 2")
    intact = evaluation_routes(module)
    routes = intact.clone()
    routes[:, layer] = without_expert(intact[:, layer], expert)
    if router.learned:
        task_ids = torch.arange(module.model.task_table.num_tasks, device=module.device)
        logits = router.logits(module.model.task_table(task_ids))[:, layer].cpu()  # (T, E)
        logits[:, expert] = -math.inf
        if router.selection == "argmax" or not router.frozen:
            masked = hard_top_k(logits, router.top_k)
        else:
            masked = (logits / router.temperature.float().cpu()).softmax(-1)
        learned = ~router.override_mask.cpu()  # overridden tasks keep the renormalised rule
        routes[learned, layer] = masked[learned]
    return routes


@contextmanager
def disabled_expert(module: MoEMultiTaskModule, layer: int, expert: int) -> Iterator[torch.Tensor]:
    """Within the block, every task routes without `expert` of `layer` (yields the routes (T, L, E)); afterwards
    the router's own overrides are back exactly as they were."""
    router = _task_router(module)
    routes = routes_without_expert(module, layer, expert)
    saved_mask, saved_routes = router.override_mask.clone(), router.override_routes.clone()
    router.set_route_overrides(torch.arange(len(routes)), routes)
    try:
        yield routes
    finally:
        router.clear_route_overrides()
        if saved_mask.any():
            ids = saved_mask.nonzero().flatten()
            router.set_route_overrides(ids, saved_routes[ids])


def validation_loader(
    datamodule: MultiTaskDataModule, max_examples: int | None = None, tasks: Sequence[str] | None = None
) -> DataLoader:
    """The dev split's evaluation batches, task by task: with `max_examples`, only each task's first that many;
    with `tasks`, only those tasks (names)."""
    if max_examples is None and tasks is None:
        return datamodule.val_dataloader()
    if max_examples is not None and max_examples < 1:
        raise UsageError(f"max_examples: expected a positive number of dev examples per task, got {max_examples}")
    datamodule.setup("validate")
    dataset = datamodule.datasets["val"]
    validated = [dataset.task_names[task] for task, _, _ in dataset.task_ranges]
    unknown = sorted(set(tasks or []) - set(validated))
    if unknown or tasks == []:
        raise UsageError(f"tasks: {unknown or 'none'} given; allowed: the validated tasks {validated}")
    batch_size = datamodule.hparams.eval_batch_size or datamodule.hparams.batch_size
    batches = []
    for task, first, stop in dataset.task_ranges:
        if tasks is not None and dataset.task_names[task] not in tasks:
            continue
        end = stop if max_examples is None else min(stop, first + max_examples)
        batches += [list(range(start, min(start + batch_size, end))) for start in range(first, end, batch_size)]
    return DataLoader(dataset, batch_sampler=batches, collate_fn=partial(collate, pad_token_id=datamodule.pad_token_id))


def validation_metrics(
    module: MoEMultiTaskModule, loader: DataLoader, results_dir: str | Path, **trainer: Any
) -> dict[str, dict[str, float]]:
    """Validate `module` on `loader` with a quiet Trainer (no logger, checkpoints or callbacks; `trainer` options
    over accelerator "auto", one device); task name → {"score", "loss"} (val score and token NLL). The module's
    evaluation files go to `results_dir`, so a run's own evaluation folder is left as it was."""
    options = dict(
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[],
        default_root_dir=str(results_dir),
    )
    saved = module.evaluation.results_dir
    module.evaluation.results_dir = str(results_dir)  # read in `setup`: where this evaluation's files go
    lightning = logging.getLogger("lightning.pytorch")  # its start-up lines, once per Trainer: one per expert here
    level = lightning.level
    lightning.setLevel(logging.WARNING)
    try:
        (metrics,) = Trainer(**{**options, **trainer}).validate(module, dataloaders=loader, verbose=False)
    finally:
        module.evaluation.results_dir = saved
        lightning.setLevel(level)
    tasks = [key.removeprefix("val/score/") for key in metrics if key.startswith("val/score/")]
    return {
        task: {"score": float(metrics[f"val/score/{task}"]), "loss": float(metrics[f"val/loss/{task}"])}
        for task in tasks
    }


def expert_disabling(
    module: MoEMultiTaskModule,
    loader: DataLoader,
    output_dir: str | Path,
    layers: Sequence[str] | None = None,
    **trainer: Any,
) -> list[dict[str, Any]]:
    """Validate the intact model, then once per (routed layer, expert) with that expert disabled.

    layers: names of the routed layers to disable experts in (None: all). Evaluation files go to
    `<output_dir>/intact/` and `<output_dir>/<layer>-expert<e>/`. Returns one row per (layer, expert, task):
    layer, expert, task, weight (the task's intact route weight on that expert), intact, score, drop
    (intact − score: positive when disabling hurts), intact_loss, loss, loss_rise (loss − intact_loss: the
    finer measure where scores are coarse).
    """
    names = module.model.routed_layer_names
    chosen = list(names) if layers is None else list(layers)
    unknown = [name for name in chosen if name not in names]
    if unknown or not chosen:
        raise UsageError(f"layers: got {list(layers or [])}; allowed: routed layer names {list(names)}")
    output_dir = Path(output_dir)
    intact_routes = evaluation_routes(module)
    intact = validation_metrics(module, loader, output_dir / "intact", **trainer)
    task_ids = {name: i for i, name in enumerate(module.task_names)}
    rows = []
    for name in chosen:
        layer = names.index(name)
        for expert in range(module.model.moe_options.num_experts):
            with disabled_expert(module, layer, expert):
                metrics = validation_metrics(module, loader, output_dir / f"{name}-expert{expert}", **trainer)
            for task, values in metrics.items():
                rows.append(
                    {
                        "layer": name,
                        "expert": expert,
                        "task": task,
                        "weight": float(intact_routes[task_ids[task], layer, expert]),
                        "intact": intact[task]["score"],
                        "score": values["score"],
                        "drop": intact[task]["score"] - values["score"],
                        "intact_loss": intact[task]["loss"],
                        "loss": values["loss"],
                        "loss_rise": values["loss"] - intact[task]["loss"],
                    }
                )
    return rows


def group_drops(rows: Sequence[Mapping[str, Any]], task_groups: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """Mean score drop per (layer, expert, group): a task counts in each of its groups (`task_groups`: task →
    group names, e.g. its skill families). Rows: layer, expert, group, tasks, mean_drop."""
    missing = sorted({row["task"] for row in rows} - set(task_groups))
    if missing:
        raise UsageError(f"task_groups: no groups for the evaluated tasks {missing}")
    drops: dict[tuple[str, int, str], list[float]] = defaultdict(list)
    for row in rows:
        for group in task_groups[row["task"]]:
            drops[(row["layer"], row["expert"], group)].append(row["drop"])
    return [
        {"layer": layer, "expert": expert, "group": group, "tasks": len(values), "mean_drop": sum(values) / len(values)}
        for (layer, expert, group), values in drops.items()
    ]
