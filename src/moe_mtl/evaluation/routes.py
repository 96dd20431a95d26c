"""Route statistics and the route heatmap: entropies and expert utilisation of a route table, and its figure.

A route table `routes` (T, L, E) holds, for each of T tasks and L routed layers, a probability distribution over
E experts. The statistics are pure functions of it (torch). The heatmap is a matplotlib `Figure` built without
pyplot (no global figure state, nothing to close): save it with `savefig`, or log it with TensorBoard's
`add_figure`. matplotlib is the optional extra `analysis`, imported inside the figure functions only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from ..extras import require

MAX_INCHES = 24.0  # a figure side: larger only slows drawing (the RoutingMonitor draws one at every log)
MAX_EXPERT_TICKS = 64  # more (layer, expert) columns than this get one tick per layer
LAYER_LABEL = {"ha": "center", "va": "bottom", "fontsize": 8, "rotation": 0}
GROUP_LABEL = {"ha": "left", "va": "center", "fontsize": 8}


# --- statistics (pure) --------------------------------------------------------------------------------------


def check_routes(routes: torch.Tensor) -> None:
    """A usage error unless `routes` is a non-empty (tasks, layers, experts) tensor."""
    # an empty axis would make the task mean 0/0
    if not isinstance(routes, torch.Tensor) or routes.dim() != 3 or routes.numel() == 0:
        got = tuple(routes.shape) if isinstance(routes, torch.Tensor) else type(routes).__name__
        raise UsageError(f"routes: expected a non-empty (tasks, layers, experts) tensor, got shape {got}")


def _task_distribution(task_weights: torch.Tensor | None, routes: torch.Tensor) -> torch.Tensor:
    """Task weights (T,) normalised to sum to 1 (uniform when None), fp32 on the routes' device."""
    num_tasks = routes.shape[0]
    if task_weights is None:
        return torch.full((num_tasks,), 1.0 / num_tasks, device=routes.device)
    if task_weights.shape != (num_tasks,):
        raise UsageError(
            f"task_weights: expected shape ({num_tasks},) to match routes {tuple(routes.shape)}, "
            f"got {tuple(task_weights.shape)}"
        )
    weights = task_weights.to(device=routes.device, dtype=torch.float32)
    if (weights < 0).any() or weights.sum() <= 0:
        raise UsageError(f"task_weights: expected non-negative weights with a positive sum, got {weights.tolist()}")
    return weights / weights.sum()


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats over the last dimension; xlogy makes 0·log 0 = 0, so one-hot routes give 0, not NaN."""
    return -torch.xlogy(probs, probs).sum(-1)


def expert_utilisation(routes: torch.Tensor, task_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Share of routing mass each expert gets at each layer: the (weighted) mean route over tasks.

    routes (T, L, E), task_weights (T,) non-negative or None for uniform → (L, E), rows sum to 1.
    """
    check_routes(routes)
    weights = _task_distribution(task_weights, routes)
    return torch.einsum("t,tle->le", weights, routes.float())


