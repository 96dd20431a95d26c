"""Route-table analysis: entropies, utilisation, the heatmap image and the JSON record."""

import json
import math

import numpy as np
import pytest
import torch

from moe_mtl.evaluation.analysis import (
    VIRIDIS_ANCHORS,
    expert_utilisation,
    route_entropy,
    route_heatmap,
    route_table_record,
    viridis,
    write_route_table,
)

DARKEST, BRIGHTEST = (68, 1, 84), (253, 231, 37)  # viridis at 0 and at 1


def one_hot_routes(experts: list[list[int]], num_experts: int) -> torch.Tensor:
    """(T, L, E) routes with task t sending layer l wholly to expert experts[t][l]."""
    return torch.nn.functional.one_hot(torch.tensor(experts), num_experts).float()


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


# --- entropies and utilisation ---


def test_one_hot_routes_have_zero_task_entropy_and_log_of_distinct_experts_when_averaged():
    # layer 0: the two tasks use different experts; layer 1: they share expert 2
    routes = one_hot_routes([[0, 2], [1, 2]], num_experts=4)
    per_task, averaged = route_entropy(routes)
    assert not per_task.isnan().any() and not averaged.isnan().any()
    torch.testing.assert_close(per_task, torch.zeros(2))
    torch.testing.assert_close(averaged, torch.tensor([math.log(2), 0.0]))


def test_four_tasks_on_four_experts_give_log_4_when_averaged():
    routes = one_hot_routes([[0], [1], [2], [3]], num_experts=5)
    per_task, averaged = route_entropy(routes)
    torch.testing.assert_close(per_task, torch.zeros(1))
    torch.testing.assert_close(averaged, torch.tensor([math.log(4)]))


@pytest.mark.parametrize("num_experts", [2, 3, 8])
def test_uniform_routes_have_entropy_log_e_both_ways(num_experts):
    routes = torch.full((3, 2, num_experts), 1.0 / num_experts)
    per_task, averaged = route_entropy(routes)
    torch.testing.assert_close(per_task, torch.full((2,), math.log(num_experts)))
    torch.testing.assert_close(averaged, torch.full((2,), math.log(num_experts)))


