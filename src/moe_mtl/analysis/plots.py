"""Figures of the routes over training: the learning dynamics as small multiples of saved route tables.

The one route heatmap (a labelled `Figure` of one route table) is `evaluation.routes.route_heatmap_figure`;
the panels here draw each table the same way (`evaluation.routes.draw_table`): rows are tasks, columns (layer,
expert) pairs, layer-major, viridis over route weights in [0, 1]. Figures are built without pyplot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import UsageError
from ..evaluation.routes import draw_table, group_order, route_heatmap_figure
from ..extras import require

MAX_PANELS = 12  # small multiples of a long run: this many steps, evenly spaced, first and last included


def route_dynamics_figure(records: Sequence[dict[str, Any]], max_panels: int = MAX_PANELS) -> Any:
    """Small multiples of saved route tables (`runs.route_table_record`s, by step): one heatmap per
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
        image = draw_table(axes, table.reshape(num_tasks, -1), num_layers, num_experts)
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


__all__ = ["group_order", "route_dynamics_figure", "route_heatmap_figure"]