def route_entropy(routes: torch.Tensor, task_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer route entropies in nats: (mean over tasks of each task's entropy, entropy of the mean route).

    routes (T, L, E), task_weights (T,) non-negative or None for uniform → two (L,) tensors.
    A low first value means each task commits to few experts; a high second value means the tasks
    together still spread over many. Their difference is the mutual information I(task; expert),
    i.e. how much the expert choice depends on the task.
    """
    check_routes(routes)
    weights = _task_distribution(task_weights, routes)
    per_task = torch.einsum("t,tl->l", weights, _entropy(routes.float()))
    return per_task, _entropy(expert_utilisation(routes, task_weights))


# --- the heatmap --------------------------------------------------------------------------------------------


def group_order(groups: Sequence[str]) -> list[int]:
    """Row order that puts tasks of the same group together: groups in first-seen order, tasks stable within."""
    first = {}
    for i, group in enumerate(groups):
        first.setdefault(group, i)
    return sorted(range(len(groups)), key=lambda i: (first[groups[i]], i))


def draw_table(axes, table: np.ndarray, num_layers: int, num_experts: int):
    """imshow of a (T, L·E) table on `axes`, viridis over route weights in [0, 1], with white lines between
    layers; returns the image."""
    colormap = require("matplotlib").colormaps["viridis"]
    image = axes.imshow(table, cmap=colormap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    for boundary in range(1, num_layers):
        axes.axvline(boundary * num_experts - 0.5, color="white", linewidth=1.5)
    return image


def route_heatmap_figure(
    routes: torch.Tensor,
    task_names: Sequence[str],
    layer_names: Sequence[str],
    groups: Sequence[str] | None = None,
    group_label: str | None = None,
    title: str | None = None,
) -> Any:
    """The route table (T, L, E) as a labelled heatmap `Figure`.

    Rows are tasks, columns (layer, expert) pairs, layer-major. y axis: task names (grouped by `groups`, one
    label per task, when given: tasks of a group together, a line between groups, the group name at the right);
    x axis: expert index under each layer's name; a colour bar of the route weight.
    """
    figure_module = require("matplotlib.figure")
    num_tasks, num_layers, num_experts = routes.shape
    if len(task_names) != num_tasks or len(layer_names) != num_layers:
        raise UsageError(
            f"route heatmap: {len(task_names)} task names and {len(layer_names)} layer names for routes of shape "
            f"{tuple(routes.shape)}"
        )
    if groups is not None and len(groups) != num_tasks:
        raise UsageError(f"route heatmap: {len(groups)} groups for {num_tasks} tasks")
    order = group_order(groups) if groups is not None else list(range(num_tasks))
    table = routes.detach().float().cpu().reshape(num_tasks, -1).numpy()[order]
    columns = num_layers * num_experts
    width = min(4.0 + max(0.3 * columns, 1.0 * num_layers), MAX_INCHES)  # room for the layer names
    height = min(2.5 + 0.18 * num_tasks, MAX_INCHES)
    figure = figure_module.Figure(figsize=(width, height), layout="constrained")
    axes = figure.add_subplot()
    image = draw_table(axes, table, num_layers, num_experts)
    axes.set_yticks(range(num_tasks), [task_names[i] for i in order], fontsize=min(7, 900 / max(num_tasks, 1)))
    if columns <= MAX_EXPERT_TICKS:
        axes.set_xticks(range(columns), [str(e) for _ in range(num_layers) for e in range(num_experts)], fontsize=7)
        axes.set_xlabel("expert")
    else:  # too many to read: the first expert of each layer
        axes.set_xticks(range(0, columns, num_experts), ["0"] * num_layers, fontsize=7)
        axes.set_xlabel(f"expert (0 to {num_experts - 1} per layer)")
    axes.set_ylabel("task")
    # plain text, not secondary axes: a figure is drawn at every RoutingMonitor log, and text is cheap
    on_top = axes.get_xaxis_transform()  # x in data units, y in axes units
    for j, layer in enumerate(layer_names):
        axes.text(j * num_experts + (num_experts - 1) / 2, 1.005, layer, transform=on_top, **LAYER_LABEL)
    if groups is not None:
        ordered = [groups[i] for i in order]
        starts = [i for i in range(num_tasks) if i == 0 or ordered[i] != ordered[i - 1]]
        on_right = axes.get_yaxis_transform()  # x in axes units, y in data units
        for start, end in zip(starts, [*starts[1:], num_tasks], strict=True):
            if start:
                axes.axhline(start - 0.5, color="white", linewidth=1.5)
            axes.text(1.01, (start + end - 1) / 2, ordered[start], transform=on_right, **GROUP_LABEL)
    label = "route weight" if group_label is None else f"route weight (tasks grouped by {group_label})"
    figure.colorbar(image, ax=axes, label=label, pad=0.02)
    if title:
        figure.suptitle(title)
    return figure
