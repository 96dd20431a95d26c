"""Routes of unseen tasks: the pure functions of each source, and `assign_unseen_routes` on a tiny MoE-BART."""

import pytest
import torch

from moe_mtl.representations.unseen_routes import (
    assign_unseen_routes,
    average_routes,
    check_source,
    nearest_rows,
    random_routes,
)

from ..models.conftest import tiny_moe


def test_nearest_rows_go_by_cosine_similarity_not_distance():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    queries = torch.tensor([[10.0, 0.5], [0.01, 0.05], [-1.0, -1.0], [3.0, 3.0]])
    assert nearest_rows(queries, keys).tolist() == [0, 1, 0, 2]  # ties go to the lowest index


def test_average_and_random_routes():
    assert torch.equal(average_routes(2, 3, 4), torch.full((2, 3, 4), 0.25))
    one = random_routes(5, 6, 3, seed=7)
    assert torch.equal(one, random_routes(5, 6, 3, seed=7)) and not torch.equal(one, random_routes(5, 6, 3, seed=8))
    assert torch.equal(one.sum(-1), torch.ones(5, 6)) and set(one.unique().tolist()) == {0.0, 1.0}
    two = random_routes(5, 6, 3, seed=7, k=2)  # the paper's "random2": two experts, half each
    assert torch.equal((two > 0).sum(-1), torch.full((5, 6), 2)) and torch.equal(two.sum(-1), torch.ones(5, 6))


def test_sources_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"`transfer\.unseen_routes` is 'closest'; allowed: representation, nearest"):
        check_source("closest", "text", "task")
    with pytest.raises(
        ValueError, match=r"`transfer.representation` is 'bert': neither a kind .text, fisher., an encoder folder"
    ):
        check_source("nearest", "bert", "task")
    with pytest.raises(ValueError, match=r"'text:/no/such': the encoder folder '/no/such' does not exist; give"):
        check_source("nearest", "text:/no/such", "task")
    with pytest.raises(ValueError, match=r"the encoder folder '.*' has no config.json .not a model folder."):
        check_source("nearest", f"text:{tmp_path}", "task")
    (tmp_path / "config.json").write_text("{}")
    check_source("nearest", f"text:{tmp_path}", "task")
    with pytest.raises(ValueError, match=r"'random', but token routing .* allowed with token routing: representation"):
        check_source("random", "text", "token")
    path = tmp_path / "vectors.json"
    path.write_text("{}")
    check_source("representation", str(path), "token")


@pytest.mark.parametrize("routing", ["task", "token"])
def test_each_source_gives_the_unseen_tasks_a_route(routing):
    options = {"routing": routing, "expert_unit": "ffn"} if routing == "token" else {}
    model = tiny_moe(num_experts=3, num_tasks=4, task_dim=4, **options)
    table = model.task_table.embedding.weight
    seen_rows = table[:2].detach().clone()
    vectors = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 2.0, 0.1, 0], [0.5, 0.1, 0, 0]])
    nearest = assign_unseen_routes(
        model, [2, 3], [0, 1], "nearest", seen_rows=seen_rows, representations=vectors, task_names=list("abcd")
    )
    assert nearest == {"c": ["b"], "d": ["a"]}
    assert torch.equal(table[2], table[1]) and torch.equal(table[3], table[0])
    assign_unseen_routes(model, [2], [0, 1], "representation", seen_rows=seen_rows, representations=vectors)
    assert torch.equal(table[2], vectors[2])
    assign_unseen_routes(model, [3], [0, 1], "learned", seen_rows=seen_rows)
    torch.testing.assert_close(table[3], seen_rows.mean(0))
    if routing == "token":  # no router: "average" is the mean row, "random" has nothing to fix
        assign_unseen_routes(model, [2], [0, 1], "average", seen_rows=seen_rows)
        torch.testing.assert_close(table[2], seen_rows.mean(0))
        with pytest.raises(ValueError, match="need task routing"):
            assign_unseen_routes(model, [2], [0, 1], "random", seen_rows=seen_rows)
        return
    assign_unseen_routes(model, [2], [0, 1], "average", seen_rows=seen_rows)
    assign_unseen_routes(model, [3], [0, 1], "random", seen_rows=seen_rows, seed=3)
    router = model.router
    assert router.override_mask.tolist() == [False, False, True, True]
    assert torch.equal(router.override_routes[2], torch.full((router.num_layers, 3), 1 / 3))
    assert torch.equal(router.override_routes[3], random_routes(1, router.num_layers, 3, seed=3)[0])
    with pytest.raises(ValueError, match="width 3, the task table task_dim=4"):
        assign_unseen_routes(model, [2], [0], "representation", seen_rows=seen_rows, representations=vectors[:, :3])


def test_fixed_routes_go_with_the_nearest_row_and_rows_alone_cannot_route_them():
    model = tiny_moe(num_experts=3, num_tasks=3, task_dim=2, routes="random", route_seed=5)
    vectors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    seen_rows = model.task_table.embedding.weight[:2].detach().clone()
    assign_unseen_routes(model, [2], [0, 1], "nearest", seen_rows=seen_rows, representations=vectors)
    assert torch.equal(model.router.fixed_routes[2], model.router.fixed_routes[1])
    for source in ("representation", "learned"):
        with pytest.raises(ValueError, match=f"'{source}' give a task-table row, but the routes are fixed"):
            assign_unseen_routes(model, [2], [0, 1], source, seen_rows=seen_rows, representations=vectors)
