"""Task features as the analysis reads them, on anyone's data: each feature's kind, the groups it makes, the
values tasks share by it, and the grouping and shared-skill feature `moe-mtl analyze` chooses when not told.

A feature's kind is read from its values over the tasks that have it, as `tasks.json` (or the source) wrote them:
"list" (lists of strings; a plain string counts as a one-element list), "categorical" (strings), "boolean",
"numeric" (numbers) or "mixed" (anything else). Values print as JSON writes them (`true`, not `True`).

Defaults come from the data, never from a feature name (`choose_group_by`, `choose_skill_feature`): the kinds in
a fixed order of preference, then the feature that the most tasks have, then the first written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..data.tasks import Task, shortened
from ..errors import UsageError

GROUPING_KINDS = ("categorical", "list", "boolean")  # a categorical feature puts each task in one group: preferred
SHARING_KINDS = ("list", "categorical")  # tasks share a skill when their lists (or values) have an element in common
MISSING_GROUP = "(none)"


def value_text(value: Any) -> str:
    """A feature value as JSON writes it: `true`/`false` for booleans, the string itself, `str` of a number."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _kind(values: Sequence[Any]) -> str:
    if all(isinstance(v, bool) for v in values):
        return "boolean"
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return "numeric"
    if all(isinstance(v, str) for v in values):
        return "categorical"
    if all(isinstance(v, str) or (isinstance(v, list | tuple) and all(isinstance(i, str) for i in v)) for v in values):
        return "list"
    return "mixed"


@dataclass(frozen=True)
class Feature:
    """One feature of a set of tasks: its name, kind, how many of the tasks have it, and its position in the order
    written (the first task's features first, then features first seen in later tasks)."""

    name: str
    kind: str
    present: int
    order: int


def task_features(tasks: Sequence[Task]) -> dict[str, Feature]:
    """The features of `tasks`, name → `Feature`, in the order written."""
    values: dict[str, list[Any]] = {}
    for task in tasks:
        for name, value in task.features.items():
            values.setdefault(name, []).append(value)
    return {name: Feature(name, _kind(found), len(found), i) for i, (name, found) in enumerate(values.items())}


def features_by_kind(kinds_of: Mapping[str, str]) -> str:
    """Features (name → kind) named per kind, for messages: "categorical: family, operation; boolean: a, b, …"."""
    kinds: dict[str, list[str]] = {}
    for name, kind in kinds_of.items():
        kinds.setdefault(kind, []).append(name)
    return "; ".join(f"{kind}: {shortened(names)}" for kind, names in kinds.items()) or "none"


def feature_groups(tasks: Sequence[Task], feature: str) -> list[list[str]]:
    """Each task's groups by `feature` (any feature): one group per element of a list, the value of anything else
    (`value_text`), the group "(none)" for a task without it (or with an empty list). A usage error when no task
    has the feature."""
    if not any(feature in task.features for task in tasks):
        names = sorted(task_features(tasks))
        raise UsageError(f"group_by: no task has the feature {feature!r}; available: {names or 'none (no features)'}")
    groups = []
    for task in tasks:
        value = task.features.get(feature, MISSING_GROUP)
        listed = [value_text(v) for v in value] if isinstance(value, list | tuple) else [value_text(value)]
        groups.append(listed or [MISSING_GROUP])
    return groups


def shared_values(tasks: Sequence[Task], feature: str) -> list[set[str] | None]:
    """What each task can share with another by a list or categorical `feature`: the set of its elements (a
    categorical value is a one-element set); None for a task without the feature. Other kinds are usage errors."""
    features = task_features(tasks)
    sharing = [name for name, f in features.items() if f.kind in SHARING_KINDS]
    if feature not in features:
        raise UsageError(
            f"skill_feature: no seen task has the feature {feature!r}; list or categorical features: "
            f"{sharing or 'none'}"
        )
    if features[feature].kind not in SHARING_KINDS:
        raise UsageError(
            f"skill_feature: {feature!r} is a {features[feature].kind} feature; tasks share skills by a list or "
            f"categorical feature: {sharing or 'none in these tasks'}"
        )
    sets = []
    for task in tasks:
        value = task.features.get(feature)
        sets.append(None if value is None else {value} if isinstance(value, str) else set(value))
    return sets


