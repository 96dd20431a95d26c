"""Selection functions, route tables and router networks of task-level routing."""

import pytest
import torch
from safetensors.torch import save_file

from moe_mtl import MoEOptions
from moe_mtl.models.routing import (
    SPARSE_SELECTIONS,
    TaskRouter,
    TaskTable,
    fixed_route_table,
    gumbel_noise,
    hard_top_k,
    select_experts,
    sparse_select,
)

from .conftest import tiny_moe


def test_hard_top_k_is_one_hot_argmax_or_renormalised_top_k():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 1.0, 2.0]])
    assert torch.equal(hard_top_k(logits), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    top2 = hard_top_k(logits, 2)
    assert torch.equal(top2 > 0, torch.tensor([[True, True, False], [True, False, True]]))
    torch.testing.assert_close(top2.sum(-1), torch.ones(2))
    torch.testing.assert_close(top2[1, [0, 2]], torch.tensor([3.0, 2.0]).softmax(-1))


def test_softmax_selection_sharpens_as_temperature_falls():
    logits = torch.tensor([[1.0, 0.5, 0.0]])
    hot, cold = select_experts(logits, "softmax", 10.0), select_experts(logits, "softmax", 0.1)
    torch.testing.assert_close(hot, (logits / 10.0).softmax(-1))
    assert hot.max() < 0.4 < 0.99 < cold.max()


def test_gumbel_straight_through_is_hard_forward_and_soft_backward():
    logits = torch.randn(5, 4, requires_grad=True)
    torch.manual_seed(7)
    hard = select_experts(logits, "gumbel_st", 0.5)
    torch.manual_seed(7)
    soft = select_experts(logits, "gumbel", 0.5)
    assert torch.equal(hard.detach(), torch.nn.functional.one_hot(soft.argmax(-1), 4).float())
    probe = torch.randn(5, 4)
    (grad_hard,) = torch.autograd.grad((hard * probe).sum(), logits)
    (grad_soft,) = torch.autograd.grad((soft * probe).sum(), logits)
    torch.testing.assert_close(grad_hard, grad_soft)


def test_gumbel_noise_is_finite_and_gumbel_selection_survives_extreme_logits():
    noise = gumbel_noise(torch.Size([100_000]), torch.device("cpu"))
    assert torch.isfinite(noise).all()
    logits = torch.tensor([[1e4, -1e4, 0.0]], dtype=torch.float16)
    assert torch.isfinite(select_experts(logits.float(), "gumbel_st", 0.1)).all()


def test_random_routes_are_seeded_one_hot():
    options = MoEOptions(num_experts=3, num_tasks=5, routes="random", route_seed=1)
    table = fixed_route_table(options, 4)
    assert table.shape == (5, 4, 3) and torch.equal(table.sum(-1), torch.ones(5, 4))
    assert torch.equal(table, fixed_route_table(options, 4))
    other = fixed_route_table(MoEOptions(num_experts=3, num_tasks=5, routes="random", route_seed=2), 4)
    assert not torch.equal(table, other)


def test_given_routes_accept_indices_or_weights_and_name_bad_shapes():
    indices = MoEOptions(num_experts=2, num_tasks=2, routes="given", given_routes=[[0, 1], [1, 1]])
    assert torch.equal(fixed_route_table(indices, 2).argmax(-1), torch.tensor([[0, 1], [1, 1]]))
    weights = [[[0.5, 0.5], [1.0, 0.0]], [[0.0, 1.0], [0.2, 0.8]]]
    soft = MoEOptions(num_experts=2, num_tasks=2, routes="given", given_routes=weights)
    assert torch.equal(fixed_route_table(soft, 2), torch.tensor(weights))
    with pytest.raises(ValueError, match=r"`given_routes` has shape \(2, 3\); expected .* \(2, 2\)"):
        fixed_route_table(MoEOptions(num_experts=2, num_tasks=2, routes="given", given_routes=[[0] * 3] * 2), 2)
    for bad in ([[[0.5, -0.5], [1.0, 0.0]]] * 2, [[[0.0, 0.0], [1.0, 0.0]]] * 2):
        with pytest.raises(ValueError, match=r"route weights must be >= 0 with a positive sum"):
            fixed_route_table(MoEOptions(num_experts=2, num_tasks=2, routes="given", given_routes=bad), 2)
    with pytest.raises(ValueError, match=r"`given_routes` names experts \[0, 5\]; allowed: 0 to 1"):
        fixed_route_table(MoEOptions(num_experts=2, num_tasks=2, routes="given", given_routes=[[0, 5], [0, 0]]), 2)


@pytest.mark.parametrize("router", ["mlp", "lstm", "gru", "transformer"])
def test_router_gives_one_route_per_task(router):
    options = MoEOptions(num_experts=3, num_tasks=4, router=router, task_dim=8, router_hidden=16)
    table, task_router = TaskTable(4, 8), TaskRouter(options, 8, 5).train()

    task_ids = torch.tensor([2, 0, 2, 2, 0])
    weights = task_router(task_ids, table)
    assert weights.shape == (5, 5, 3)
    # one gumbel draw per distinct task: its examples share a route
    assert torch.equal(weights[0], weights[2]) and torch.equal(weights[1], weights[4])
    assert torch.equal(weights.detach().sum(-1), torch.ones(5, 5))


def test_temperature_is_a_checkpointed_buffer():
    task_router = TaskRouter(MoEOptions(num_experts=2, num_tasks=2), 8, 3)
    task_router.set_temperature(0.3)
    assert task_router.state_dict()["temperature"].item() == pytest.approx(0.3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        task_router.set_temperature(0.0)


def test_frozen_task_table_passes_no_gradient_even_if_made_trainable():
    table = TaskTable(3, 4, frozen=True)
    assert not table.embedding.weight.requires_grad
    table.embedding.weight.requires_grad_(True)  # as a checkpoint loader does
    assert not table(torch.tensor([0, 2])).requires_grad


@pytest.mark.parametrize("top_k", [1, 2])
def test_argmax_selection_routes_hard_in_training_too_and_passes_no_gradient(top_k):
    options = MoEOptions(num_experts=3, num_tasks=4, task_dim=8, selection="argmax", top_k=top_k)
    table, task_router = TaskTable(4, 8), TaskRouter(options, 8, 5)
    task_ids = torch.tensor([2, 0, 2, 3])
    task_router.set_temperature(0.01)  # the temperature plays no part in hard routes
    training = task_router.train()(task_ids, table)
    task_router.set_temperature(100.0)
    evaluation = task_router.eval()(task_ids, table)
    assert torch.equal(training, evaluation)
    # the same as the evaluation routes of the logits (close: the router runs once per distinct task)
    torch.testing.assert_close(training, hard_top_k(task_router.logits(table(task_ids)), top_k))
    assert torch.equal((training > 0).sum(-1), torch.full((4, 5), top_k))
    assert not training.requires_grad

    # in a whole model: the loss reaches the chosen experts only, and neither router nor task table
    model = tiny_moe(num_experts=3, num_tasks=4, task_dim=8, selection="argmax", top_k=top_k).train()
    ids = torch.randint(3, 64, (4, 6))
    out = model(input_ids=ids, decoder_input_ids=ids, task_ids=torch.tensor([1, 1, 1, 1]))
    out.logits.logsumexp(-1).sum().backward()
    assert all(p.grad is None for p in [*model.router.parameters(), *model.task_table.parameters()])
    for layer, record in out.routes.items():
        assert record.used.sum() == top_k  # one task: its top-k experts run, the others get no gradient
        for expert in range(3):
            has_grad = [p.grad is not None for p in model.expert_parameters(layer, expert)]
            assert has_grad == [bool(record.used[expert])] * len(has_grad), (layer, expert)


@pytest.mark.parametrize("frozen", [False, True])
def test_softmax_routes_evaluate_as_trained_once_the_router_is_frozen(frozen):
    """Learned routes evaluate by their hard top-k (the paper's inference); a frozen router's soft routes
    (stage two) evaluate as they train: each task's softmax(logits / τ)."""
    options = MoEOptions(num_experts=3, num_tasks=4, task_dim=8, selection="softmax", freeze_router=frozen)
    table, task_router = TaskTable(4, 8), TaskRouter(options, 8, 5)
    task_router.set_temperature(2.0)
    task_ids = torch.tensor([2, 0, 2, 3])
    soft = (task_router.logits(table(task_ids)) / 2.0).softmax(-1)
    torch.testing.assert_close(task_router.train()(task_ids, table), soft)
    evaluation = task_router.eval()(task_ids, table)
    torch.testing.assert_close(evaluation, soft if frozen else hard_top_k(soft))
    assert all(p.requires_grad != frozen for p in task_router.parameters())


@pytest.mark.parametrize("routes", ["learned", "average"])
def test_route_overrides_route_their_tasks_in_training_and_evaluation_without_gradient(routes):
    model = tiny_moe(num_experts=3, num_tasks=3, routes=routes, selection="softmax")
    router, table = model.router, model.task_table
    task_ids = torch.tensor([0, 1, 2, 1])
    before = {training: router.train(training)(task_ids, table).detach() for training in (True, False)}
    fixed = torch.zeros(1, router.num_layers, 3)
    fixed[..., 2] = 1.0
    router.set_route_overrides([1], fixed)
    for training in (True, False):
        weights = router.train(training)(task_ids, table)
        assert torch.equal(weights[[1, 3]], fixed.expand(2, -1, -1))
        torch.testing.assert_close(weights[[0, 2]], before[training][[0, 2]])
    if routes == "learned":  # task 1's route passes no gradient to its task-table row
        router.train()(torch.tensor([1]), table).sum().backward()
        assert table.embedding.weight.grad is None or not table.embedding.weight.grad.any()
    router.clear_route_overrides([1])
    assert not router.override_mask.any()
    torch.testing.assert_close(router.eval()(task_ids, table), before[False])


def test_route_overrides_are_checked_and_saved_and_old_models_load_without_them(tmp_path):
    model = tiny_moe(num_experts=2, num_tasks=2)
    router = model.router
    with pytest.raises(ValueError, match=r"expected .tasks, routed layers, experts."):
        router.set_route_overrides([0], torch.ones(1, 1, 2))
    with pytest.raises(ValueError, match="task ids \\[5\\]; allowed: 0 to 1"):
        router.set_route_overrides([5], torch.ones(1, router.num_layers, 2))
    with pytest.raises(ValueError, match=">= 0"):
        router.set_route_overrides([0], -torch.ones(1, router.num_layers, 2))
    router.set_route_overrides([1], torch.ones(1, router.num_layers, 2))
    model.save_pretrained(tmp_path / "new")
    loaded = type(model).from_pretrained(tmp_path / "new")
    assert loaded.router.override_mask.tolist() == [False, True]
    assert torch.equal(loaded.router.override_routes, router.override_routes)
    # a state dict (or saved model) from before route overrides: loads with no override set
    old = {k: v for k, v in model.state_dict().items() if "override" not in k}
    fresh = tiny_moe(num_experts=2, num_tasks=2)
    fresh.load_state_dict(old)
    assert not fresh.router.override_mask.any()
    model.save_pretrained(tmp_path / "old")  # then its weights file rewritten as a model saved before overrides
    save_file(
        {k: v.contiguous() for k, v in old.items() if "embed_tokens" not in k and k != "lm_head.weight"},
        tmp_path / "old" / "model.safetensors",
        metadata={"format": "pt"},
    )
    legacy = type(model).from_pretrained(tmp_path / "old")
    assert legacy.router.override_mask.device.type == "cpu" and not legacy.router.override_mask.any()


@pytest.mark.parametrize("router", ["mlp", "lstm", "gru", "transformer"])
def test_task_table_and_router_start_apart_for_every_task_not_at_barts_small_init(router):
    torch.manual_seed(0)
    model = tiny_moe(num_experts=3, num_tasks=30, task_dim=16, router=router)
    table = model.task_table.embedding.weight
    assert 0.8 < table.std().item() < 1.2  # PyTorch's N(0, 1), not BART's std 0.02 (which the backbone keeps)
    assert model.lm_head.weight.std().item() < 0.03
    logits = model.router.logits(model.task_table(torch.arange(30)))  # (T, L, E)
    # BART's init gave logits ~1e-4 apart: every task's route uniform, and one argmax for all
    assert logits.std(0).mean() > 0.03
    assert len({tuple(route) for route in logits.argmax(-1).tolist()}) > 1


def test_switch_selection_is_one_hot_forward_with_the_log_probability_gradient():
    logits = torch.randn(6, 4, 3, requires_grad=True)
    weights, log_prob = sparse_select(logits, "switch", 0.5)
    assert log_prob is None
    assert torch.equal(weights.detach().sum(-1), torch.ones(6, 4))
    assert set(weights.detach().unique().tolist()) == {0.0, 1.0}
    outputs = torch.randn(6, 4, 3)  # an expert output per example, layer and expert
    (weights * outputs).sum().backward()
    chosen = weights.detach().argmax(-1, keepdim=True)
    pi = (logits.detach() / 0.5).softmax(-1)
    # d/dx of π_e / sg(π_e) = d log π_e / dx = (onehot_e − π) / τ, scaled by the chosen expert's output
    expected = outputs.gather(-1, chosen) * (weights.detach() - pi) / 0.5
    torch.testing.assert_close(logits.grad, expected)


def test_reinforce_selection_samples_the_policy_and_gives_its_log_probability():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 3.0]]]).expand(20000, 2, 3).clone().requires_grad_()
    weights, log_prob = sparse_select(logits, "reinforce", 2.0)
    assert not weights.requires_grad
    pi = (logits.detach() / 2.0).softmax(-1)
    torch.testing.assert_close(weights.mean(0), pi[0], atol=0.015, rtol=0)  # samples follow π = softmax(x/τ)
    torch.testing.assert_close(log_prob, (weights * pi.log()).sum((-1, -2)))
    log_prob.sum().backward()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("selection", SPARSE_SELECTIONS)
def test_sparse_selections_draw_routes_in_training_and_route_hard_in_evaluation(selection):
    options = MoEOptions(num_experts=3, num_tasks=4, task_dim=8, router_hidden=8, selection=selection)
    router, table = TaskRouter(options, task_dim=8, num_layers=5), TaskTable(4, 8)
    router.set_temperature(5.0)  # a flat policy: 64 draws of 5 layers' routes all equal only by a fluke
    task_ids = torch.full((64,), 2)
    sample = router.train().sample(task_ids, table)
    assert not sample.run_all  # only the drawn expert runs
    routes = {tuple(row.argmax(-1).tolist()) for row in sample.weights.detach()}
    # reinforce: a route per example, for its leave-one-out baseline; switch: one per task, as gumbel_st
    assert len(routes) > 1 if selection == "reinforce" else len(routes) == 1
    assert (sample.log_prob is not None) == (selection == "reinforce")
    evaluation = router.eval().sample(task_ids, table)
    assert evaluation.log_prob is None and not evaluation.weights.requires_grad
    assert len({tuple(row.argmax(-1).tolist()) for row in evaluation.weights}) == 1  # the task's hard top-1
