"""Route statistics (entropies, utilisation) and the route heatmap figure."""

import math

import numpy as np
import pytest
import torch

from moe_mtl.evaluation.routes import expert_utilisation, route_entropy, route_heatmap_figure


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


# --- the heatmap figure ---


def test_heatmap_draws_the_routes_with_matplotlibs_viridis_and_white_lines_between_layers():
    matplotlib = pytest.importorskip("matplotlib")
    routes = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]],
            [[0.0, 1.0], [1.0, 0.0], [0.25, 0.75]],
        ]
    )  # (T=2, L=3, E=2)
    figure = route_heatmap_figure(routes, ["a", "b"], ["encoder.0", "encoder.1", "decoder.0"])
    axes = figure.axes[0]
    image = axes.images[0]
    assert image.get_cmap().name == "viridis" and image.get_clim() == (0.0, 1.0)
    np.testing.assert_allclose(image.get_array(), routes.reshape(2, -1).numpy())
    drawn = image.to_rgba(routes.reshape(2, -1).numpy(), bytes=True)[..., :3]
    viridis = matplotlib.colormaps["viridis"]
    assert (drawn == viridis(routes.reshape(2, -1).numpy(), bytes=True)[..., :3]).all()
    assert tuple(drawn[0, 0]) == tuple(viridis(1.0, bytes=True)[:3]) != tuple(drawn[0, 1])
    # one white line after each layer but the last, between its experts' columns
    separators = [line for line in axes.lines if line.get_color() == "white"]
    assert [line.get_xdata()[0] for line in separators] == [1.5, 3.5]


def test_heatmap_brightness_follows_the_route_value():
    pytest.importorskip("matplotlib")
    values = torch.linspace(0.0, 1.0, 6)
    image = route_heatmap_figure(values.view(1, 1, 6), ["a"], ["encoder.0"]).axes[0].images[0]
    colours = image.to_rgba(values.view(1, 6).numpy(), bytes=True)[0, :, :3].astype(np.float64)
    assert (np.diff(luminance(colours)) > 0).all()


def test_heatmap_takes_tensors_with_gradients_and_rejects_bad_shapes():
    pytest.importorskip("matplotlib")
    routes = torch.rand(2, 2, 3, requires_grad=True)
    assert route_heatmap_figure(routes, ["a", "b"], ["l0", "l1"]).axes[0].images[0].get_array().shape == (2, 6)
    with pytest.raises(ValueError, match=r"got shape \(2, 3\)"):
        expert_utilisation(torch.rand(2, 3))
