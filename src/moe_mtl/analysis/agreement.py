"""Route–skill agreement: do tasks that share skills share experts more often than tasks that do not?

The route agreement of two tasks is 1 − the mean over routed layers of the total-variation distance between
their routes (½·Σ|p − q|): 1 for the same route, 0 for routes on disjoint experts; for one-hot (argmax) routes
it is the fraction of layers where both tasks pick the same expert. Task pairs split into those sharing at least
one skill and those sharing none; the statistic is the difference of their mean agreements.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from ..extras import require


def route_agreement(routes: torch.Tensor) -> np.ndarray:
    """Route agreement of every task pair: routes (T, L, E) → (T, T), symmetric, 1 on the diagonal."""
    if routes.dim() != 3 or routes.shape[0] < 2:
        raise UsageError(f"routes: expected (tasks >= 2, layers, experts), got shape {tuple(routes.shape)}")
    p = routes.detach().double().cpu()
    distance = 0.5 * (p[:, None] - p[None, :]).abs().sum(-1).mean(-1)  # (T, T) mean total variation over layers
    return (1.0 - distance).numpy()


def _group_means(agreement: np.ndarray, shares: np.ndarray, pairs: tuple[np.ndarray, np.ndarray]) -> tuple:
    values = agreement[pairs]
    sharing = shares[pairs]
    return values[sharing].mean(), values[~sharing].mean()


def route_skill_agreement(
    routes: torch.Tensor, task_skills: Sequence[Collection[str]], permutations: int = 10_000, seed: int = 0
) -> dict[str, Any]:
    """Mean route agreement of task pairs that share a skill vs pairs that share none, and its significance.

    routes (T, L, E); task_skills: the skills of each of the T tasks. Returns a JSON-ready dict: sharing and
    not_sharing (mean agreements), difference (sharing − not_sharing), pairs_sharing, pairs_not_sharing,
    p_permutation (one-sided: the chance of a difference at least this large when the tasks' skill sets are
    shuffled among them, `permutations` times, seeded) and the Mann–Whitney U test of the two groups of pairs
    (one-sided, `mannwhitney_u`, `p_mannwhitney`). The permutation p is the one to trust: pairs that share a task
    are not independent, which the Mann–Whitney test assumes.
    """
    if len(task_skills) != routes.shape[0]:
        raise UsageError(f"task_skills: got {len(task_skills)} skill sets for a route table of {routes.shape[0]} tasks")
    if permutations < 1:
        raise UsageError(f"permutations: expected a positive count, got {permutations}")
    agreement = route_agreement(routes)
    skills = [set(s) for s in task_skills]
    num_tasks = len(skills)
    shares = np.array([[bool(a & b) for b in skills] for a in skills])  # (T, T)
    pairs = np.triu_indices(num_tasks, k=1)
    sharing = shares[pairs]
    if sharing.all() or not sharing.any():
        raise UsageError(
            f"route–skill agreement needs task pairs that share a skill and pairs that share none; of "
            f"{len(sharing)} pairs, {int(sharing.sum())} share one"
        )
    mean_sharing, mean_not = _group_means(agreement, shares, pairs)
    difference = mean_sharing - mean_not
    rng = np.random.default_rng(seed)
    at_least = 0
    for _ in range(permutations):
        order = rng.permutation(num_tasks)
        shuffled_sharing, shuffled_not = _group_means(agreement, shares[np.ix_(order, order)], pairs)
        at_least += shuffled_sharing - shuffled_not >= difference - 1e-12
    test = require("scipy.stats").mannwhitneyu(
        agreement[pairs][sharing], agreement[pairs][~sharing], alternative="greater"
    )
    return {
        "sharing": float(mean_sharing),
        "not_sharing": float(mean_not),
        "difference": float(difference),
        "pairs_sharing": int(sharing.sum()),
        "pairs_not_sharing": int((~sharing).sum()),
        "p_permutation": float((1 + at_least) / (1 + permutations)),
        "permutations": permutations,
        "mannwhitney_u": float(test.statistic),
        "p_mannwhitney": float(test.pvalue),
    }