@dataclass(frozen=True)
class Choice:
    """A feature the analysis uses: `feature` (None: none fits), whether the user `given` it, and why (`reason`)."""

    feature: str | None
    given: bool
    reason: str

    def describe(self) -> str:
        """As the summary prints it: "family (chosen from the data: …)"."""
        return f"{self.feature or 'none'} ({self.reason})"


def _candidates(features: dict[str, Feature], kinds: Sequence[str]) -> list[Feature]:
    """The features of `kinds` in the order of preference: kind, then on the most tasks, then the first written."""
    found = [f for f in features.values() if f.kind in kinds]
    return sorted(found, key=lambda f: (kinds.index(f.kind), -f.present, f.order))


def _lacking(feature: Feature, num_tasks: int) -> str:
    missing = num_tasks - feature.present
    return f"; {missing} of the {num_tasks} tasks lack it" if missing else ""


def choose_group_by(tasks: Sequence[Task], given: str | None = None) -> Choice:
    """The feature that groups `tasks` in the heatmap and the disabling table: `given`, or the first feature, in the
    order of preference (categorical, list, boolean; on the most tasks; first written), whose groups are more than
    one and fewer than the tasks (some group holds two tasks). None when no feature does."""
    features = task_features(tasks)
    if given is not None:
        feature_groups(tasks, given)  # the usage error of a feature no task has
        return Choice(given, True, "given" + _lacking(features[given], len(tasks)))
    for feature in _candidates(features, GROUPING_KINDS):
        labels = {"+".join(groups) for groups in feature_groups(tasks, feature.name)}
        if 1 < len(labels) < len(tasks):
            reason = (
                f"chosen from the data: a {feature.kind} feature, {len(labels)} groups of the {len(tasks)} tasks"
                f"{_lacking(feature, len(tasks))}; --group_by names another"
            )
            return Choice(feature.name, False, reason)
    return Choice(
        None,
        False,
        f"no {', '.join(GROUPING_KINDS)} feature puts the {len(tasks)} tasks in 2 to {len(tasks) - 1} groups; "
        f"features: {features_by_kind({n: f.kind for n, f in features.items()})}; tasks not grouped",
    )


def sharing_pairs(sets: Sequence[set[str] | None]) -> tuple[int, int]:
    """(pairs that share an element, pairs that share none) among the tasks that have the feature (not None)."""
    known = [s for s in sets if s is not None]
    pairs = [(a, b) for i, a in enumerate(known) for b in known[i + 1 :]]
    sharing = sum(bool(a & b) for a, b in pairs)
    return sharing, len(pairs) - sharing


def choose_skill_feature(tasks: Sequence[Task], given: str | None = None) -> Choice:
    """The feature whose shared values define "tasks that share a skill" in the route–skill agreement: `given`, or
    the first list or categorical feature, in the order of preference (list, categorical; on the most tasks; first
    written), by which some task pairs share a value and some share none. None when no feature does."""
    features = task_features(tasks)
    if given is not None:
        shared_values(tasks, given)  # the usage error of a feature no task has, or of a kind nothing shares by
        return Choice(given, True, "given" + _lacking(features[given], len(tasks)))
    for feature in _candidates(features, SHARING_KINDS):
        sharing, not_sharing = sharing_pairs(shared_values(tasks, feature.name))
        if sharing and not_sharing:
            reason = (
                f"chosen from the data: a {feature.kind} feature, {sharing} of {sharing + not_sharing} task pairs "
                f"share a value{_lacking(feature, len(tasks))}; --skill_feature names another"
            )
            return Choice(feature.name, False, reason)
    return Choice(
        None,
        False,
        f"no list or categorical feature by which some task pairs share a value and others share none; "
        f"features: {features_by_kind({n: f.kind for n, f in features.items()})}",
    )


__all__ = [
    "Choice",
    "Feature",
    "choose_group_by",
    "choose_skill_feature",
    "feature_groups",
    "features_by_kind",
    "shared_values",
    "sharing_pairs",
    "task_features",
    "value_text",
]
