"""Tasks from 🤗 `datasets`: any dataset `load_dataset` reads (hub name, local script or builder such as
"json" with `data_files`), or a directory written by `save_to_disk`, with a column mapping per task."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from string import Formatter
from typing import Any

from datasets import ClassLabel, Dataset, load_dataset, load_from_disk

from ..tasks import DEFAULT_METRIC, DataError, Example, Task

log = logging.getLogger(__name__)

DEFAULT_SPLITS = {"train": ("train",), "dev": ("validation", "dev"), "test": ("test",)}


@dataclass
class HFTaskSpec:
    """One task read with 🤗 datasets (an entry of the data module's `hf` option)."""

    name: str
    """Task name."""
    path: str
    """Hub name ("glue"), local dataset script or data folder, builder ("json", "csv"), or a `save_to_disk` folder."""
    config: str | None = None
    """Dataset configuration (`name` of `load_dataset`), e.g. "sst2"."""
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    """`data_files` of `load_dataset`, e.g. {"train": "train.jsonl"} with path="json"."""
    splits: dict[str, str] | None = None
    """Our split ("train", "dev", "test") → the dataset's split. None: train, validation (or dev), test if present."""
    input: str = "input"
    """Input column, or a template of columns such as "premise: {premise} hypothesis: {hypothesis}"."""
    target: str = "target"
    """Target column (dotted for nested fields, e.g. "answers.text"); lists give several references and
    class labels (or lists of them) their label names."""
    options: str | None = None
    """Column of answer options (a list of strings), if any."""
    metric: str = DEFAULT_METRIC
    """CrossFit metric name of the task."""
    features: dict[str, Any] = field(default_factory=dict)
    """Task features for the routing analysis."""
    partition: str = "train"
    """"train" (seen), "dev" or "test" (held-out); the `partition` option overrides it."""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> HFTaskSpec:
        """Build from one entry of the `hf` option, naming missing and unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        missing = sorted({"name", "path"} - set(values))
        if unknown or missing:
            raise DataError(
                f"`hf` entry {dict(values)!r}: unknown keys {unknown}, missing keys {missing}; "
                f"allowed keys: {', '.join(sorted(known))}"
            )
        return cls(**values)


def _load(spec: HFTaskSpec):
    """The DatasetDict of a spec: `load_from_disk` for a `save_to_disk` folder, else `load_dataset`."""
    folder = Path(spec.path)
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        loaded = load_from_disk(str(folder))
        return {"train": loaded} if isinstance(loaded, Dataset) else loaded
    try:
        return load_dataset(spec.path, spec.config, data_files=spec.data_files)
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"hf task {spec.name!r}: cannot load dataset {spec.path!r} ({err})") from err


def _value(row: Mapping[str, Any], column: str, origin: str) -> Any:
    value: Any = row
    for key in column.split("."):
        if not isinstance(value, Mapping) or key not in value:
            raise DataError(f"{origin}: no column {column!r}; columns: {', '.join(row)}")
        value = value[key]
    return value


def _present(value: Any, column: str, origin: str) -> Any:
    if value is None:
        raise DataError(f"{origin}: column {column!r} is null; every row needs its input, target and options")
    return value


def _text(row: Mapping[str, Any], template: str, origin: str) -> str:
    if "{" not in template:
        return str(_present(_value(row, template, origin), template, origin))
    fields = {name.split(".")[0].split("[")[0] for _, name, _, _ in Formatter().parse(template) if name}
    for name in sorted(fields):
        if name not in row:
            raise DataError(f"{origin}: the input template names column {name!r}; columns: {', '.join(row)}")
        _present(row[name], name, origin)
    return template.format_map(row)


def _label_names(features: Mapping[str, Any], column: str) -> list[str] | None:
    """The class names of a (dotted) target column of class labels, or of lists of them; None for other columns."""
    feature: Any = features
    for key in column.split("."):
        while hasattr(feature, "feature"):  # List / Sequence: a list of what it holds
            feature = feature.feature
        if not isinstance(feature, Mapping) or key not in feature:
            return None
        feature = feature[key]
    while hasattr(feature, "feature"):
        feature = feature.feature
    return list(feature.names) if isinstance(feature, ClassLabel) else None


def _references(value: Any, label_names: list[str] | None, column: str, origin: str) -> tuple[str, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or any(v is None for v in values):
        raise DataError(f"{origin}: the target is empty or null; each row needs a target")
    if label_names is None:
        return tuple(map(str, values))
    for v in values:
        if not 0 <= v < len(label_names):
            raise DataError(
                f"{origin}: class label {v} of column {column!r} is not one of 0..{len(label_names) - 1} "
                f"({', '.join(label_names)}); -1 marks an unlabeled row, as in GLUE's test splits: leave such a "
                "split out with the task's `splits` mapping, e.g. {train: train, dev: validation}"
            )
    return tuple(label_names[v] for v in values)


def _split_examples(spec: HFTaskSpec, dataset, split_name: str) -> list[Example]:
    label_names = _label_names(dataset.features, spec.target)
    examples = []
    for number, row in enumerate(dataset):
        origin = f"{spec.path}[{split_name}] row {number}"
        options = _present(_value(row, spec.options, origin), spec.options, origin) if spec.options else []
        examples.append(
            Example(
                _text(row, spec.input, origin),
                _references(_value(row, spec.target, origin), label_names, spec.target, origin),
                tuple(str(_present(option, spec.options, origin)) for option in options),
                origin=origin,
            )
        )
    if not examples:
        raise DataError(f"{spec.path}[{split_name}]: empty split of task {spec.name!r}")
    return examples


def hf_tasks(specs: list[HFTaskSpec | Mapping[str, Any]]) -> list[Task]:
    """One task per spec, in the given order."""
    if not specs:
        raise DataError("source 'hf' needs the `hf` option: a list of tasks with name, path and columns")
    tasks = []
    for spec in specs:
        spec = spec if isinstance(spec, HFTaskSpec) else HFTaskSpec.from_dict(spec)
        loaded = _load(spec)
        if spec.splits is None:
            chosen = {
                ours: next(s for s in theirs if s in loaded)
                for ours, theirs in DEFAULT_SPLITS.items()
                if any(s in loaded for s in theirs)
            }
            log.info("hf task %r: splits %s of %s (no `splits` mapping given)", spec.name, chosen, spec.path)
        else:
            chosen = spec.splits
            absent = sorted(s for s in chosen.values() if s not in loaded)
            if absent:
                raise DataError(f"hf task {spec.name!r}: {spec.path} has no split {absent}; it has {sorted(loaded)}")
        splits = {ours: _split_examples(spec, loaded[theirs], theirs) for ours, theirs in chosen.items()}
        tasks.append(
            Task(
                spec.name,
                splits,
                metric=spec.metric,
                features=dict(spec.features),
                partition=spec.partition,
                origin=f"hf dataset {spec.path}",
            )
        )
    return tasks