def test_task_weights_change_both_entropies_as_computed_by_hand():
    routes = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]])  # (T=2, L=1, E=2)

    def h(*probs):
        return -sum(p * math.log(p) for p in probs if p > 0)

    per_task, averaged = route_entropy(routes)
    torch.testing.assert_close(per_task, torch.tensor([0.5 * math.log(2)]))
    torch.testing.assert_close(averaged, torch.tensor([h(0.75, 0.25)]))

    # weights 3:1 are normalised to 0.75, 0.25: the mean route becomes [0.875, 0.125]
    per_task, averaged = route_entropy(routes, task_weights=torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(per_task, torch.tensor([0.25 * math.log(2)]))
    torch.testing.assert_close(averaged, torch.tensor([h(0.875, 0.125)]))


def test_zero_weight_leaves_a_task_out():
    routes = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 0.2, 0.8]]])
    per_task, averaged = route_entropy(routes, task_weights=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(per_task, torch.zeros(1))
    torch.testing.assert_close(averaged, torch.zeros(1))
    torch.testing.assert_close(expert_utilisation(routes, torch.tensor([0.0, 2.0])), routes[1])


def test_utilisation_is_the_mean_route_and_rows_sum_to_one():
    routes = torch.tensor(
        [
            [[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]],
            [[0.0, 0.5, 0.5], [0.4, 0.1, 0.5]],
        ]
    )
    utilisation = expert_utilisation(routes)
    assert utilisation.shape == (2, 3)
    torch.testing.assert_close(utilisation, torch.tensor([[0.5, 0.25, 0.25], [0.3, 0.2, 0.5]]))
    torch.testing.assert_close(utilisation.sum(-1), torch.ones(2))

    weighted = expert_utilisation(routes, task_weights=torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(weighted, torch.tensor([[0.25, 0.375, 0.375], [0.35, 0.15, 0.5]]))
    torch.testing.assert_close(weighted.sum(-1), torch.ones(2))


def test_random_routes_satisfy_the_entropy_bounds():
    routes = torch.randn(6, 4, 5).softmax(-1)
    per_task, averaged = route_entropy(routes)
    # concavity of entropy: the mean route is at least as uncertain as the routes on average
    assert (per_task <= averaged + 1e-6).all()
    assert (averaged <= math.log(5) + 1e-6).all()


def test_half_precision_routes_give_fp32_results():
    routes = torch.full((2, 3, 4), 0.25, dtype=torch.bfloat16)
    per_task, averaged = route_entropy(routes)
    assert per_task.dtype == averaged.dtype == expert_utilisation(routes).dtype == torch.float32
    torch.testing.assert_close(per_task, torch.full((3,), math.log(4)))


@pytest.mark.parametrize(
    ("routes", "weights", "message"),
    [
        (torch.ones(2, 3), None, r"routes: expected a non-empty \(tasks, layers, experts\) tensor, got shape \(2, 3\)"),
        (torch.ones(0, 2, 3), None, r"got shape \(0, 2, 3\)"),
        (torch.ones(2, 1, 3, 1), None, r"got shape \(2, 1, 3, 1\)"),
        (torch.full((2, 1, 2), 0.5), torch.ones(3), r"task_weights: expected shape \(2,\).*got \(3,\)"),
        (torch.full((2, 1, 2), 0.5), torch.ones(2, 1), r"task_weights: expected shape \(2,\).*got \(2, 1\)"),
        (torch.full((2, 1, 2), 0.5), torch.tensor([1.0, -1.0]), r"non-negative weights with a positive sum"),
        (torch.full((2, 1, 2), 0.5), torch.zeros(2), r"non-negative weights with a positive sum"),
    ],
)
def test_bad_shapes_and_weights_are_rejected(routes, weights, message):
    with pytest.raises(ValueError, match=message):
        route_entropy(routes, task_weights=weights)
    with pytest.raises(ValueError, match=message):
        expert_utilisation(routes, task_weights=weights)


# --- colormap and heatmap ---


def test_viridis_endpoints_anchors_clipping_and_interpolation():
    assert viridis(np.array([0.0, 1.0])).tolist() == [list(DARKEST), list(BRIGHTEST)]
    assert viridis(np.array([-3.0, 7.0, np.nan])).tolist() == [list(DARKEST), list(BRIGHTEST), list(DARKEST)]
    anchors = np.arange(len(VIRIDIS_ANCHORS)) / (len(VIRIDIS_ANCHORS) - 1)
    assert np.array_equal(viridis(anchors), VIRIDIS_ANCHORS.astype(np.uint8))
    # a quarter of the way from anchor 2 to anchor 3: (54, 92, 141)·0.75 + (39, 127, 142)·0.25, rounded
    quarter = anchors[2] + 0.25 * (anchors[3] - anchors[2])
    assert viridis(np.array(quarter)).tolist() == [50, 101, 141]
    assert viridis(np.zeros((2, 3))).shape == (2, 3, 3)


def test_viridis_brightness_rises_with_the_value():
    colours = viridis(np.linspace(0.0, 1.0, 101)).astype(np.float64)
    assert (np.diff(luminance(colours)) > 0).all()
    # values further apart get colours further apart
    distance = np.linalg.norm(colours - colours[0], axis=-1)
    assert (np.diff(distance[::10]) > 0).all()


@pytest.mark.parametrize(("tasks", "layers", "experts", "cell"), [(1, 1, 1, 1), (2, 3, 2, 4), (3, 2, 5, 8)])
def test_heatmap_shape_is_t_cell_by_l_e_cell_plus_separators(tasks, layers, experts, cell):
    image = route_heatmap(torch.rand(tasks, layers, experts), cell=cell)
    assert image.dtype == np.uint8
    assert image.shape == (3, tasks * cell, layers * experts * cell + layers - 1)


def test_heatmap_cells_carry_the_colormap_and_layers_are_separated_by_white():
    cell, experts = 4, 2
    routes = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]],
            [[0.0, 1.0], [1.0, 0.0], [0.25, 0.75]],
        ]
    )  # (T=2, L=3, E=2)
    image = route_heatmap(routes, cell=cell).transpose(1, 2, 0)  # (H, W, 3)
    layer_width = experts * cell + 1

    def block(task: int, layer: int, expert: int) -> np.ndarray:
        left = layer * layer_width + expert * cell
        return image[task * cell : (task + 1) * cell, left : left + cell]

    for task in range(2):
        for layer in range(3):
            for expert in range(experts):
                colour = viridis(routes[task, layer, expert].numpy())
                assert (block(task, layer, expert) == colour).all(), (task, layer, expert)
    assert (block(0, 0, 0) == BRIGHTEST).all() and (block(0, 0, 1) == DARKEST).all()

    separators = [layer * layer_width - 1 for layer in range(1, 3)]
    assert separators == [8, 17]
    assert (image[:, separators] == 255).all()
    # every other column is a colour of the map, never white
    cells = np.delete(image, separators, axis=1)
    assert not (cells == 255).all(-1).any()


