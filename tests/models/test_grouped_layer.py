"""GroupedLayer: a mixed-task batch through whole-layer experts as one layer call, as each expert on its own rows."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers.models.bart.modeling_bart import BartEncoderLayer

from moe_mtl.models.experts import schedule
from moe_mtl.models.grouped_layer import ExpertGrouping, ExpertGroups, group_by_expert
from moe_mtl.models.layers import LayerExperts, LayerPlan, LayerRoute

from .conftest import generating_model, tiny_bart_config

TASKS = torch.tensor([0, 1, 3, 2, 1, 0])  # with the given routes below, every routed layer splits this batch
GIVEN = [[2, 0, 1, 2], [1, 0, 2, 1], [0, 1, 0, 2], [2, 1, 0, 1]]  # (num_tasks=4, routed layers=4)


def bank(num_experts: int = 3) -> LayerExperts:
    torch.manual_seed(0)
    config = tiny_bart_config(init_std=0.5)
    layers = [BartEncoderLayer(config, layer_idx=e) for e in range(num_experts)]
    for layer in layers:  # distinct layer norms too, which upcycled experts start without
        with torch.no_grad():
            for norm in (layer.self_attn_layer_norm, layer.final_layer_norm):
                norm.weight.normal_(1.0, 0.3)
                norm.bias.normal_(0.0, 0.3)
    return LayerExperts(layers).eval()


def hard_routes(experts: list[int], num_experts: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(experts), num_experts).float()


def run(layer: LayerExperts, hidden: torch.Tensor, routes: torch.Tensor, grouped: bool) -> torch.Tensor:
    layer.grouped = grouped
    with torch.no_grad():
        return layer(hidden, None, route=LayerRoute(weights=routes))[0]


def set_grouped(model, grouped: bool) -> None:
    for module in model.modules():
        if isinstance(module, LayerExperts):
            module.grouped = grouped


@pytest.mark.parametrize("experts", [[2, 0, 2, 1, 0], [1, 1, 0, 1, 1], [2, 2, 2, 0, 0]], ids=str)
def test_a_grouped_layer_gives_each_row_its_own_experts_output(experts):
    layer, hidden = bank(), torch.randn(len(experts), 7, 32)
    grouped = run(layer, hidden, hard_routes(experts), grouped=True)
    assert layer._grouped is not None  # it ran grouped
    for row, e in enumerate(experts):
        with torch.no_grad():
            alone = layer.experts[e](hidden[row : row + 1], None)
        torch.testing.assert_close(grouped[row : row + 1], alone, rtol=1e-5, atol=1e-5)


def test_a_grouped_layer_counts_the_flops_of_each_expert_on_its_rows():
    layer, hidden, routes = bank(), torch.randn(5, 7, 32), hard_routes([2, 0, 2, 1, 0])
    counts = []
    for grouped in (True, False):
        with FlopCounterMode(display=False) as counter:
            run(layer, hidden, routes, grouped)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_stacked_weights_follow_changes_to_the_experts():
    layer, hidden, routes = bank(), torch.randn(5, 7, 32), hard_routes([2, 0, 2, 1, 0])
    run(layer, hidden, routes, grouped=True)
    with torch.no_grad():  # an in-place change, and a whole new weight (load_state_dict with assign=True)
        layer.experts[2].fc1.weight.mul_(-1.0)
        layer.experts[0].self_attn_layer_norm.bias.add_(1.0)
        state = {k: v.clone() for k, v in layer.experts[1].state_dict().items()}
        state["fc2.weight"] = torch.randn_like(state["fc2.weight"])
        layer.experts[1].load_state_dict(state, assign=True)
    torch.testing.assert_close(
        run(layer, hidden, routes, grouped=True), run(layer, hidden, routes, grouped=False), rtol=1e-5, atol=1e-5
    )


def test_training_and_gradients_run_each_expert_and_drop_the_stacked_copies():
    layer, hidden, routes = bank(), torch.randn(5, 7, 32), hard_routes([2, 0, 2, 1, 0])
    run(layer, hidden, routes, grouped=True)
    layer.train()
    assert layer._grouped is None
    layer.eval()
    out, _ = layer(hidden, None, route=LayerRoute(weights=routes))  # gradients on: one expert at a time
    assert out.requires_grad and layer._grouped is None


def test_a_layer_plan_holds_for_the_same_routes_only():
    routes = hard_routes([2, 0, 1]).unsqueeze(1).expand(3, 4, 3)  # (B, L, E) as a stack hands them out
    plan = LayerPlan(routes[:, 1], schedule(routes[:, 1]))
    assert plan.reads(routes[:, 1])  # a new view of the same layer's routes: the next decoding step
    assert not plan.reads(routes[:, 1].clone())  # equal values elsewhere
    assert not plan.reads(hard_routes([2, 0, 1]))
    changed = hard_routes([2, 0, 1])
    plan = LayerPlan(changed, schedule(changed))
    changed[0] = torch.tensor([1.0, 0.0, 0.0])
    assert not plan.reads(changed)


def test_group_by_expert_sorts_stably_and_counts():
    grouping = group_by_expert(hard_routes([2, 0, 2, 1, 0]).bool())
    assert grouping.order.tolist() == [1, 4, 3, 0, 2]
    assert grouping.expert.tolist() == [0, 0, 1, 2, 2]
    assert grouping.counts == [2, 1, 2]


def test_grouped_modules_refuse_to_run_without_their_grouping():
    groups = ExpertGroups()
    with pytest.raises(RuntimeError, match=r"outside `ExpertGroups\.held`"):
        groups.offsets(torch.zeros(2, 3, 4))
    with groups.held(ExpertGrouping(torch.tensor([0, 1]), torch.tensor([0, 1]), [1, 1])):
        assert groups.offsets(torch.zeros(2, 3, 4)).tolist() == [3, 6]


@pytest.mark.parametrize("num_beams", [1, 4], ids=["greedy", "beam4"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_mixed_task_forward_and_generation_are_those_of_each_expert(num_beams, bf16):
    model = generating_model(routes="given", given_routes=GIVEN)
    input_ids = torch.randint(3, 64, (len(TASKS), 9))
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, num_beams=num_beams, do_sample=False)
    out = {}
    for grouped in (True, False):
        set_grouped(model, grouped)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=input_ids, labels=input_ids, task_ids=TASKS).logits
            out[grouped] = (logits.float(), model.generate(input_ids, task_ids=TASKS, **kwargs))
    assert all(m._grouped is not None for m in model.modules() if isinstance(m, LayerExperts))  # ran grouped before
    tolerance = dict(rtol=2e-2, atol=5e-2) if bf16 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out[True][0], out[False][0], **tolerance)
    if not bf16:  # bf16 rounding may tip a near tie between two tokens
        assert torch.equal(out[True][1], out[False][1])


def test_without_a_grouped_kernel_each_expert_multiplies_its_own_rows():
    layer, hidden, routes = bank(), torch.randn(5, 7, 32), hard_routes([2, 0, 2, 1, 0])
    expected = run(layer, hidden, routes, grouped=True)
    for module in layer._grouped.stacked:
        if hasattr(module, "without_kernel"):  # as where F.grouped_mm refuses the device or dtype
            module.without_kernel.add(("cpu", torch.float32))
    torch.testing.assert_close(run(layer, hidden, routes, grouped=True), expected, rtol=1e-5, atol=1e-5)


def test_inference_mode_runs_grouped_as_lightning_validates():
    layer, hidden, routes = bank(), torch.randn(5, 7, 32), hard_routes([2, 0, 2, 1, 0])
    expected = run(layer, hidden, routes, grouped=False)
    layer.grouped = True
    with torch.inference_mode():  # routes and inputs are inference tensors, which keep no version counter
        out, _ = layer(hidden.clone(), None, route=LayerRoute(weights=routes.clone()))
    assert layer._grouped is not None
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
