"""Expert disabling: the disabled routes of each routing source, and a re-evaluation of a tiny trained run."""

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer

from moe_mtl.analysis.disabling import (
    disabled_expert,
    evaluation_routes,
    expert_disabling,
    group_drops,
    routes_without_expert,
    validation_loader,
    without_expert,
)
from moe_mtl.training.callbacks.two_stage import fix_routes

from ..training.conftest import tiny_module, tiny_trainer


def test_without_expert_renormalises_over_the_rest_and_a_route_all_on_it_goes_uniform():
    routes = torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0], [0.0, 0.4, 0.6]])
    expected = torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.5, 0.5], [0.0, 0.4, 0.6]])
    torch.testing.assert_close(without_expert(routes, 0), expected)
    with pytest.raises(ValueError, match="got 3 for 3 experts"):
        without_expert(routes, 3)


def test_learned_routes_move_to_the_next_best_expert_at_that_layer_only(data):
    module = tiny_module(data, moe={"num_experts": 3, "selection": "softmax"}).eval()
    intact = evaluation_routes(module)  # a router still learning evaluates its argmax
    task_ids = torch.arange(data.num_tasks)
    logits = module.model.router.logits(module.model.task_table(task_ids)).detach()
    disabled = routes_without_expert(module, 1, 0)
    next_best = logits[:, 1].clone()
    next_best[:, 0] = -torch.inf
    torch.testing.assert_close(disabled[:, 1], F.one_hot(next_best.argmax(-1), 3).float())
    torch.testing.assert_close(disabled[:, [0, 2, 3]], intact[:, [0, 2, 3]])
    assert (disabled[:, 1, 0] == 0).all()

    # a frozen softmax router (stage two, softmax routes): its route renormalised over the other experts
    fix_routes(module.model, "softmax", temperature=2.0)
    intact = evaluation_routes(module)
    torch.testing.assert_close(routes_without_expert(module, 2, 1)[:, 2], without_expert(intact[:, 2], 1))


def test_token_routing_is_refused(data):
    module = tiny_module(data, moe={"routing": "token", "expert_unit": "ffn"})
    with pytest.raises(ValueError, match="token routing has no per-task route"):
        routes_without_expert(module, 0, 0)


def test_the_router_overrides_are_back_as_they_were_after_disabling(data):
    module = tiny_module(data, moe={"routes": "random"})
    router = module.model.router
    own = torch.tensor([[[0.5, 0.5]] * 4])  # task 3 routed by an override of its own
    router.set_route_overrides([3], own)
    before = evaluation_routes(module)
    with disabled_expert(module, 0, 1) as routes:
        torch.testing.assert_close(evaluation_routes(module), routes)
        torch.testing.assert_close(routes[3, 0], torch.tensor([1.0, 0.0]))  # the override, renormalised
    torch.testing.assert_close(evaluation_routes(module), before)
    assert router.override_mask.nonzero().flatten().tolist() == [3]


def test_expert_disabling_of_a_tiny_trained_run_reports_the_drop_of_the_tasks_that_used_the_expert(data, tmp_path):
    # random one-hot routes: each expert of a layer serves some tasks; a few steps make the experts differ
    module = tiny_module(data, moe={"routes": "random"}, optim={"lr": 1e-2})
    trainer = Trainer(**tiny_trainer(tmp_path, max_steps=4), callbacks=[])
    trainer.fit(module, datamodule=data)
    intact = evaluation_routes(module)

    # three seen tasks on each expert of encoder.0, one dev example each
    on = [[data.task_names[i] for i in module.seen_tasks if intact[i, 0, e] == 1][:3] for e in (0, 1)]
    loader = validation_loader(data, max_examples=1, tasks=on[0] + on[1])
    quiet = {"accelerator": "cpu", "default_root_dir": str(tmp_path)}
    rows = expert_disabling(module, loader, tmp_path / "disabling", layers=["encoder.0"], **quiet)

    assert sorted(row["task"] for row in rows) == sorted(2 * (on[0] + on[1]))  # (expert 0, expert 1) × task
    for row in rows:
        task = data.task_names.index(row["task"])
        assert row["weight"] == intact[task, 0, row["expert"]].item()
        assert row["drop"] == pytest.approx(row["intact"] - row["score"])
        assert row["loss_rise"] == pytest.approx(row["loss"] - row["intact_loss"])
        if row["weight"] == 0:  # its route did not change: exactly the intact evaluation
            assert (row["drop"], row["loss_rise"]) == (0.0, 0.0)
        else:  # routed to the other expert now
            assert row["loss_rise"] != 0.0
    assert {row["weight"] for row in rows} == {0.0, 1.0}
    assert (tmp_path / "disabling/intact/evaluation").is_dir()
    assert (tmp_path / "disabling/encoder.0-expert1/evaluation").is_dir()
    # the model is left as it was: its own routes, no override
    torch.testing.assert_close(evaluation_routes(module), intact)
    assert not module.model.router.override_mask.any()

    # per family: a task counts in each of its families
    families = {task.name: task.features["families"] for task in data.tasks}
    grouped = {(g["expert"], g["group"]): (g["tasks"], g["mean_drop"]) for g in group_drops(rows, families)}
    assert {group for _, group in grouped} == {f for r in rows for f in families[r["task"]]}
    for (expert, group), (count, mean) in grouped.items():
        drops = [r["drop"] for r in rows if r["expert"] == expert and group in families[r["task"]]]
        assert (count, mean) == (len(drops), pytest.approx(sum(drops) / len(drops)))
    with pytest.raises(ValueError, match="no groups for the evaluated tasks"):
        group_drops(rows, {})

    with pytest.raises(ValueError, match=r"allowed: routed layer names \['encoder.0'"):
        expert_disabling(module, loader, tmp_path, layers=["encoder.9"])
    with pytest.raises(ValueError, match=r"tasks: \['nonesuch'\] given; allowed: the validated tasks \['reverse'"):
        validation_loader(data, tasks=["nonesuch"])
