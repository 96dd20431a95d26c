"""Route agreement and route–skill agreement on constructed route tables with known answers."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moe_mtl.analysis.agreement import route_agreement, route_skill_agreement


def one_hot_routes(choices: list[list[int]], num_experts: int = 4) -> torch.Tensor:
    return F.one_hot(torch.tensor(choices), num_experts).double()  # (T, L, E)


def test_route_agreement_of_argmax_routes_is_the_fraction_of_layers_with_the_same_expert():
    routes = one_hot_routes([[0, 1, 2, 3], [0, 1, 0, 0], [3, 2, 1, 0]])
    agreement = route_agreement(routes)
    np.testing.assert_allclose(agreement, [[1, 0.5, 0], [0.5, 1, 0.25], [0, 0.25, 1]])


def test_route_agreement_of_soft_routes_is_one_minus_the_mean_total_variation():
    routes = torch.tensor([[[0.5, 0.5], [1.0, 0.0]], [[0.75, 0.25], [0.0, 1.0]]], dtype=torch.float64)
    # layer 0: TV 0.25, layer 1: TV 1 → agreement 1 − 0.625
    assert route_agreement(routes)[0, 1] == pytest.approx(0.375)


def test_tasks_that_share_skills_share_experts_more_often_than_tasks_that_do_not():
    # 12 tasks in 4 skill groups; a group's tasks route alike (same expert at 3 of 4 layers)
    rng = np.random.default_rng(0)
    skills, choices = [], []
    for group in range(4):
        for member in range(3):
            skills.append([f"skill{group}", f"own{group}{member}"])
            choices.append([group, group, group, int(rng.integers(4))])
    result = route_skill_agreement(one_hot_routes(choices), skills, permutations=2000)
    assert result["pairs_sharing"] == 4 * 3 and result["pairs_not_sharing"] == 66 - 12
    assert result["sharing"] > 0.75 and result["not_sharing"] < 0.3
    assert result["difference"] == pytest.approx(result["sharing"] - result["not_sharing"])
    assert result["p_permutation"] < 0.01 and result["p_mannwhitney"] < 0.01

    # the same routes with skills unrelated to them: no significant difference
    unrelated = [skills[(i * 5) % 12] for i in range(12)]  # a fixed shuffle that mixes the groups
    null = route_skill_agreement(one_hot_routes(choices), unrelated, permutations=2000)
    assert null["p_permutation"] > 0.05


def test_route_skill_agreement_is_deterministic_by_seed_and_names_bad_input():
    routes = one_hot_routes([[0, 1], [0, 1], [1, 0], [1, 1]])
    skills = [["a"], ["a"], ["b"], ["c"]]
    assert route_skill_agreement(routes, skills, 500, seed=3) == route_skill_agreement(routes, skills, 500, seed=3)
    with pytest.raises(ValueError, match="3 skill sets for a route table of 4 tasks"):
        route_skill_agreement(routes, skills[:3])
    with pytest.raises(ValueError, match="6 pairs, 6 share one"):
        route_skill_agreement(routes, [["a"]] * 4)
