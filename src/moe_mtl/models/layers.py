"""Routed BART layers: whole-layer expert banks, and BART layers whose feed-forward block is a bank.

Attention is transformers' own `BartAttention`; the FFN-expert layers subclass transformers'
layers and keep their attention code path, replacing only fc1/fc2 by `experts`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.bart.modeling_bart import BartDecoderLayer, BartEncoderLayer

from .cache_contract import LAYER_NAME
from .experts import FeedForward, mix_experts
from .routed_cache import RoutedCache
from .token_gate import TaskAwareTokenGate


@dataclass
class RouteRecord:
    """What one routed layer did in a forward pass."""

    weights: torch.Tensor  # (B, E) task routes, or (B, T, E) token combine weights
    used: torch.Tensor  # (E,) bool: the expert got non-zero weight from some example or token
    aux_loss: torch.Tensor | None = None  # token routing: load-balancing loss of this layer
    overflow: torch.Tensor | None = None  # token routing: (token, expert) pairs dropped for capacity


@dataclass
class LayerRoute:
    """What a routed layer needs: task routes (B, E), or task representations (B, t) for its token gate."""

    weights: torch.Tensor | None = None
    task_representations: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None  # (B, T); 0 marks padding, which is not routed
    run_all: bool = False  # run every expert on every example (task routes with a gradient)
    subset: bool = True  # run an expert only on its own examples (off while a cache without row slots is filled)


def _rows(tensor, index: torch.Tensor | None):
    """The rows of a batch-first tensor picked by `index`; masks broadcast over the batch pass as they are."""
    if tensor is None or index is None or tensor.shape[0] == 1:
        return tensor
    if tensor.stride(0) == 0:  # one row expanded over the batch (a mask): a view of as many rows, no copy
        return tensor[: index.numel()]
    return tensor.index_select(0, index)


def can_subset(*masks) -> bool:
    """Examples can be run in subsets only when every mask is a tensor (or absent), not a BlockMask."""
    return all(m is None or isinstance(m, torch.Tensor) for m in masks)


class LayerExperts(nn.Module):
    """Whole-layer experts (Ye et al.): E copies of a BART encoder or decoder layer, mixed per example."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.experts = nn.ModuleList(layers)

    def forward(self, hidden_states, attention_mask, *batch_args, route: LayerRoute, **kwargs):
        """batch_args: further batch-first inputs of the layer (decoder: encoder states and mask)."""
        weights = route.weights
        cache = kwargs.get(LAYER_NAME)

        def run(e: int, index):
            if isinstance(cache, RoutedCache):  # expert e's cache slot holds its own rows only
                cache.hold_rows(self.experts[e].self_attn.layer_idx, index)
            args = [_rows(a, index) for a in (hidden_states, attention_mask, *batch_args)]
            return self.experts[e](*args, **kwargs)

        subset = route.subset and can_subset(attention_mask, *batch_args)
        out = mix_experts(run, weights, run_all=route.run_all, subset=subset)
        return out, RouteRecord(weights, (weights != 0).any(0))


def routed_ffn(
    experts: nn.ModuleList, gate: TaskAwareTokenGate | None, hidden_states: torch.Tensor, route: LayerRoute
) -> tuple[torch.Tensor, RouteRecord]:
    """The feed-forward sublayer as a bank: per-example task routes, or per-token gating."""
    if gate is None:
        weights = route.weights

        def run(e: int, index):
            return experts[e](_rows(hidden_states, index))

        # an FFN keeps no cache, so it always runs on its own examples only
        out = mix_experts(run, weights, run_all=route.run_all)
        return out, RouteRecord(weights, (weights != 0).any(0))

    batch, length, width = hidden_states.shape
    flat = hidden_states.reshape(-1, width)
    task_representations = route.task_representations[:, None, :].expand(batch, length, -1).reshape(batch * length, -1)
    rows = None if route.token_mask is None else route.token_mask.reshape(-1).nonzero().squeeze(1)
    tokens = _rows(flat, rows)
    decision = gate(tokens, _rows(task_representations, rows))

    def run_tokens(e: int, index):
        return experts[e](_rows(tokens, index))

    mixed = mix_experts(run_tokens, decision.weights)
    if mixed is None:
        mixed = torch.zeros_like(tokens)
    weights = decision.weights
    if rows is not None:
        mixed = torch.zeros_like(flat).index_copy(0, rows, mixed.to(flat.dtype))
        weights = weights.new_zeros(batch * length, weights.shape[-1]).index_copy(0, rows, weights)
    record = RouteRecord(
        weights.view(batch, length, -1), (decision.weights != 0).any(0), decision.aux_loss, decision.overflow
    )
    return mixed.view(batch, length, width), record


def replace_ffn_by_experts(layer: nn.Module, ffn_dim: int, num_experts: int, gate) -> None:
    """Swap a BART layer's fc1/fc2 for a bank of E `FeedForward` experts (and its token gate, if any)."""
    config = layer.self_attn.config
    del layer.fc1, layer.fc2
    layer.experts = nn.ModuleList(
        FeedForward(config.d_model, ffn_dim, config.activation_function, config.activation_dropout, config.dropout)
        for _ in range(num_experts)
    )
    layer.gate = gate


class FFNExpertEncoderLayer(BartEncoderLayer):
    """A BART encoder layer whose fc1/fc2 block is a bank of `FeedForward` experts."""

    def __init__(self, config, layer_idx: int, num_experts: int, gate: TaskAwareTokenGate | None = None):
        super().__init__(config, layer_idx)
        replace_ffn_by_experts(self, config.encoder_ffn_dim, num_experts, gate)

    def forward(self, hidden_states, attention_mask, route: LayerRoute):
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states, attention_mask=attention_mask)
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = self.self_attn_layer_norm(residual + hidden_states)

        ffn_out, record = routed_ffn(self.experts, self.gate, hidden_states, route)
        hidden_states = self.final_layer_norm(hidden_states + ffn_out)
        if hidden_states.dtype == torch.float16 and not torch.isfinite(hidden_states).all():
            clamp_value = torch.finfo(hidden_states.dtype).max - 1000
            hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
        return hidden_states, record


class FFNExpertDecoderLayer(BartDecoderLayer):
    """A BART decoder layer whose fc1/fc2 block is a bank of `FeedForward` experts."""

    def __init__(self, config, layer_idx: int, num_experts: int, gate: TaskAwareTokenGate | None = None):
        super().__init__(config, layer_idx)
        replace_ffn_by_experts(self, config.decoder_ffn_dim, num_experts, gate)

    def forward(
        self,
        hidden_states,
        attention_mask,
        encoder_hidden_states,
        encoder_attention_mask,
        route: LayerRoute,
        use_cache: bool = False,
        **cache,
    ):
        """`cache`: the key/value cache under the keyword of the installed release's `BartAttention`
        (`cache_contract.layer_cache`), handed on to both attentions as BART's own layer does."""
        residual = hidden_states
        hidden_states, _ = self.self_attn(hidden_states, attention_mask=attention_mask, **cache)
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = self.self_attn_layer_norm(residual + hidden_states)

        residual = hidden_states
        hidden_states, _ = self.encoder_attn(
            hidden_states,
            key_value_states=encoder_hidden_states,
            attention_mask=encoder_attention_mask,
            **cache,
        )
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = self.encoder_attn_layer_norm(residual + hidden_states)

        ffn_out, record = routed_ffn(self.experts, self.gate, hidden_states, route)
        return self.final_layer_norm(hidden_states + ffn_out), record
