"""compile_layers: MoE-BART's layers compiled one by one give eager's losses and gradients, and new batch shapes
do not recompile."""

import pytest
import torch
from torch._dynamo.utils import counters

from moe_mtl.models.compilation import compile_layers, compile_units
from moe_mtl.models.layers import LayerExperts
from moe_mtl.training.losses import label_smoothed_nll

from .conftest import tiny_bart_config, tiny_moe

pytestmark = pytest.mark.slow  # each test compiles (about 10-30 s on 2 CPU cores)


def pair(**options):
    """Two equal tiny MoE-BARTs in training mode, without dropout, the second compiled."""
    torch.manual_seed(0)
    config = tiny_bart_config(dropout=0.0)
    eager = tiny_moe(config, num_experts=2, num_tasks=4, **options)
    compiled = tiny_moe(config, num_experts=2, num_tasks=4, **options)
    compiled.load_state_dict(eager.state_dict())
    assert compile_layers(compiled) == len(list(compile_units(compiled)))
    return eager.train(), compiled.train()


def step(model, batch, bf16: bool = False):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same Gumbel noise of learned routes for both models
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            task_ids=batch["task_ids"],
        )
        loss = label_smoothed_nll(out.logits.float(), batch["labels"], 0.1)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def batch(size: int, length: int, task: int) -> dict:
    generator = torch.Generator().manual_seed(size * 100 + length)
    input_ids = torch.randint(3, 64, (size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, length // 2 :] = 0  # one padded row
    labels = torch.randint(3, 64, (size, 5), generator=generator)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, task_ids=torch.full((size,), task))


@pytest.mark.parametrize("options", [dict(), dict(routes="given", given_routes=[[1, 0, 1, 1]] * 4)], ids=str)
def test_compiled_layers_give_eager_losses_and_gradients(options):
    eager, compiled = pair(**options)
    for shape in ((4, 9, 0), (3, 12, 1)):
        loss, grads = step(eager, batch(*shape))
        compiled_loss, compiled_grads = step(compiled, batch(*shape))
        torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-5)
        assert compiled_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    # the parameter names of a checkpoint stay the eager model's
    assert compiled.state_dict().keys() == eager.state_dict().keys()


def test_new_batch_shapes_do_not_recompile_and_bf16_autocast_matches_eager():
    eager, compiled = pair()
    step(compiled, batch(4, 9, 0))
    step(compiled, batch(3, 12, 1))  # dynamic sizes from the first compile on
    graphs = counters["stats"]["unique_graphs"]
    for shape in ((2, 7, 2), (4, 15, 3), (3, 8, 0)):
        step(compiled, batch(*shape))
    assert counters["stats"]["unique_graphs"] == graphs
    # one row: torch specialises sizes 0 and 1, one more graph for the encoder's layers and one for the decoder's
    # (a task's last batch, an expert's one example), and only once
    for shape in ((1, 11, 0), (1, 6, 2)):
        step(compiled, batch(*shape))
    assert counters["stats"]["unique_graphs"] <= graphs + 2
    loss, grads = step(eager, batch(4, 9, 0), bf16=True)
    compiled_loss, compiled_grads = step(compiled, batch(4, 9, 0), bf16=True)
    torch.testing.assert_close(compiled_loss, loss, rtol=2e-2, atol=2e-2)
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=5e-2, atol=5e-2, msg=name)


def test_a_compiled_bank_still_runs_a_mixed_batch_grouped_at_inference():
    eager, compiled = pair(routes="given", given_routes=[[1, 0, 1, 1], [0, 1, 0, 0], [1, 1, 0, 1], [0, 0, 1, 0]])
    inputs = batch(4, 9, 0)
    inputs["task_ids"] = torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        expected = eager.eval()(**inputs).logits
        out = compiled.eval()(**inputs).logits
    assert all(m._grouped is not None for m in compiled.modules() if isinstance(m, LayerExperts))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
