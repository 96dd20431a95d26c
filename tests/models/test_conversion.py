"""Per-task export of a MoE-BART to a plain transformers BART: parity, refusals, cost, saving."""

import json
import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BartForConditionalGeneration

from moe_mtl.models.conversion import (
    dense_model,
    dense_state_dict,
    export_task,
    hard_experts,
    task_experts,
)

from .conftest import tiny_bart_config, tiny_moe

NUM_TASKS = 4
GIVEN = [[2, 2, 2, 2], [1, 0, 2, 1], [0, 0, 0, 0], [2, 1, 0, 1]]  # (num_tasks, routed layers): every expert used
HARD_ROUTES = {
    "random": dict(routes="random", route_seed=3),
    "given": dict(routes="given", given_routes=GIVEN),
    "given-one-hot-weights": dict(routes="given", given_routes=torch.eye(3)[torch.tensor(GIVEN)].tolist()),
    "learned-argmax": dict(),  # stage one, evaluated by the hard top-1
    "stage-two-argmax": dict(selection="argmax", freeze_router=True),
    "some-layers": dict(moe_layers={"encoder": [1], "decoder": [0]}),
}


def moe(**options):
    """A tiny MoE-BART in eval mode whose experts differ clearly (a large init), 3 experts, 4 tasks."""
    return tiny_moe(tiny_bart_config(init_std=0.5), num_experts=3, num_tasks=NUM_TASKS, **options).eval()


def one_task_logits(model, batch, task_id=None):
    task_ids = None if task_id is None else torch.full((batch["input_ids"].shape[0],), task_id)
    with torch.no_grad():
        return model(**batch, **({} if task_ids is None else {"task_ids": task_ids})).logits


@pytest.mark.parametrize("unit", ["layer", "ffn"])
@pytest.mark.parametrize("routes", HARD_ROUTES.values(), ids=HARD_ROUTES.keys())
def test_each_task_exports_to_a_dense_bart_with_the_same_logits(batch, unit, routes):
    model = moe(expert_unit=unit, **routes)
    for task_id in range(NUM_TASKS):
        dense = export_task(model, task_id)
        assert type(dense) is BartForConditionalGeneration and not dense.training
        torch.testing.assert_close(
            one_task_logits(dense, batch), one_task_logits(model, batch, task_id), atol=1e-5, rtol=0
        )


def test_the_export_takes_the_routed_expert_not_another(batch):
    model = moe(routes="given", given_routes=GIVEN)
    assert task_experts(model, 1) == {"encoder.0": 1, "encoder.1": 0, "decoder.0": 2, "decoder.1": 1}
    wrong = dense_model(model, {"encoder.0": 1, "encoder.1": 0, "decoder.0": 2, "decoder.1": 0})
    assert (one_task_logits(wrong, batch) - one_task_logits(model, batch, 1)).abs().max() > 1e-2


def test_the_export_routes_as_evaluation_does_even_from_a_model_in_training_mode(batch):
    model = moe()
    experts = task_experts(model.train(), 2)  # training would sample gumbel_st routes; export uses eval's argmax
    assert model.training
    assert experts == task_experts(model.eval(), 2)


def test_the_dense_state_dict_keeps_the_chosen_experts_under_dense_names():
    model = moe(expert_unit="ffn", moe_layers={"encoder": [0], "decoder": [1]})
    state = model.state_dict()
    dense = dense_state_dict(state, {"encoder.0": 2, "decoder.1": 0})
    assert dense.keys() == BartForConditionalGeneration(tiny_bart_config()).state_dict().keys()
    assert dense["model.encoder.layers.0.fc1.weight"] is state["model.encoder.layers.0.experts.2.fc1.weight"]
    assert dense["model.decoder.layers.1.fc2.bias"] is state["model.decoder.layers.1.experts.0.fc2.bias"]
    assert dense["model.encoder.layers.1.fc1.weight"] is state["model.encoder.layers.1.fc1.weight"]  # not routed
    with pytest.raises(
        ValueError, match=re.escape("MoE weight model.decoder.layers.1.experts.0.fc1.weight is in routed layer")
    ):
        dense_state_dict(state, {"encoder.0": 2})


def test_the_dense_config_is_bart_without_moe_options():
    model = moe(expert_unit="ffn")
    config = model.config.to_bart_config()
    assert config.model_type == "bart" and "moe" not in config.to_dict()
    for key in ("vocab_size", "d_model", "encoder_layers", "decoder_ffn_dim", "init_std", "forced_eos_token_id"):
        assert getattr(config, key) == getattr(model.config, key), key


