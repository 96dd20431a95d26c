"""Experts: BART's feed-forward block as an expert unit, and how the outputs of E experts are mixed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN

# run(e, index): expert e's output on the examples (or tokens) in `index`; None means all of them.
RunExpert = Callable[[int, torch.Tensor | None], torch.Tensor]
# run_grouped(active): every used expert at once on a partition's rows, active (N, E) marking each row's expert
RunGrouped = Callable[[torch.Tensor], torch.Tensor]


class FeedForward(nn.Module):
    """BART's feed-forward block, fc1 → activation → fc2 with its dropouts (names match BART's layers)."""

    def __init__(self, d_model: int, ffn_dim: int, activation: str, activation_dropout: float, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.activation_fn = ACT2FN[activation]
        self.activation_dropout = activation_dropout
        self.dropout = dropout

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        hidden_states = nn.functional.dropout(hidden_states, p=self.activation_dropout, training=self.training)
        hidden_states = self.fc2(hidden_states)
        return nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)


@dataclass(frozen=True)
class Schedule:
    """Which experts a (N, E) weight matrix uses, read from the device once: what decides how they run."""

    used: list[bool]  # (E,) some row gives the expert weight
    full: list[bool]  # (E,) every row gives the expert weight
    partition: bool  # one expert per row at weight 1, with no gradient through the weights (hard routes)


def schedule(weights: torch.Tensor) -> Schedule:
    num_experts = weights.shape[-1]
    active = weights != 0
    partition = ((weights == 1) | ~active).all() & (active.sum(-1) == 1).all() & (not weights.requires_grad)
    flags = torch.cat([active.any(0), active.all(0), partition.view(1)]).tolist()  # the one device sync
    return Schedule(flags[:num_experts], flags[num_experts : 2 * num_experts], flags[-1])


def mix_experts(
    run: RunExpert,
    weights: torch.Tensor,
    run_all: bool = False,
    subset: bool = True,
    run_grouped: RunGrouped | None = None,
    plan: Schedule | None = None,
) -> torch.Tensor:
    """Σ_e weights[:, e] · expert_e(x) over the leading (example or token) dimension of x.

    weights: (N, E). An expert runs only on the rows that give it non-zero weight, so hard routes
    cost one expert per row, as a dense layer does. `run_all=True` runs every expert on every
    row, at E times the dense cost: task routes that carry a gradient need it (softmax mixtures
    and the straight-through estimator use d out / d w_e = expert_e(x) for every e).
    `subset=False` runs a used expert on all rows (a key/value cache slot that must hold the whole batch).
    `run_grouped`, where given, runs a partition over several experts in one call instead of one `run` per expert.
    `plan`: the weights' `schedule`, where the caller already has it.
    """
    plan = plan or schedule(weights)
    active = weights != 0
    if plan.partition and subset and not run_all:
        if run_grouped is not None and sum(plan.used) > 1:
            return run_grouped(active)
        return _partition(run, active, plan.used, plan.full)
    out = None
    for e in range(weights.shape[-1]):
        if not (run_all or plan.used[e]):
            continue
        index = None if run_all or plan.full[e] or not subset else active[:, e].nonzero().squeeze(1)
        y = run(e, index)
        w = weights[:, e] if index is None else weights[index, e]
        contribution = w.to(y.dtype).view(-1, *([1] * (y.dim() - 1))) * y
        if index is None:
            out = contribution if out is None else out + contribution
        else:
            if out is None:
                out = y.new_zeros((weights.shape[0], *y.shape[1:]))
            out = out.index_add(0, index, contribution)
    return out  # None only when no expert got any weight (every token over capacity)


def _partition(run: RunExpert, active: torch.Tensor, used: list[bool], full: list[bool]) -> torch.Tensor:
    """Hard routes: each row's output is its one expert's output, put in place (no weighting, no zero fill)."""
    out = None
    for e, is_used in enumerate(used):
        if not is_used:
            continue
        if full[e]:
            return run(e, None)  # every row takes this expert: the dense layer
        index = active[:, e].nonzero().squeeze(1)
        y = run(e, index)
        if out is None:
            out = y.new_empty((active.shape[0], *y.shape[1:]))
        out.index_copy_(0, index, y)
    return out
