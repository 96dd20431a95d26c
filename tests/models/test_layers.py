"""Routed layers: records of what was used, and padding left out of token routing."""

import torch

from moe_mtl.models.layers import FFNExpertEncoderLayer, LayerRoute
from moe_mtl.models.token_gate import TaskAwareTokenGate

from .conftest import tiny_bart_config


def test_token_routing_skips_padding_and_reports_per_token_weights():
    config = tiny_bart_config(dropout=0.0)
    gate = TaskAwareTokenGate(config.d_model, 4, 3, top_k=1, capacity_factor=None)
    layer = FFNExpertEncoderLayer(config, 0, num_experts=3, gate=gate).eval()
    hidden = torch.randn(2, 5, config.d_model)
    token_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    _, record = layer(hidden, None, route=LayerRoute(task_representations=torch.randn(2, 4), token_mask=token_mask))
    assert record.weights.shape == (2, 5, 3)
    assert torch.equal((record.weights != 0).sum(-1), token_mask)  # one expert per real token, none for padding
    assert record.used.dtype == torch.bool and record.used.shape == (3,)
    assert record.aux_loss is not None and record.overflow.item() == 0


def test_task_routed_ffn_layer_records_the_experts_used():
    config = tiny_bart_config(dropout=0.0)
    layer = FFNExpertEncoderLayer(config, 0, num_experts=3).eval()
    weights = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    out, record = layer(torch.randn(2, 5, config.d_model), None, route=LayerRoute(weights=weights))
    assert out.shape == (2, 5, config.d_model)
    assert record.used.tolist() == [False, True, False]
