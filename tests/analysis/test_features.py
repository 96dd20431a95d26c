"""Task features as the analysis reads them: kinds, groups, shared values, and the defaults chosen from the data
(never from a feature name), on features that are not the skill suite's."""

import pytest

from moe_mtl.analysis.features import (
    choose_group_by,
    choose_skill_feature,
    feature_groups,
    features_by_kind,
    shared_values,
    sharing_pairs,
    task_features,
)
from moe_mtl.data import load_tasks
from moe_mtl.data.tasks import Example, Task


def tasks(*features: dict) -> list[Task]:
    return [Task(f"t{i}", {"train": [Example("in", ("out",))]}, features=f) for i, f in enumerate(features)]


# a CrossFit-style suite: two categorical features, a list, booleans written only where true, a number
SUITE = tasks(
    {"family": "cls", "operation": "label", "tags": ["a", "b"], "binary": True, "num_labels": 2},
    {"family": "cls", "operation": "label", "tags": ["b"], "multiple_choice": False},
    {"family": "qa", "tags": ["c"], "binary": True},
    {"family": "qa", "operation": "extract", "tags": ["c", "d"], "multiple_choice": True},
    {"family": "gen", "operation": "rewrite", "tags": ["e"]},
)


def test_kinds_are_read_from_the_values_in_the_order_written():
    features = task_features(SUITE)
    assert [(f.name, f.kind, f.present) for f in features.values()] == [
        ("family", "categorical", 5),
        ("operation", "categorical", 4),
        ("tags", "list", 5),
        ("binary", "boolean", 2),
        ("num_labels", "numeric", 1),
        ("multiple_choice", "boolean", 2),
    ]
    assert task_features(tasks({"x": "a"}, {"x": ["b", "c"]}))["x"].kind == "list"  # a string is a 1-element list
    assert task_features(tasks({"x": 1}, {"x": "a"}))["x"].kind == "mixed"
    assert features_by_kind({n: f.kind for n, f in features.items()}) == (
        "categorical: family, operation; list: tags; boolean: binary, multiple_choice; numeric: num_labels"
    )


def test_any_feature_groups_tasks_as_written_and_a_task_without_it_is_in_none():
    assert feature_groups(SUITE, "family") == [["cls"], ["cls"], ["qa"], ["qa"], ["gen"]]
    assert feature_groups(SUITE, "tags")[0] == ["a", "b"]
    assert feature_groups(SUITE, "binary") == [["true"], ["(none)"], ["true"], ["(none)"], ["(none)"]]
    assert feature_groups(SUITE, "num_labels")[0] == ["2"]
    assert feature_groups(tasks({"tags": []}, {"tags": ["a"]}), "tags") == [["(none)"], ["a"]]
    with pytest.raises(ValueError, match=r"group_by: no task has the feature 'families'; available: \['binary'"):
        feature_groups(SUITE, "families")


def test_shared_values_of_list_and_categorical_features_and_the_kinds_refused():
    assert shared_values(SUITE, "operation") == [{"label"}, {"label"}, None, {"extract"}, {"rewrite"}]
    assert shared_values(SUITE, "tags")[3] == {"c", "d"}
    assert sharing_pairs(shared_values(SUITE, "operation")) == (1, 5)  # of the 4 tasks that have it
    with pytest.raises(ValueError, match=r"'binary' is a boolean feature; .* \['family', 'operation', 'tags'\]"):
        shared_values(SUITE, "binary")
    with pytest.raises(ValueError, match=r"no seen task has the feature 'skills'; list or categorical features"):
        shared_values(SUITE, "skills")


def test_defaults_are_chosen_from_the_data_and_say_why():
    grouping = choose_group_by(SUITE)
    assert (grouping.feature, grouping.given) == ("family", False)
    assert grouping.reason == (
        "chosen from the data: a categorical feature, 3 groups of the 5 tasks; --group_by names another"
    )
    sharing = choose_skill_feature(SUITE)  # a list feature first: tags ("c" is shared by t2 and t3, "b" by t0, t1)
    assert sharing.feature == "tags"
    assert sharing.reason == (
        "chosen from the data: a list feature, 2 of 10 task pairs share a value; --skill_feature names another"
    )
    given = choose_group_by(SUITE, "operation")
    assert (given.feature, given.given, given.reason) == ("operation", True, "given; 1 of the 5 tasks lack it")
    assert choose_skill_feature(SUITE, "family").describe() == "family (given)"


def test_a_feature_that_does_not_group_or_share_is_passed_over_for_the_next():
    # `id` puts every task alone, `kind` all together: neither groups, so the booleans' turn comes
    data = tasks(
        {"id": "a", "kind": "x", "hard": True},
        {"id": "b", "kind": "x", "hard": False},
        {"id": "c", "kind": "x", "hard": True},
    )
    assert choose_group_by(data).feature == "hard"
    none = choose_skill_feature(data)  # every pair shares `kind`, none shares `id`; booleans define no skill
    assert none.feature is None and none.reason.startswith("no list or categorical feature by which some task pairs")
    # the feature on the most tasks first, whatever the order written
    covered = tasks({"b": "x", "a": "x"}, {"a": "x"}, {"a": "y"})
    assert choose_group_by(covered).feature == "a"
    bare = choose_group_by(tasks({}, {}, {}))
    assert bare.feature is None and bare.reason.endswith("features: none; tasks not grouped")


def test_the_skill_suite_gets_its_own_features_by_the_same_rule():
    suite = load_tasks("skills", skills={"train_size": 1, "dev_size": 1, "test_size": 1, "shots": 2})
    seen = [t for t in suite if t.partition == "train"]
    assert choose_group_by(seen).feature == "output_type"  # the first categorical feature written
    assert choose_skill_feature(seen).feature == "skills"  # the first list feature written
