"""Routed BART layers: whole-layer expert banks, and BART layers whose feed-forward block is a bank.

Attention is transformers' own `BartAttention`; the FFN-expert layers subclass transformers'
layers and keep their attention code path, replacing only fc1/fc2 by `experts`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.bart.modeling_bart import BartDecoderLayer, BartEncoderLayer

from .cache_contract import LAYER_NAME
from .experts import FeedForward, Schedule, mix_experts, schedule
from .grouped_layer import ExpertGrouping, GroupedLayer, group_by_expert, version
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


@dataclass
class LayerPlan:
    """What a whole-layer bank read from its routes on the device: their schedule, and the batch sorted by expert
    once the grouped layer ran it. Valid for the same routes: the same tensor view, unchanged since."""

    weights: torch.Tensor  # (B, E), kept so that its memory is not another tensor's while the plan is kept
    schedule: Schedule
    grouping: ExpertGrouping | None = None

    def __post_init__(self) -> None:
        self.version = version(self.weights)  # an in-place change since bumps it

    def reads(self, weights: torch.Tensor) -> bool:
        kept = self.weights
        return (
            kept.data_ptr() == weights.data_ptr()
            and kept.shape == weights.shape
            and kept.stride() == weights.stride()
            and kept.device == weights.device
            and version(weights) == self.version
        )


def _rows(tensor, index: torch.Tensor | None):
    """The rows of a batch-first tensor picked by `index`; masks broadcast over the batch pass as they are."""
    if tensor is None or index is None or tensor.shape[0] == 1:
        return tensor
    if tensor.stride(0) == 0:  # one row expanded over the batch (a mask): a view of as many rows, no copy
        return tensor[: index.numel()]
    return tensor.index_select(0, index)


def _cross_attention_cached(cache, slot: int) -> bool:
    """A decoder layer's cross-attention keys and values are in `cache`'s slot: the encoder states are not read."""
    return isinstance(cache, EncoderDecoderCache) and bool(cache.is_updated.get(slot))


def can_subset(*masks) -> bool:
    """Examples can be run in subsets only when every mask is a tensor (or absent), not a BlockMask."""
    return all(m is None or isinstance(m, torch.Tensor) for m in masks)


class LayerExperts(nn.Module):
    """Whole-layer experts (Ye et al.): E copies of a BART encoder or decoder layer, mixed per example.

    At inference a batch that hard routes split over several experts runs as one `GroupedLayer` (`grouped`, on by
    default), not as one layer call per expert on its own rows; both give each row its expert's output."""

    def __init__(self, layers: list[nn.Module], grouped: bool = True):
        super().__init__()
        self.experts = nn.ModuleList(layers)
        self.grouped = grouped
        self.__dict__["_grouped"] = None  # the GroupedLayer over the experts, built when first used

    def forward(self, hidden_states, attention_mask, *batch_args, route: LayerRoute, **kwargs):
        """batch_args: further batch-first inputs of the layer (decoder: encoder states and mask)."""
        weights = route.weights
        cache = kwargs.get(LAYER_NAME)

        def inputs(slot: int, index) -> list:
            """The layer's inputs for the rows `index` (None: all), which cache slot `slot` is told it holds."""
            if isinstance(cache, RoutedCache):
                cache.hold_rows(slot, index)
            args = [hidden_states, attention_mask, *batch_args]
            if batch_args and _cross_attention_cached(cache, slot):  # the encoder states are read no more
                return [_rows(a, index) if i != 2 else a for i, a in enumerate(args)]
            return [_rows(a, index) for a in args]

        def run(e: int, index):
            return self.experts[e](*inputs(self.experts[e].self_attn.layer_idx, index), **kwargs)

        def run_grouped(active: torch.Tensor) -> torch.Tensor:
            if plan.grouping is None:
                plan.grouping = group_by_expert(active)
            order = plan.grouping.order  # the first expert's slot holds every row, sorted by expert
            out = self.grouped_layer()(plan.grouping, *inputs(self.experts[0].self_attn.layer_idx, order), **kwargs)
            return torch.empty_like(out).index_copy_(0, order, out)

        plan = self.plan(weights, cache)
        subset = route.subset and can_subset(attention_mask, *batch_args)
        # inference only: the grouped layer adds biases in place, without autograd, to weights stacked once
        grouped = run_grouped if self.grouped and not (self.training or torch.is_grad_enabled()) else None
        out = mix_experts(run, weights, route.run_all, subset, run_grouped=grouped, plan=plan.schedule)
        return out, RouteRecord(weights, (weights != 0).any(0))

    def plan(self, weights: torch.Tensor, cache) -> LayerPlan:
        """What this layer reads from its routes (B, E): kept in a `RoutedCache` for the decoding steps that
        follow, which route as the first did."""
        plans = cache.layer_plans if isinstance(cache, RoutedCache) else {}
        slot = self.experts[0].self_attn.layer_idx
        plan = plans.get(slot)
        if plan is None or not plan.reads(weights):
            plan = plans[slot] = LayerPlan(weights, schedule(weights))
        return plan

    def train(self, mode: bool = True) -> LayerExperts:
        if mode:  # training changes the weights: the grouped layer's stacked copies would only take memory
            self.__dict__["_grouped"] = None
        return super().train(mode)

    def grouped_layer(self) -> GroupedLayer:
        experts = list(self.experts)
        if self._grouped is None or self._grouped.experts != experts:  # built, or an expert was replaced since
            self.__dict__["_grouped"] = GroupedLayer(experts)
        return self._grouped


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
