"""Parameter groups, their gradient norms and expert-sparse updates on real MoE-BART models."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from moe_mtl.training.callbacks.clipping import clipping_groups
from moe_mtl.training.callbacks.nan_guard import optimizer_grad_norms
from moe_mtl.training.optim import (
    PARAMETER_GROUPS,
    build_param_groups,
    decays,
    drop_unrouted_expert_grads,
    expert_usage,
    group_parameters,
    parameter_group,
)

from ..models.conftest import tiny_moe

LRS = {"backbone": 1e-3, "router": 1e-2, "task_table": 1e-1}


def _loss(model, task_ids: list[int]) -> torch.Tensor:
    """A teacher-forced NLL of random targets (vocabulary 64) for one batch of `task_ids`."""
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(3, 64, (len(task_ids), 6), generator=generator)
    labels = torch.randint(3, 64, (len(task_ids), 4), generator=generator)
    out = model(input_ids=input_ids, decoder_input_ids=labels, task_ids=torch.tensor(task_ids))
    return F.cross_entropy(out.logits.flatten(0, 1), labels.flatten()), out


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("model.encoder.task_table.embedding.weight", "task_table"),
        ("model.encoder.router.network.layers.3.2.bias", "router"),
        ("model.encoder.router.network.rnn.weight_ih_l0", "router"),
        ("model.decoder.layers.1.gate.proj.weight", "router"),
        ("model.encoder.layers.0.experts.1.self_attn.q_proj.weight", "backbone"),
        ("model.decoder.layers.1.experts.0.fc1.bias", "backbone"),
        ("model.shared.weight", "backbone"),
        ("lm_head.weight", "backbone"),
        # whole path segments only: a layer whose name merely contains the words stays in the backbone
        ("model.encoder.layers.0.gate_proj.weight", "backbone"),
        ("model.encoder.layers.0.routers_norm.weight", "backbone"),
    ],
)
def test_parameter_group_by_name(name, group):
    assert parameter_group(name) == group


@pytest.mark.parametrize(
    ("options", "router_prefixes"),
    [
        ({}, ("model.encoder.router.network.",)),
        ({"expert_unit": "ffn", "router": "gru"}, ("model.encoder.router.network.",)),
        (
            {"routing": "token", "expert_unit": "ffn"},
            tuple(f"model.{s}.layers.{i}.gate." for s in ("encoder", "decoder") for i in (0, 1)),
        ),
    ],
)
def test_parameter_groups_of_real_models(options, router_prefixes):
    model = tiny_moe(num_experts=2, num_tasks=3, task_dim=8, **options)
    groups = {name: parameter_group(name) for name, _ in model.named_parameters()}
    assert [n for n, g in groups.items() if g == "task_table"] == ["model.encoder.task_table.embedding.weight"]
    router = {n for n, g in groups.items() if g == "router"}
    assert router and router == {n for n in groups if n.startswith(router_prefixes)}
    experts = {n for n in groups if ".experts." in n}
    assert experts and all(groups[n] == "backbone" for n in experts)


def test_decay_applies_to_matrices_only():
    model = tiny_moe(num_experts=2, num_tasks=3, task_dim=8)
    params = dict(model.named_parameters())
    assert decays("model.shared.weight", params["model.shared.weight"])
    assert decays("model.encoder.task_table.embedding.weight", params["model.encoder.task_table.embedding.weight"])
    for name in (
        "model.encoder.layers.0.experts.1.fc1.bias",
        "model.encoder.layers.0.experts.1.final_layer_norm.weight",
        "model.decoder.layernorm_embedding.weight",
    ):
        assert not decays(name, params[name])


@pytest.mark.parametrize("options", [{}, {"routing": "token", "expert_unit": "ffn"}])
def test_build_param_groups_splits_each_group_by_decay_and_holds_every_parameter_once(options):
    model = tiny_moe(num_experts=2, num_tasks=3, task_dim=8, **options)
    model.task_table.freeze(True)  # frozen parameters stay in their group: the layout never changes
    groups = build_param_groups(model, LRS, weight_decay=0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    layout = [(g["name"], g["group"], g["lr"], g["weight_decay"]) for g in groups]
    assert layout == [
        ("backbone", "backbone", 1e-3, 0.01),
        ("backbone.no_decay", "backbone", 1e-3, 0.0),
        ("router", "router", 1e-2, 0.01),
        ("router.no_decay", "router", 1e-2, 0.0),
        ("task_table", "task_table", 1e-1, 0.01),  # the table has no 1-d parameter: no "task_table.no_decay"
    ]
    held = [id(p) for g in groups for p in g["params"]]
    assert sorted(held) == sorted(names) and len(held) == len(set(held))
    for group in groups:
        for param in group["params"]:
            assert parameter_group(names[id(param)]) == group["group"]
            assert (param.ndim >= 2) == (group["weight_decay"] > 0), names[id(param)]
    optimizer = torch.optim.AdamW(groups)
    per_group = group_parameters(optimizer)
    assert set(per_group) == set(PARAMETER_GROUPS)
    assert sum(len(v) for v in per_group.values()) == len(names)


def test_build_param_groups_needs_every_learning_rate():
    with pytest.raises(ValueError, match=r"learning rates missing for parameter groups \['task_table'\]"):
        build_param_groups(tiny_moe(num_tasks=2), {"backbone": 1e-3, "router": 1e-2}, 0.0)


def _grad_norm(params) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))


def test_optimizer_grad_norms_flag_non_finite_grads_and_take_the_clipping_norms_as_they_are():
    model = tiny_moe(num_experts=2, num_tasks=3, task_dim=8, selection="softmax").train()
    optimizer = torch.optim.AdamW(build_param_groups(model, LRS, 0.01))
    _loss(model, [0, 1, 2])[0].backward()
    params = group_parameters(optimizer)
    norms = optimizer_grad_norms(optimizer)
    for group in PARAMETER_GROUPS:
        torch.testing.assert_close(norms[group], _grad_norm(params[group]))
    # GroupGradientClipping's key "backbone" holds the groups named "backbone" and "backbone.no_decay": the group
    held = clipping_groups(optimizer.param_groups, PARAMETER_GROUPS)
    assert {group: list(map(id, held[group])) for group in held} == {g: list(map(id, p)) for g, p in params.items()}
    # norms the clipping callback computed (`pre_clip_grad_norms`) are taken as they are, not read again
    known = {"router": torch.tensor(math.inf), "backbone.no_decay": torch.tensor(0.0)}
    taken = optimizer_grad_norms(optimizer, known)
    assert taken["router"] is known["router"] and "backbone.no_decay" not in taken  # part of a group: read it all
    assert torch.equal(taken["backbone"], norms["backbone"]) and torch.equal(taken["task_table"], norms["task_table"])

    for bad in (float("inf"), float("nan")):
        params["router"][0].grad[0] = bad
        flagged = optimizer_grad_norms(optimizer)
        assert not flagged["router"].isfinite() and flagged["backbone"].isfinite()
    params["backbone"][0].grad = None
    for param in params["task_table"]:
        param.grad = None
    assert "task_table" not in optimizer_grad_norms(optimizer)  # a group without grads has no norm


def test_unrouted_experts_are_left_exactly_as_they_are_by_adamw_with_weight_decay():
    model = tiny_moe(num_experts=2, num_tasks=3, task_dim=8, selection="softmax").train()
    optimizer = torch.optim.AdamW(build_param_groups(model, LRS, weight_decay=0.01))
    _loss(model, [0, 1, 2])[0].backward()  # softmax routes: every expert is used and gets Adam moments
    optimizer.step()
    optimizer.zero_grad()
    assert all(optimizer.state[p] for p in model.parameters())

    model.router.selection = "gumbel_st"  # hard routes, all experts run: unchosen ones get zero (not None) grads
    loss, out = _loss(model, [1, 1, 1])
    loss.backward()
    used = expert_usage(model, out.expert_mask)
    assert used.shape == (4, 2) and used.sum(1).tolist() == [1, 1, 1, 1]  # one task: one expert per layer
    unused = [(layer, e) for j, layer in enumerate(model.routed_layer_names) for e in range(2) if not used[j, e]]
    assert all(
        p.grad is not None and not p.grad.any() for layer, e in unused for p in model.expert_parameters(layer, e)
    )

    # control: without dropping, stale moments and weight decay move the unused experts
    control_model, control_optimizer = copy.deepcopy((model, optimizer))
    for param, copied in zip(model.parameters(), control_model.parameters(), strict=True):
        copied.grad = None if param.grad is None else param.grad.clone()  # deepcopy leaves a Parameter's grad out
    control_optimizer.step()
    layer, e = unused[0]
    moved = control_model.expert_parameters(layer, e)[0]
    assert not torch.equal(moved, model.expert_parameters(layer, e)[0])

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert drop_unrouted_expert_grads(model, used) == 4
    optimizer.step()
    unused_ids = {id(p) for layer, e in unused for p in model.expert_parameters(layer, e)}
    used_ids = {
        id(p)
        for j, layer in enumerate(model.routed_layer_names)
        for e in range(2)
        if used[j, e]
        for p in model.expert_parameters(layer, e)
    }
    for name, param in model.named_parameters():
        if id(param) in unused_ids:
            assert torch.equal(param, before[name]), name
        elif id(param) in used_ids and param.ndim >= 2:
            assert not torch.equal(param, before[name]), name