def test_heatmap_brightness_follows_the_route_value():
    values = torch.linspace(0.0, 1.0, 6)
    image = route_heatmap(values.view(1, 1, 6), cell=2).astype(np.float64)
    column_brightness = luminance(image.transpose(1, 2, 0))[0, ::2]
    assert (np.diff(column_brightness) > 0).all()


def test_heatmap_takes_tensors_with_gradients_and_rejects_bad_cells():
    routes = torch.rand(2, 2, 3, requires_grad=True)
    assert route_heatmap(routes, cell=1).shape == (3, 2, 2 * 3 + 1)
    for cell in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match=r"cell: expected a positive int"):
            route_heatmap(routes, cell=cell)
    with pytest.raises(ValueError, match=r"got shape \(2, 3\)"):
        route_heatmap(torch.rand(2, 3))


# --- record and JSON ---


def test_record_holds_names_shape_and_rounded_routes():
    routes = torch.tensor([[[1 / 3, 2 / 3], [1.0, 0.0]]])  # (T=1, L=2, E=2)
    record = route_table_record(routes, ["qa"], ["encoder.0", "decoder.0"], step=120)
    assert record == {
        "step": 120,
        "tasks": ["qa"],
        "layers": ["encoder.0", "decoder.0"],
        "num_experts": 2,
        "routes": [[[0.333333, 0.666667], [1.0, 0.0]]],
    }
    assert all(isinstance(p, float) for layer in record["routes"][0] for p in layer)


@pytest.mark.parametrize(
    ("tasks", "layers", "message"),
    [
        (["a"], ["l0", "l1", "l2"], r"task_names: got 1 names, expected 2 .*\(2, 3, 4\)"),
        (["a", "b"], ["l0"], r"layer_names: got 1 names, expected 3 .*\(2, 3, 4\)"),
    ],
)
def test_record_rejects_name_counts_that_do_not_match(tasks, layers, message):
    with pytest.raises(ValueError, match=message):
        route_table_record(torch.full((2, 3, 4), 0.25), tasks, layers, step=0)


def test_written_record_loads_back_and_leaves_no_temporary_file(tmp_path):
    routes = torch.randn(3, 2, 4).softmax(-1)
    record = route_table_record(routes, ["a", "b", "c"], ["enc", "dec"], step=7)
    path = tmp_path / "runs" / "routes" / "step_7.json"  # parent folders do not exist yet
    write_route_table(path, record)
    with path.open() as handle:
        loaded = json.load(handle)
    assert loaded == record
    torch.testing.assert_close(torch.tensor(loaded["routes"]), routes, atol=1e-6, rtol=0)
    assert [p.name for p in path.parent.iterdir()] == ["step_7.json"]

    write_route_table(path, {**record, "step": 8})  # overwrites in place
    assert json.loads(path.read_text())["step"] == 8
    assert [p.name for p in path.parent.iterdir()] == ["step_7.json"]


def test_failed_write_keeps_the_old_file_and_cleans_up(tmp_path):
    path = tmp_path / "routes.json"
    write_route_table(path, {"step": 1})
    with pytest.raises(TypeError):
        write_route_table(path, {"step": 2, "routes": object()})  # not JSON-serialisable, fails mid-write
    assert json.loads(path.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["routes.json"]
