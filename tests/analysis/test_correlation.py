"""Feature–usage correlation on constructed tables with known answers, the Benjamini–Hochberg correction, and the
indicator columns of boolean and categorical features."""

import numpy as np
import pytest
import torch
from scipy import stats

from moe_mtl.analysis.correlation import (
    benjamini_hochberg,
    correlation_markdown,
    expert_usage,
    feature_usage_correlation,
)
from moe_mtl.data.tasks import Example, Task, feature_table


def test_benjamini_hochberg_matches_a_hand_computation():
    p = [0.01, 0.04, 0.03, 0.20, 0.005]
    # ascending: 0.005, 0.01, 0.03, 0.04, 0.20 → m·p/rank: 0.025, 0.025, 0.05, 0.05, 0.20 (already monotone)
    expected = [0.025, 0.05, 0.05, 0.20, 0.025]
    np.testing.assert_allclose(benjamini_hochberg(p), expected)
    # the running minimum from the top: 0.04·4/3 = 0.0533 at rank 3 becomes 0.05 from rank 4
    np.testing.assert_allclose(benjamini_hochberg([0.01, 0.04, 0.04, 0.05]), [0.04, 0.05, 0.05, 0.05])
    np.testing.assert_allclose(benjamini_hochberg([0.9, 0.8]), [0.9, 0.9])  # capped by the largest p
    assert benjamini_hochberg([]).shape == (0,)
    with pytest.raises(ValueError, match="probabilities"):
        benjamini_hochberg([0.1, 1.5])


def test_expert_usage_is_layer_major():
    routes = torch.arange(2 * 3 * 2, dtype=torch.float64).reshape(2, 3, 2)
    names, usage = expert_usage(routes, ["encoder.0", "encoder.1", "decoder.0"])
    assert names == [f"{layer}/expert{e}" for layer in ("encoder.0", "encoder.1", "decoder.0") for e in (0, 1)]
    np.testing.assert_array_equal(usage[1], routes[1].flatten().numpy())
    with pytest.raises(ValueError, match="2 layers"):
        expert_usage(routes, ["a", "b"])


def test_a_feature_that_decides_an_experts_usage_is_significant_and_independent_ones_are_not():
    rng = np.random.default_rng(0)
    num_tasks = 40
    skill = rng.integers(0, 2, num_tasks).astype(float)  # tasks with the skill route to expert 1 of layer 0
    noise = rng.integers(0, 2, (num_tasks, 3)).astype(float)  # features unrelated to any route
    features = np.column_stack([skill, noise, np.ones(num_tasks)])  # the last column is constant
    feature_names = ["skills=sum", "noise0", "noise1", "noise2", "domain=digits"]
    routes = torch.zeros(num_tasks, 2, 2, dtype=torch.float64)
    routes[:, 0, 1] = torch.from_numpy(0.1 + 0.8 * skill)
    routes[:, 0, 0] = 1 - routes[:, 0, 1]
    routes[:, 1] = torch.from_numpy(rng.dirichlet([1, 1], num_tasks))  # layer 1: random routes
    usage_names, usage = expert_usage(routes, ["encoder.0", "decoder.0"])
    usage = np.column_stack([usage, np.full(num_tasks, 0.5)])  # a constant usage column too
    usage_names = [*usage_names, "decoder.1/expert0"]

    result = feature_usage_correlation(features, feature_names, usage, usage_names, alpha=0.05)

    assert result.skipped == {"constant feature": ["domain=digits"], "constant usage": ["decoder.1/expert0"]}
    assert len(result.rows) == 4 * 4  # the tested features × the tested usage columns
    significant = {(row["feature"], row["usage"]) for row in result.significant}
    assert significant == {("skills=sum", "encoder.0/expert0"), ("skills=sum", "encoder.0/expert1")}
    by_pair = {(row["feature"], row["usage"]): row for row in result.rows}
    assert by_pair[("skills=sum", "encoder.0/expert1")]["r"] == pytest.approx(1.0)
    assert by_pair[("skills=sum", "encoder.0/expert0")]["r"] == pytest.approx(-1.0)
    # r and p are scipy's; q and the Bonferroni p are the corrections over all 16 tests
    reference = stats.pearsonr(noise[:, 0], usage[:, 2])
    row = by_pair[("noise0", "decoder.0/expert0")]
    assert (row["r"], row["p"]) == pytest.approx((reference.statistic, reference.pvalue))
    p = np.array([row["p"] for row in result.rows])
    np.testing.assert_allclose([row["q"] for row in result.rows], benjamini_hochberg(p))
    np.testing.assert_allclose([row["p_bonferroni"] for row in result.rows], np.minimum(16 * p, 1))

    text = correlation_markdown(result)
    assert "16 Pearson tests" in text and "2 pairs" in text
    assert "not tested, constant feature: 1 (domain=digits)" in text
    assert "| skills=sum | encoder.0/expert1 | +1.000 |" in text


def test_features_with_missing_values_are_counted_not_tested_and_bad_shapes_are_named():
    features = np.array([[1.0, np.nan], [0.0, 2.0], [1.0, 3.0], [0.0, 1.0]])
    usage = np.array([[0.9], [0.1], [0.8], [0.2]])
    result = feature_usage_correlation(features, ["a", "num_skills"], usage, ["encoder.0/expert0"])
    assert result.skipped == {"feature with missing values": ["num_skills"]}
    assert [row["feature"] for row in result.rows] == ["a"]
    with pytest.raises(ValueError, match="at least 3"):
        feature_usage_correlation(features[:2], ["a", "b"], usage[:2], ["u"])
    with pytest.raises(ValueError, match="alpha"):
        feature_usage_correlation(features, ["a", "b"], usage, ["u"], alpha=1.5)


def test_boolean_and_categorical_features_are_correlated_as_indicator_columns():
    # booleans as a CrossFit suite's tasks.json writes them: some tasks say false, some leave the keyword out
    features = [
        {"family": "cls", "binary": True, "english": True},
        {"family": "cls", "binary": False, "english": True},
        {"family": "qa", "english": True},
        {"family": "qa", "binary": True, "english": True},
        {"family": "gen", "english": True},
    ]
    tasks = [Task(f"t{i}", {"train": [Example("in", ("out",))]}, features=f) for i, f in enumerate(features)]
    names, table = feature_table(tasks)
    assert names == ["binary=false", "binary=true", "english=true", "family=cls", "family=gen", "family=qa"]
    np.testing.assert_array_equal(table[:, 1], [1, 0, 0, 1, 0])  # a task without the keyword is in neither column
    np.testing.assert_array_equal(table[:, 0], [0, 1, 0, 0, 0])
    usage = np.array([[0.9], [0.2], [0.1], [0.8], [0.3]])
    result = feature_usage_correlation(table, names, usage, ["encoder.0/expert1"])
    assert result.skipped == {"constant feature": ["english=true"]}  # true on every task: nothing to correlate
    by_feature = {row["feature"]: row for row in result.rows}
    assert by_feature["binary=true"]["r"] == pytest.approx(stats.pearsonr(table[:, 1], usage[:, 0]).statistic)
    assert set(by_feature) == {"binary=false", "binary=true", "family=cls", "family=gen", "family=qa"}