@pytest.mark.parametrize(
    ("options", "cause"),
    [
        (dict(routes="average"), "routes 'average' give every expert weight 1/E"),
        (dict(selection="softmax", freeze_router=True), "a frozen router with selection 'softmax'"),
        (dict(top_k=2), "top_k 2 mixes the top experts"),
        (dict(routes="given", given_routes=[[[0.5, 0.5, 0.0]] * 4] * NUM_TASKS), "`given_routes` gives this task"),
        (dict(routes="given", given_routes=[[[0.0, 2.0, 0.0]] * 4] * NUM_TASKS), "expert 1 at 2"),
    ],
    ids=["average", "stage-two-softmax", "top-2", "given-weights", "scaled-expert"],
)
def test_soft_routes_are_refused_naming_task_layer_and_what_is_accepted(options, cause):
    with pytest.raises(ValueError) as refused:
        export_task(moe(**options), 3, "sort_numbers")
    message = str(refused.value)
    assert message.startswith("task 'sort_numbers': routed layer encoder.0 weights expert ")
    assert cause in message
    assert "weight 1 on one expert in every routed layer" in message and "\n" not in message


def test_a_route_override_that_mixes_experts_is_refused_for_that_task_only():
    model = moe(routes="random")
    model.router.set_route_overrides([2], torch.full((1, 4, 3), 1 / 3))
    export_task(model, 1)
    with pytest.raises(ValueError, match=r"task 'task id 2': .* route override"):
        export_task(model, 2)


def test_token_routing_is_refused():
    with pytest.raises(ValueError) as refused:
        export_task(moe(routing="token", expert_unit="ffn"), 0, "count")
    message = str(refused.value)
    assert "task 'count': routing 'token' picks experts per token" in message
    assert "encoder.0, encoder.1, decoder.0, decoder.1" in message and "weight 1 on one expert" in message


def test_hard_experts_reads_one_expert_per_layer():
    routes = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert hard_experts(routes, ["encoder.0", "decoder.0"], "t", "why") == {"encoder.0": 1, "decoder.0": 0}
    with pytest.raises(ValueError, match=re.escape("layer decoder.0 weights expert 0 at 0.9, expert 1 at 0.1 (why)")):
        hard_experts(torch.tensor([[0.0, 1.0], [0.9, 0.1]]), ["encoder.0", "decoder.0"], "t", "why")


def flops(model, **inputs) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize("unit", ["layer", "ffn"])
def test_the_export_costs_what_a_dense_bart_of_its_config_costs(unit):
    model = moe(expert_unit=unit)
    exported = export_task(model, 1)
    reference = BartForConditionalGeneration(model.config.to_bart_config()).eval()
    ids = torch.randint(3, 64, (4, 16))
    assert flops(exported, input_ids=ids, decoder_input_ids=ids) == flops(
        reference, input_ids=ids, decoder_input_ids=ids
    )
    # the MoE pays the router on top (once for the one task)
    assert flops(exported, input_ids=ids, decoder_input_ids=ids) < flops(
        model, input_ids=ids, decoder_input_ids=ids, task_ids=torch.full((4,), 1)
    )


@pytest.mark.parametrize("num_beams", [1, 2])
def test_the_export_generates_what_the_moe_generates_for_its_task(num_beams):
    config = tiny_bart_config(init_std=0.5, forced_eos_token_id=None)
    model = tiny_moe(config, num_experts=3, num_tasks=NUM_TASKS, routes="given", given_routes=GIVEN).eval()
    with torch.no_grad():
        model.final_logits_bias[0, config.eos_token_id] = -1e4  # every step decodes
    ids = torch.randint(3, 64, (3, 7))
    settings = dict(num_beams=num_beams, max_new_tokens=6, do_sample=False)
    for task_id in (1, 3):
        expected = model.generate(ids, task_ids=torch.full((3,), task_id), **settings)
        assert torch.equal(export_task(model, task_id).generate(ids, **settings), expected)


def test_the_saved_export_loads_as_plain_bart(tmp_path, batch):
    model = moe(expert_unit="ffn", routes="given", given_routes=GIVEN)
    export_task(model, 3).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "bart" and saved["architectures"] == ["BartForConditionalGeneration"]
    assert "moe" not in saved
    loaded = BartForConditionalGeneration.from_pretrained(tmp_path)
    torch.testing.assert_close(one_task_logits(loaded, batch), one_task_logits(model, batch, 3), atol=1e-5, rtol=0)
