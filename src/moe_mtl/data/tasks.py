"""Tasks, examples, metric names, task information and task partitions: the one shape every source returns.

A task (CrossFit's sense) is a name, examples per split, a metric, optional features (used by the
routing analysis) and a partition: "train" (seen tasks), "dev" or "test" (held-out, unseen tasks).
Held-out tasks may also carry k-shot train/dev splits per sampling seed, as CrossFit's do.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..errors import UsageError

log = logging.getLogger(__name__)

METRICS = (
    "EM",
    "ACC",
    "Classification-F1",
    "QA-F1",
    "Rouge-L",
    "Matthew-Correlation",
    "Pearson-Correlation",
    "Strict-EM",
)
"""Metric names: CrossFit's seven, then our Strict-EM; each is defined in `moe_mtl.evaluation.metrics`."""
PARTITIONS = ("train", "dev", "test")
SPLITS = ("train", "dev", "test")
DEFAULT_METRIC = "EM"
TASK_INFO_FILE = "tasks.json"


def partition_list(parts: str | Sequence[str]) -> list[str]:
    """A partition option's value as a list: one partition ("test") or several (["train", "test"])."""
    return [parts] if isinstance(parts, str) else list(parts)


class DataError(UsageError):
    """Bad task data or data configuration. The message names the file and line (or option) and what is valid."""


def where(path: str | Path, line: int | None = None) -> str:
    """`path:line`, the location prefix of data error messages."""
    return f"{path}:{line}" if line is not None else str(path)


def check_choice(what: str, value: Any, allowed: Sequence[str], location: str) -> None:
    """Raise `DataError` naming `location` when `value` is not one of `allowed`."""
    if value not in allowed:
        raise DataError(f"{location}: {what} is {value!r}; allowed: {', '.join(map(repr, allowed))}")


Options = TypeVar("Options")


def options_from_dict(cls: type[Options], values: Mapping[str, Any] | None, option: str) -> Options:
    """An options dataclass from the dict form of the data module option `option`, naming unknown keys."""
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DataError(f"unknown `{option}` options {unknown}; allowed: {', '.join(sorted(known))}")
    return cls(**values)


