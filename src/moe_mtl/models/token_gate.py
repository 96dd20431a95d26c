"""Task-aware token-level gating (Gupta et al. 2022) and the Switch/GShard load-balancing loss.

Shapes: N routed tokens, d model width, t task-vector width, E experts, k experts per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def load_balancing_loss(probs: torch.Tensor, top1: torch.Tensor) -> torch.Tensor:
    """Switch Transformer auxiliary loss E · Σ_e f_e · P_e (1.0 when perfectly balanced).

    probs: (N, E) router probabilities; top1: (N,) expert each token was dispatched to first.
    f_e is the fraction of tokens dispatched to e, P_e the mean probability given to e.
    """
    num_experts = probs.shape[-1]
    fraction = F.one_hot(top1, num_experts).float().mean(0)
    return num_experts * (fraction * probs.float().mean(0)).sum()


def capacity_mask(choices: torch.Tensor, capacity: int) -> torch.Tensor:
    """Which assignments fit, (N, E) bool: an expert keeps its first `capacity` assignments.

    choices: (k, N, E) bool, the j-th choice of every token in choices[j]. First choices take
    priority over second ones (GShard), and tokens in order within a choice.
    """
    k, n, e = choices.shape
    flat = choices.reshape(k * n, e)
    kept = flat & (flat.long().cumsum(0) <= capacity)
    return kept.view(k, n, e).any(0)


@dataclass
class TokenRoutes:
    """Gate decisions for N tokens."""

    weights: torch.Tensor  # (N, E) combine weights; 0 for experts not selected or over capacity
    probs: torch.Tensor  # (N, E) gate probabilities, fp32
    aux_loss: torch.Tensor | None  # () load-balancing loss; None when there are no tokens
    overflow: torch.Tensor  # () selected (token, expert) pairs dropped for capacity


class TaskAwareTokenGate(nn.Module):
    """Gate that sees a token's hidden state and its task's vector and picks top-k experts.

    Combine weights are renormalised over the selected experts; top-1 is straight-through
    (weight 1 forward, softmax gradient backward), so identical experts reproduce a dense FFN.
    """

    def __init__(self, d_model: int, task_dim: int, num_experts: int, top_k: int, capacity_factor: float | None):
        super().__init__()
        self.proj = nn.Linear(d_model + task_dim, num_experts)
        self.top_k = top_k
        self.capacity_factor = capacity_factor

    def forward(self, tokens: torch.Tensor, task_representations: torch.Tensor) -> TokenRoutes:
        """tokens: (N, d); task_representations: (N, t), the task of each token's example."""
        num_experts = self.proj.out_features
        # outside autocast, in the gate's own dtype (fp32 unless the whole model was cast)
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            gate_input = torch.cat([tokens, task_representations.to(tokens.dtype)], -1).to(self.proj.weight.dtype)
            logits = self.proj(gate_input).float()
        probs = logits.softmax(-1)
        top = probs.topk(self.top_k, dim=-1)
        if self.top_k == 1:
            selected = top.values - top.values.detach() + 1.0
        else:
            selected = top.values / top.values.sum(-1, keepdim=True)
        weights = torch.zeros_like(probs).scatter(-1, top.indices, selected)
        overflow = torch.zeros((), dtype=torch.long, device=tokens.device)
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * tokens.shape[0] * self.top_k / num_experts)
            choices = F.one_hot(top.indices.T, num_experts).bool()  # (k, N, E)
            kept = capacity_mask(choices, capacity)
            overflow = (choices.any(0) & ~kept).sum()
            weights = weights * kept
        aux_loss = load_balancing_loss(probs, top.indices[:, 0]) if tokens.shape[0] else None
        return TokenRoutes(weights, probs, aux_loss, overflow)
