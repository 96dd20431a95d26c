"""The labelled route heatmap and the learning-dynamics small multiples, written as PNG and read back."""

import json

import matplotlib.image
import numpy as np
import pytest
import torch

from moe_mtl.analysis.plots import group_order, route_dynamics_figure, route_heatmap_figure
from moe_mtl.extras import require
from moe_mtl.runs import route_table_record, write_route_table

TASKS = ["sort", "sum", "evens", "count", "reverse"]
LAYERS = ["encoder.0", "encoder.1", "decoder.0"]


def routes(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(len(TASKS), len(LAYERS), 2, generator=generator).softmax(-1)


def tick_labels(axis) -> list[str]:
    return [label.get_text() for label in axis.get_ticklabels()]


def test_group_order_keeps_groups_together_in_first_seen_order():
    assert group_order(["b", "a", "b", "c", "a"]) == [0, 2, 1, 4, 3]


def test_route_heatmap_is_labelled_grouped_and_written_as_png(tmp_path):
    groups = ["order", "aggregate", "filter", "aggregate", "order"]
    figure = route_heatmap_figure(routes(), TASKS, LAYERS, groups, group_label="family", title="step 4")
    axes, colorbar = figure.axes[0], figure.axes[-1]
    # rows grouped: order (sort, reverse), aggregate (sum, count), filter (evens)
    assert tick_labels(axes.yaxis) == ["sort", "reverse", "sum", "count", "evens"]
    assert tick_labels(axes.xaxis) == ["0", "1"] * 3
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("expert", "task")
    texts = [text.get_text() for text in axes.texts]
    assert texts == [*LAYERS, "order", "aggregate", "filter"]  # layer names on top, group names at the right
    assert colorbar.get_ylabel() == "route weight (tasks grouped by family)"
    # the image rows follow the grouped order
    drawn = axes.images[0].get_array()
    np.testing.assert_allclose(drawn[1], routes()[4].reshape(-1).numpy(), rtol=1e-6)

    path = tmp_path / "route_heatmap.png"
    figure.savefig(path, dpi=50)
    image = matplotlib.image.imread(path)
    width, height = figure.get_size_inches() * 50
    assert image.shape[:2] == (round(height), round(width))
    assert image[..., :3].std() > 0.1  # drawn, not blank


def test_a_wide_route_heatmap_ticks_one_expert_per_layer():
    many = torch.full((3, 12, 16), 1 / 16)
    figure = route_heatmap_figure(many, TASKS[:3], [f"decoder.{j}" for j in range(12)])
    axes = figure.axes[0]
    assert list(axes.get_xticks()) == list(range(0, 12 * 16, 16))
    assert axes.get_xlabel() == "expert (0 to 15 per layer)"
    assert figure.axes[-1].get_ylabel() == "route weight"


def test_route_heatmap_names_mismatched_labels():
    with pytest.raises(ValueError, match="4 task names and 3 layer names"):
        route_heatmap_figure(routes(), TASKS[:4], LAYERS)


def test_route_dynamics_small_multiples_from_saved_route_tables(tmp_path):
    folder = tmp_path / "routes"
    for step in (2, 4, 6):
        write_route_table(folder / f"step{step}.json", route_table_record(routes(step), TASKS, LAYERS, step))
    records = [json.loads(path.read_text()) for path in folder.glob("*.json")]
    figure = route_dynamics_figure(records)
    panels = [axes for axes in figure.axes if axes.get_title()]
    assert [axes.get_title() for axes in panels] == ["step 2", "step 4", "step 6"]  # sorted by step
    np.testing.assert_allclose(panels[1].images[0].get_array(), routes(4).reshape(5, -1).numpy(), atol=1e-6)
    assert figure.get_suptitle().startswith("Routes over training (3 route tables")
    figure.savefig(tmp_path / "route_dynamics.png", dpi=40)
    assert matplotlib.image.imread(tmp_path / "route_dynamics.png")[..., :3].std() > 0.05

    # a long run: evenly spaced panels, first and last kept, and the title says how many were drawn
    many = [route_table_record(routes(0), TASKS, LAYERS, step) for step in range(0, 100, 5)]
    figure = route_dynamics_figure(many, max_panels=4)
    assert [axes.get_title() for axes in figure.axes if axes.get_title()] == [f"step {s}" for s in (0, 30, 65, 95)]
    assert "4 of 20 route tables" in figure.get_suptitle()


def test_a_missing_extra_names_the_pip_extra():
    with pytest.raises(ImportError, match=r"pip install moe-mtl\[analysis\]"):
        require("matplotlib_that_is_not_installed")