def read_json(path: str | Path) -> tuple[Any, str]:
    """Parse a JSON file; returns (value, text). Errors name the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = read_utf8(path)
    try:
        return json.loads(text), text
    except json.JSONDecodeError as err:
        raise DataError(f"{where(path, err.lineno)}: invalid JSON ({err.msg}, column {err.colno})") from None


def read_utf8(path: Path) -> str:
    """The text of a UTF-8 file; a decoding error names the file, line and byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{where(path, line)}: not UTF-8 (byte {data[err.start]:#04x} at offset {err.start}); "
            "task files must be UTF-8 text"
        ) from None


def shortened(items: Sequence[Any], most: int = 10) -> str:
    """The first `most` items joined by commas, then how many there are in all: "a, b, … (12 in all)"."""
    return ", ".join(map(str, items[:most])) + (f", … ({len(items)} in all)" if len(items) > most else "")


def numbered_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file's content, numbered from 1.

    Lines end at "\n" only (a "\r" before it is dropped): `str.splitlines` also breaks at U+2028,
    U+2029, U+0085 and other separators, which JSON strings and TSV cells may hold raw.
    """
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line.removesuffix("\r")


def line_of(text: str, key: str) -> int | None:
    """The first line of a JSON text where the string `key` appears (the json module keeps no positions)."""
    needle = json.dumps(key)
    for number, line in numbered_lines(text):
        if needle in line:
            return number
    return None


@dataclass(frozen=True, slots=True)
class Example:
    """One text-to-text example.

    input: the model input (with its task prefix, where the source adds one).
    targets: one or more reference outputs; the first is the training target, all count for metrics.
    options: answer options of a multiple-choice example (empty when there are none).
    origin: where the example came from ("file:line"), for error messages.
    """

    input: str
    targets: tuple[str, ...]
    options: tuple[str, ...] = ()
    origin: str | None = None


ALL_SEEDS = "all"  # the `fewshot_seed` that pools the k-shot splits of every seed


@dataclass
class Task:
    """A named task: examples per split, its CrossFit metric, its features and its partition.

    splits: split name ("train", "dev", "test") → examples; a held-out task may have "test" only.
    fewshot: k-shot splits per sampling seed: seed → {"train": [...], "dev": [...]} (CrossFit's layout).
    features: name → value (str, number, bool or list of str): ground truth for the routing analysis.
    origin: the file or folder the task came from, for error messages.
    """

    name: str
    splits: dict[str, list[Example]]
    metric: str = DEFAULT_METRIC
    features: dict[str, Any] = field(default_factory=dict)
    partition: str = "train"
    fewshot: dict[int, dict[str, list[Example]]] = field(default_factory=dict)
    origin: str | None = None

    def __post_init__(self) -> None:
        location = self.origin or f"task {self.name!r}"
        check_choice(f"the metric of task {self.name!r}", self.metric, METRICS, location)
        check_choice(f"the partition of task {self.name!r}", self.partition, PARTITIONS, location)
        for split in self.splits:
            check_choice(f"a split of task {self.name!r}", split, SPLITS, location)
        if not any(self.splits.values()) and not self.fewshot:
            raise DataError(f"{location}: task {self.name!r} has no examples")

    def examples(self, split: str, fewshot_seed: int | str | None = None) -> list[Example]:
        """The examples of one split; with `fewshot_seed`, that seed's k-shot train/dev split if the task has one.

        `fewshot_seed` "all" (`ALL_SEEDS`): the k-shot `split` of every seed, concatenated in `fewshot` order,
        repeats kept (as the multi-task loaders of CrossFit and of the task-level MoE paper read them).
        """
        if fewshot_seed == ALL_SEEDS:
            pooled = [example for by_split in self.fewshot.values() for example in by_split.get(split, [])]
            if pooled:
                return pooled
        elif fewshot_seed is not None and split in self.fewshot.get(fewshot_seed, {}):
            return self.fewshot[fewshot_seed][split]
        if self.splits.get(split):
            return self.splits[split]
        hint = ""
        if self.fewshot and split != "test":
            hint = (
                f"; it has k-shot {split} splits for seeds {sorted(self.fewshot)}: set `fewshot_seed` "
                f"(one of them, or {ALL_SEEDS!r})"
            )
        raise DataError(f"{self.origin or 'task'}: task {self.name!r} has no {split!r} examples{hint}")


# --- task information (metric, features, partition per task) --------------------------------------------


@dataclass(frozen=True)
class TaskInfo:
    """What a task information file says about one task."""

    metric: str = DEFAULT_METRIC
    features: dict[str, Any] = field(default_factory=dict)
    partition: str = "train"

    def task(self, name: str, splits: dict[str, list[Example]], origin: str, **fields: Any) -> Task:
        """The task `name` with this metric, features and partition (further `Task` fields as keywords)."""
        return Task(
            name,
            splits,
            metric=self.metric,
            features=dict(self.features),
            partition=self.partition,
            origin=origin,
            **fields,
        )


def read_task_info(path: str | Path) -> dict[str, TaskInfo]:
    """Read a task information file: a JSON object with one entry per task.

    An entry is either a metric name (the shape of CrossFit's task_metrics.json) or an object with
    optional "metric", "features" (object) and "partition" ("train", "dev" or "test").
    """
    value, text = read_json(path)
    if not isinstance(value, dict):
        raise DataError(f"{where(path, 1)}: expected a JSON object mapping task names to task information")
    info = {}
    for name, entry in value.items():
        location = where(path, line_of(text, name))
        if isinstance(entry, str):
            entry = {"metric": entry}
        if not isinstance(entry, dict):
            raise DataError(f"{location}: the entry of task {name!r} must be a metric name or an object")
        unknown = sorted(set(entry) - {"metric", "features", "partition"})
        if unknown:
            raise DataError(
                f"{location}: task {name!r} has unknown keys {unknown}; allowed: metric, features, partition"
            )
        metric = entry.get("metric", DEFAULT_METRIC)
        partition = entry.get("partition", "train")
        check_choice(f"the metric of task {name!r}", metric, METRICS, location)
        check_choice(f"the partition of task {name!r}", partition, PARTITIONS, location)
        features = entry.get("features", {})
        if not isinstance(features, dict):
            raise DataError(f"{location}: the features of task {name!r} must be an object (name → value)")
        info[name] = TaskInfo(metric, features, partition)
    return info


def task_info_for(data_dir: Path, names: Iterable[str], path: str | Path | None) -> dict[str, TaskInfo]:
    """Task information of the tasks in `data_dir`: from `path`, else `<data_dir>/tasks.json`, else defaults.

    Tasks the file does not cover get the defaults; both cases are stated in the log.
    """
    names = list(names)
    path = Path(path) if path is not None else data_dir / TASK_INFO_FILE
    defaults = f"metric {DEFAULT_METRIC}, no features, partition 'train' unless the `partition` option says otherwise"
    if not path.exists():
        log.warning("no task information file %s: every task gets the defaults (%s)", path, defaults)
        return {name: TaskInfo() for name in names}
    info = read_task_info(path)
    missing = [name for name in names if name not in info]
    if missing:
        log.warning(
            "%s has no entry for %d task(s) %s: they get the defaults (%s)", path, len(missing), missing, defaults
        )
    unused = [name for name in info if name not in names]
    if unused:  # a typo in a task name would otherwise leave its entry unread and the task with the defaults
        log.warning(
            "%s has entries for %d name(s) that are no task in %s, ignored: %s (the tasks: %s)",
            path,
            len(unused),
            data_dir,
            unused,
            names,
        )
    return {name: info.get(name, TaskInfo()) for name in names}


# --- partitions ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    """Task names per partition ("train", "dev", "test"), and where each name was written (for errors)."""

    tasks: dict[str, list[str]]
    origin: str
    lines: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, spec: str | Path | Mapping[str, Sequence[str]]) -> Partition:
        """From a JSON file (the shape of CrossFit's, e.g. random_partition.json) or an inline mapping.

        Keys "train", "dev", "test" list task names; a key "all" (CrossFit's union) is ignored.
        """
        if isinstance(spec, Mapping):
            value, text, origin = spec, None, "the `partition` option"
        else:
            value, text = read_json(spec)
            origin = str(spec)
        if not isinstance(value, Mapping):
            raise DataError(f"{origin}: a partition must map 'train', 'dev', 'test' to lists of task names")
        unknown = sorted(set(value) - {*PARTITIONS, "all"})
        if unknown:
            raise DataError(f"{origin}: unknown partition keys {unknown}; allowed: train, dev, test (and all)")
        tasks, lines, seen = {}, {}, {}
        for part in PARTITIONS:
            names = value.get(part, [])
            if not isinstance(names, Sequence) or isinstance(names, str) or not all(isinstance(n, str) for n in names):
                raise DataError(f"{origin}: partition {part!r} must be a list of task names")
            for name in names:
                if text is not None:
                    lines[name] = line_of(text, name)
                if name in seen:
                    raise DataError(
                        f"{where(origin, lines.get(name))}: task {name!r} is in both {seen[name]!r} and {part!r}"
                    )
                seen[name] = part
            tasks[part] = list(names)
        return cls(tasks, origin, lines)

    def apply(self, tasks: Sequence[Task], source: str) -> list[Task]:
        """The partition's tasks, each with its partition set, in the partition's order (train, dev, test).

        A name the source does not have is an error; source tasks the partition leaves out are not
        used (stated in the log).
        """
        by_name = {task.name: task for task in tasks}
        selected = []
        for part in PARTITIONS:
            for name in self.tasks[part]:
                if name not in by_name:
                    raise DataError(
                        f"{where(self.origin, self.lines.get(name))}: partition {part!r} names task {name!r}, "
                        f"which source {source!r} does not have; known tasks: {shortened(sorted(by_name))}"
                    )
                by_name[name].partition = part
                selected.append(by_name[name])
        unused = len(tasks) - len(selected)
        if unused:
            log.info("partition %s leaves %d of the %d %s tasks out", self.origin, unused, len(tasks), source)
        return selected


def check_unique_names(tasks: Iterable[Task]) -> None:
    """Raise `DataError` naming both origins when two tasks share a name."""
    first: dict[str, Task] = {}
    for task in tasks:
        if task.name in first:
            raise DataError(
                f"duplicate task name {task.name!r}: {first[task.name].origin or 'one task'} and "
                f"{task.origin or 'another'}; task names must be unique"
            )
        first[task.name] = task


def order_by_partition(tasks: Sequence[Task]) -> list[Task]:
    """Seen (train) tasks first, then dev, then test; the source's order within each (a stable sort)."""
    return sorted(tasks, key=lambda task: PARTITIONS.index(task.partition))


# --- features -----------------------------------------------------------------------------------------------


def feature_table(tasks: Sequence[Task]) -> tuple[list[str], np.ndarray]:
    """Task features as a numeric table for correlation with expert usage.

    Returns (columns, table) with table of shape (num_tasks, num_columns). A number feature is one
    column with its value; a string or bool feature `f` becomes one indicator column `f=value` per
    value (`f=true`, `f=false`: as JSON writes them); a list feature becomes one indicator column per
    element. Missing features are NaN (numbers) or 0 (indicators: a task without `f` is in none).
    """
    columns: dict[str, None] = {}
    indicators: set[str] = set()
    rows = []
    for task in tasks:
        row = {}
        for name, value in task.features.items():
            if isinstance(value, str | bool):
                column = f"{name}={str(value).lower() if isinstance(value, bool) else value}"
                row[column] = 1.0
                indicators.add(column)
            elif isinstance(value, int | float):
                row[name] = float(value)
            elif isinstance(value, list | tuple):
                row.update({f"{name}={item}": 1.0 for item in value})
                indicators.update(f"{name}={item}" for item in value)
            else:
                raise DataError(
                    f"{task.origin or 'task'}: feature {name!r} of task {task.name!r} is {value!r}; "
                    "a feature must be a string, number, bool or list of strings"
                )
        columns.update(dict.fromkeys(row))
        rows.append(row)
    names = sorted(columns)
    table = np.array(
        [[row.get(name, 0.0 if name in indicators else math.nan) for name in names] for row in rows], dtype=np.float64
    ).reshape(len(rows), len(names))
    return names, table
