"""Figures of the routes: a labelled route heatmap and the learning dynamics as small multiples.

Both are matplotlib `Figure`s built without pyplot (no global figure state, nothing to close): save them with
`savefig`, or log them with TensorBoard's `add_figure`. Rows are tasks, columns (layer, expert) pairs, layer-major,
as in `evaluation.analysis.route_heatmap`; colours are viridis over route weights in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from .extras import require

MAX_PANELS = 12  # small multiples of a long run: this many steps, evenly spaced, first and last included
MAX_INCHES = 24.0  # a figure side: larger only slows drawing (the RoutingMonitor draws one at every log)
MAX_EXPERT_TICKS = 64  # more (layer, expert) columns than this get one tick per layer
LAYER_LABEL = {"ha": "center", "va": "bottom", "fontsize": 8, "rotation": 0}
GROUP_LABEL = {"ha": "left", "va": "center", "fontsize": 8}


def group_order(groups: Sequence[str]) -> list[int]:
    """Row order that puts tasks of the same group together: groups in first-seen order, tasks stable within."""
    first = {}
    for i, group in enumerate(groups):
        first.setdefault(group, i)
    return sorted(range(len(groups)), key=lambda i: (first[groups[i]], i))


def _draw_table(axes, table: np.ndarray, num_layers: int, num_experts: int):
    """imshow of a (T, L·E) table on `axes` with white lines between layers; returns the image."""
    image = axes.imshow(table, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
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

    y axis: task names (grouped by `groups`, one label per task, when given: tasks of a group together, a line
    between groups, the group name at the right); x axis: expert index under each layer's name; a colour bar
    of the route weight.
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
    image = _draw_table(axes, table, num_layers, num_experts)
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


def route_dynamics_figure(records: Sequence[dict[str, Any]], max_panels: int = MAX_PANELS) -> Any:
    """Small multiples of saved route tables (`evaluation.analysis.route_table_record`s, by step): one heatmap per
    step, a shared colour bar. With more than `max_panels` records, that many evenly spaced ones (first and last
    included) are drawn, and the title says how many of how many."""
    figure_module = require("matplotlib.figure")
    if not records:
        raise UsageError("route dynamics: no route tables (expected <run>/routes/step<N>.json files)")
    if max_panels < 2:
        raise UsageError(f"max_panels: expected at least 2, got {max_panels}")
    records = sorted(records, key=lambda record: record["step"])
    shown = records
    if len(records) > max_panels:
        picks = np.unique(np.rint(np.linspace(0, len(records) - 1, max_panels)).astype(int))
        shown = [records[i] for i in picks]
    columns = min(4, len(shown))
    rows = -(-len(shown) // columns)
    first = np.asarray(shown[0]["routes"], dtype=np.float64)
    num_tasks, num_layers, num_experts = first.shape
    panel_w, panel_h = max(2.5, 0.12 * num_layers * num_experts), max(2.0, 0.07 * num_tasks)
    figure = figure_module.Figure(figsize=(columns * panel_w + 1.5, rows * panel_h + 1.0), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    image = None
    for axes, record in zip(grid.flat, shown, strict=False):
        table = np.asarray(record["routes"], dtype=np.float64)
        if table.shape != first.shape or record["tasks"] != shown[0]["tasks"]:
            raise UsageError(
                f"route dynamics: the table at step {record['step']} has shape {table.shape} (tasks "
                f"{len(record['tasks'])}); the first has {first.shape}: one run's tables must match"
            )
        image = _draw_table(axes, table.reshape(num_tasks, -1), num_layers, num_experts)
        axes.set_title(f"step {record['step']}", fontsize=9)
        axes.set_xticks([j * num_experts + (num_experts - 1) / 2 for j in range(num_layers)], record["layers"])
        axes.tick_params(axis="x", labelsize=6, rotation=90)
        axes.set_yticks([])
        axes.set_ylabel(f"{num_tasks} tasks", fontsize=7)
    for axes in list(grid.flat)[len(shown) :]:
        axes.set_axis_off()
    figure.colorbar(image, ax=grid, label="route weight")
    count = (
        f"{len(shown)} of {len(records)} route tables" if len(shown) < len(records) else f"{len(records)} route tables"
    )
    figure.suptitle(f"Routes over training ({count}; rows: tasks, columns: experts per layer)")
    return figure
