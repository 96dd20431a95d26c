"""Sequence-to-sequence losses as pure functions of logits and labels (label padding is -100)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import UsageError

IGNORE_INDEX = -100


def label_smoothed_nll(logits: torch.Tensor, labels: torch.Tensor, epsilon: float = 0.1) -> torch.Tensor:
    """Mean over target tokens of the label-smoothed NLL: (1 − ε) · NLL + ε · mean over the vocabulary of
    −log p (the target distribution puts ε/V on every token), computed in fp32.

    logits (B, T, V), labels (B, T) → scalar.
    """
    if not 0.0 <= epsilon < 1.0:
        raise UsageError(f"label smoothing ε is {epsilon}; it must be in [0, 1)")
    return F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, label_smoothing=epsilon
    )


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the summed NLL of its target tokens and their count, both (B,), in fp32."""
    token_nll = F.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B, T), 0 at padding
    return token_nll.sum(1), (labels != IGNORE_INDEX).sum(1)


def route_balance(probs: torch.Tensor) -> torch.Tensor:
    """Task-level balance: KL(mean route over tasks ‖ uniform), averaged over routed layers; 0 when the tasks
    together use every expert equally, ln E when they all take one expert. probs (T, L, E) → scalar.

    Unlike the token-level load-balancing loss, it does not ask a task to spread itself: each task may (and in
    stage one should) settle on one expert, as long as different tasks settle on different ones."""
    mean = probs.float().mean(0)  # (L, E)
    return (mean * (mean.clamp_min(1e-9).log() + math.log(probs.shape[-1]))).sum(-1).mean()


def task_route_balance(model, tasks: Sequence[int]) -> torch.Tensor | None:
    """`route_balance` of the routes of `tasks` (all of the table's if empty) from softmax(router logits), while
    the model's routes are learned (None otherwise: fixed routes or a frozen router)."""
    router = model.router
    if router is None or not router.learned or router.frozen:
        return None
    rows = model.task_table(torch.tensor(list(tasks) or range(model.task_table.num_tasks), device=model.device))
    return route_balance(router.logits(rows).softmax(-1))


def leave_one_out_advantage(losses: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Per example: its loss minus the mean loss of the other examples of its group (its task), the baseline of
    REINFORCE leave-one-out (Kool et al. 2019); 0 for an example alone in its group. losses, groups (B,) → (B,)."""
    _, index = torch.unique(groups, return_inverse=True)
    losses = losses.float()
    sums = losses.new_zeros(int(index.max()) + 1 if index.numel() else 0).index_add(0, index, losses)
    counts = torch.bincount(index, minlength=sums.shape[0]).to(losses.dtype)
    others = (counts[index] - 1).clamp_min(1)
    return torch.where(counts[index] > 1, losses - (sums[index] - losses) / others, torch.zeros_like(losses))


def reinforce_surrogate(
    log_prob: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor
) -> torch.Tensor:
    """The score-function term whose gradient is the REINFORCE estimate of ∇ E[loss] over sampled routes: mean over
    examples of sg(advantage) · log π(route), each example scored by its mean token NLL against the others of its
    group (`leave_one_out_advantage`). Its value is near 0; only its gradient matters.
    log_prob (B,), logits (B, T, V), labels (B, T), groups (B,) task ids → scalar."""
    nll, count = sequence_nll(logits.detach(), labels)
    return (leave_one_out_advantage(nll / count.clamp_min(1), groups) * log_prob).mean()
