"""Feature correlation: Pearson r, with p-values, between each task feature and each expert's usage.

Features are the numeric columns of `data.tasks.feature_table` (an indicator column per value of a categorical or
boolean feature and per element of a list feature; numbers as they are); usage is each task's route weight on each
(routed layer, expert). Every (feature, usage) pair is tested, and the p-values are corrected for the number of
tests: Benjamini–Hochberg (the false discovery rate; what decides `significant`) and Bonferroni (the family-wise
error, reported beside it). BH decides because the tests are many and strongly dependent (skills imply families; a
layer's expert usages sum to 1), where Bonferroni is so strict that a real skill–expert link rarely survives on a
few dozen tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import UsageError
from ..extras import require


def expert_usage(routes: torch.Tensor, layer_names: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Route table (T, L, E) → (column names "<layer>/expert<e>", usage (T, L·E)), layer-major."""
    if routes.dim() != 3 or routes.shape[1] != len(layer_names):
        raise UsageError(
            f"routes: expected (tasks, layers, experts) with {len(layer_names)} layers {list(layer_names)}, "
            f"got shape {tuple(routes.shape)}"
        )
    num_tasks, _, num_experts = routes.shape
    names = [f"{layer}/expert{e}" for layer in layer_names for e in range(num_experts)]
    return names, routes.detach().double().cpu().reshape(num_tasks, -1).numpy()


def benjamini_hochberg(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values), same order as `p_values` (scipy's
    `false_discovery_control`, method "bh"), with the checks this module's callers rely on.

    q_(i) = min over j >= i of m·p_(j)/j for the ascending p_(1) <= … <= p_(m), capped at 1; a test is
    significant at false discovery rate α when its q <= α.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise UsageError(f"p_values: expected a 1-D array of probabilities in [0, 1], got {p!r}")
    if len(p) == 0:
        return p.copy()
    return require("scipy.stats").false_discovery_control(p, method="bh")


@dataclass
class CorrelationResult:
    """Every tested (feature, usage column) pair, and what was not tested and why.

    rows: one dict per test: feature, usage, r, p, q (Benjamini–Hochberg), p_bonferroni, significant (q <= alpha),
        in feature then usage order.
    skipped: reason → names of the columns not tested ("constant feature", "feature with missing values",
        "constant usage"): a constant column has no correlation to test.
    """

    alpha: float
    num_tasks: int
    rows: list[dict] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)

    @property
    def significant(self) -> list[dict]:
        """The significant pairs, strongest |r| first."""
        return sorted((row for row in self.rows if row["significant"]), key=lambda row: (-abs(row["r"]), row["p"]))


def feature_usage_correlation(
    features: np.ndarray,
    feature_names: Sequence[str],
    usage: np.ndarray,
    usage_names: Sequence[str],
    alpha: float = 0.05,
) -> CorrelationResult:
    """Pearson r and p (scipy.stats.pearsonr, two-sided) of every feature column with every usage column.

    features (T, F), usage (T, K): one row per task, in the same order. Constant columns and features with a
    missing value (NaN) are not tested; they are named in `skipped`. p-values are corrected over all tests.
    """
    stats = require("scipy.stats")
    features = np.asarray(features, dtype=np.float64)
    usage = np.asarray(usage, dtype=np.float64)
    if features.ndim != 2 or features.shape[1] != len(feature_names):
        raise UsageError(f"features: expected (tasks, {len(feature_names)}) columns, got {features.shape}")
    if usage.ndim != 2 or usage.shape[1] != len(usage_names):
        raise UsageError(f"usage: expected (tasks, {len(usage_names)}) columns, got {usage.shape}")
    if features.shape[0] != usage.shape[0] or features.shape[0] < 3:
        raise UsageError(
            f"feature correlation needs the same tasks (at least 3) in features and usage; got "
            f"{features.shape[0]} and {usage.shape[0]} tasks"
        )
    if not 0 < alpha < 1:
        raise UsageError(f"alpha: expected a significance level in (0, 1), got {alpha}")
    result = CorrelationResult(alpha=alpha, num_tasks=features.shape[0])

    def constant(column: np.ndarray) -> bool:
        return bool(np.ptp(column) <= 1e-12)

    tested_features = []
    for j, name in enumerate(feature_names):
        if np.isnan(features[:, j]).any():
            result.skipped.setdefault("feature with missing values", []).append(name)
        elif constant(features[:, j]):
            result.skipped.setdefault("constant feature", []).append(name)
        else:
            tested_features.append(j)
    tested_usage = []
    for k, name in enumerate(usage_names):
        if constant(usage[:, k]):
            result.skipped.setdefault("constant usage", []).append(name)
        else:
            tested_usage.append(k)
    for j in tested_features:
        for k in tested_usage:
            test = stats.pearsonr(features[:, j], usage[:, k])
            result.rows.append(
                {
                    "feature": feature_names[j],
                    "usage": usage_names[k],
                    "r": float(test.statistic),
                    "p": float(test.pvalue),
                }
            )
    p = np.array([row["p"] for row in result.rows])
    q = benjamini_hochberg(p)
    bonferroni = np.minimum(p * len(p), 1.0)
    for row, q_value, p_bonferroni in zip(result.rows, q, bonferroni, strict=True):
        row.update(q=float(q_value), p_bonferroni=float(p_bonferroni), significant=bool(q_value <= alpha))
    return result


def correlation_markdown(result: CorrelationResult) -> str:
    """The significant pairs as a Markdown table, with the counts of tests and of skipped columns."""
    lines = [
        f"# Feature–expert usage correlation ({result.num_tasks} tasks)",
        "",
        f"{len(result.rows)} Pearson tests; significant: Benjamini–Hochberg q <= {result.alpha} "
        f"({len(result.significant)} pairs; {sum(row['p_bonferroni'] <= result.alpha for row in result.rows)} "
        "also pass Bonferroni).",
        "",
    ]
    for reason, names in sorted(result.skipped.items()):
        lines.append(f"- not tested, {reason}: {len(names)} ({', '.join(names)})")
    lines += ["", "| feature | expert usage | r | p | q (BH) | p (Bonferroni) |", "|---|---|---|---|---|---|"]
    for row in result.significant:
        lines.append(
            f"| {row['feature']} | {row['usage']} | {row['r']:+.3f} | {row['p']:.2e} | {row['q']:.2e} | "
            f"{row['p_bonferroni']:.2e} |"
        )
    if not result.significant:
        lines.append("| (none) | | | | | |")
    return "\n".join(lines) + "\n"
