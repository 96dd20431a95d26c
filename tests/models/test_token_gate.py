"""Task-aware token gate, capacity and the load-balancing loss."""

import torch

from moe_mtl.models.token_gate import TaskAwareTokenGate, capacity_mask, load_balancing_loss


def test_load_balancing_loss_is_one_when_balanced_and_e_when_collapsed():
    uniform = torch.full((8, 4), 0.25)
    assert load_balancing_loss(uniform, torch.arange(8) % 4).item() == 1.0
    collapsed = torch.zeros(8, 4)
    collapsed[:, 2] = 1.0
    assert load_balancing_loss(collapsed, torch.full((8,), 2)).item() == 4.0


def test_a_gate_without_tokens_has_no_aux_loss():
    gate = TaskAwareTokenGate(d_model=4, task_dim=2, num_experts=2, top_k=1, capacity_factor=None)
    routes = gate(torch.zeros(0, 4), torch.zeros(0, 2))
    assert routes.aux_loss is None and routes.weights.shape == (0, 2)


def test_capacity_keeps_each_experts_first_tokens():
    assigned = torch.tensor([[[1, 0], [1, 0], [0, 1], [1, 0]]], dtype=torch.bool)  # one choice per token
    kept = capacity_mask(assigned, capacity=2)
    assert torch.equal(kept, torch.tensor([[1, 0], [1, 0], [0, 1], [0, 0]], dtype=torch.bool))


def test_capacity_serves_first_choices_before_second_choices():
    first = torch.tensor([[1, 0], [0, 1], [1, 0]], dtype=torch.bool)
    second = torch.tensor([[0, 1], [1, 0], [0, 1]], dtype=torch.bool)
    kept = capacity_mask(torch.stack([first, second]), capacity=2)
    # expert 0: first choices of tokens 0 and 2 fill it, so token 1's second choice is dropped
    assert kept[:, 0].tolist() == [True, False, True]
    # expert 1: token 1's first choice, then token 0's second choice; token 2's second choice is dropped
    assert kept[:, 1].tolist() == [True, True, False]


def test_top1_weight_is_one_forward_and_the_gate_learns():
    gate = TaskAwareTokenGate(d_model=6, task_dim=3, num_experts=4, top_k=1, capacity_factor=None)
    tokens, tasks = torch.randn(10, 6), torch.randn(10, 3)
    routes = gate(tokens, tasks)
    assert torch.equal((routes.weights != 0).sum(-1), torch.ones(10, dtype=torch.long))
    assert torch.equal(routes.weights.detach().max(-1).values, torch.ones(10))
    (routes.weights * torch.randn(10, 4)).sum().backward()
    assert gate.proj.weight.grad.abs().sum() > 0


def test_top2_weights_are_renormalised():
    gate = TaskAwareTokenGate(d_model=6, task_dim=3, num_experts=4, top_k=2, capacity_factor=None)
    routes = gate(torch.randn(10, 6), torch.randn(10, 3))
    torch.testing.assert_close(routes.weights.sum(-1), torch.ones(10))
    assert torch.equal((routes.weights != 0).sum(-1), torch.full((10,), 2))


def test_tokens_over_capacity_are_dropped_and_counted():
    gate = TaskAwareTokenGate(d_model=4, task_dim=2, num_experts=2, top_k=1, capacity_factor=0.5)
    with torch.no_grad():  # every token prefers expert 0
        gate.proj.weight.zero_()
        gate.proj.bias.copy_(torch.tensor([5.0, 0.0]))
    routes = gate(torch.randn(8, 4), torch.randn(8, 2))
    capacity = 2  # ceil(0.5 * 8 tokens * top-1 / 2 experts)
    assert (routes.weights[:, 0] != 0).sum().item() == capacity
    assert routes.overflow.item() == 8 - capacity
