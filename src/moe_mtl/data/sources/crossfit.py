"""CrossFit's data layout (Ye, Lin & Ren 2021): `<data_dir>/<task>/<task>_<k>_<seed>_{train,dev,test}.tsv`.

Lines are read as CrossFit's loaders read them (`dataloader/fewshot_gym_singletask.py`, `…_multitask.py`:
`d = line.strip().split("\t")`, input `d[0]`, outputs `d[1:]`): white space at both ends of the line goes,
then every tab starts one more output (reference). Nothing else splits an output: a " [SEP] " inside one
belongs to it (superglue-multirc joins all correct answers with " [SEP] " into one target). With
`CrossFitOptions.task_prefix` every input of every split starts with " [<task>] ", as those loaders feed it.

Train and dev files are k-shot samples per seed (they become `Task.fewshot[seed]`; the data module's
`fewshot_seed` picks one seed or all); the test file is the same for every seed, so the one of the smallest
seed is read. Metrics come from `<data_dir>/tasks.json` or the `task_info` option, which may be CrossFit's
task_metrics.json.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..tasks import (
    DataError,
    Example,
    Task,
    numbered_lines,
    options_from_dict,
    read_utf8,
    shortened,
    task_info_for,
    where,
)

log = logging.getLogger(__name__)

FILE_NAME = re.compile(r"^(?P<task>.+)_(?P<k>\d+)_(?P<seed>\d+)_(?P<split>train|dev|test)\.tsv$")


@dataclass
class CrossFitOptions:
    """How source "crossfit" turns CrossFit's lines into examples (the `crossfit` option of the data module)."""

    task_prefix: bool = True
    """Start every input of every split (train, dev, test; every seed) with " [<task>] ", e.g.
    " [glue-sst2] sentence: …", as the loaders of CrossFit and of the task-level MoE paper do."""

    def __post_init__(self) -> None:
        if not isinstance(self.task_prefix, bool):
            raise DataError(f"`crossfit` option `task_prefix` is {self.task_prefix!r}; it must be true or false")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> CrossFitOptions:
        """Build from the `crossfit` option, naming unknown keys."""
        return options_from_dict(cls, values, "crossfit")


def read_tsv(path: Path, prefix: str = "") -> list[Example]:
    """The examples of one CrossFit file, each input after `prefix`.

    A line is `line.strip().split("\t")`: the input, then one output per column. Blank lines are skipped
    (a warning names them); a line without an output is an error naming the line.
    """
    lines = list(numbered_lines(read_utf8(path)))
    if lines[-1][1] == "":  # what follows the newline that ends the last line
        lines.pop()
    examples, blank = [], []
    for number, line in lines:
        columns = line.strip().split("\t")
        if columns == [""]:
            blank.append(number)
            continue
        if len(columns) < 2:
            raise DataError(
                f"{where(path, number)}: no output in {line[:80]!r}; expected input<TAB>output[<TAB>more outputs] "
                "(white space at both ends of a line is stripped first, as CrossFit's loaders do)"
            )
        examples.append(Example(prefix + columns[0], tuple(columns[1:]), origin=where(path, number)))
    if blank:
        log.warning("%s: skipped %d blank line(s) (line numbers %s)", path, len(blank), shortened(blank))
    if not examples:
        raise DataError(f"{path}: empty file; a CrossFit file holds at least one input<TAB>output line")
    return examples


def _task_files(folder: Path) -> dict[int, dict[str, Path]]:
    """seed → split → file of one task folder, checking the names against CrossFit's pattern."""
    files: dict[int, dict[str, Path]] = {}
    shots: dict[int, int] = {}
    for path in sorted(folder.glob("*.tsv")):
        match = FILE_NAME.match(path.name)
        if match is None or match["task"] != folder.name:
            raise DataError(f"{path}: expected a file named {folder.name}_<k>_<seed>_<train|dev|test>.tsv")
        seed, k = int(match["seed"]), int(match["k"])
        if shots.setdefault(seed, k) != k:
            raise DataError(f"{path}: seed {seed} has files for k={shots[seed]} and k={k}; keep one k per seed")
        files.setdefault(seed, {})[match["split"]] = path
    return files


def crossfit_tasks(
    data_dir: str | Path,
    task_info: str | Path | None = None,
    options: CrossFitOptions | Mapping[str, Any] | None = None,
) -> list[Task]:
    """All tasks of a CrossFit data directory, sorted by name.

    `Task.fewshot` holds the seeds in file-name order (100, 13, 21, 42, 87 for CrossFit's), the order in
    which CrossFit's multi-task loaders read them.
    """
    if not isinstance(options, CrossFitOptions):
        options = CrossFitOptions.from_dict(options)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory not found (source 'crossfit')")
    folders = {folder.name: folder for folder in sorted(data_dir.iterdir()) if folder.is_dir()}
    if not folders:
        raise DataError(f"{data_dir}: no task folders <task>/<task>_<k>_<seed>_<split>.tsv (source 'crossfit')")
    info = task_info_for(data_dir, folders, task_info)
    tasks = []
    for name, folder in folders.items():
        files = _task_files(folder)
        if not files:
            raise DataError(f"{folder}: empty task folder; expected {name}_<k>_<seed>_<train|dev|test>.tsv files")
        prefix = f" [{name}] " if options.task_prefix else ""
        fewshot = {}
        for seed, by_split in files.items():
            missing = {"train", "dev"} - set(by_split)
            if missing:
                raise DataError(f"{folder}: seed {seed} lacks its {' and '.join(sorted(missing))} file")
            fewshot[seed] = {split: read_tsv(by_split[split], prefix) for split in ("train", "dev")}
        tests = [by_split["test"] for _, by_split in sorted(files.items()) if "test" in by_split]
        splits = {"test": read_tsv(tests[0], prefix)} if tests else {}
        tasks.append(info[name].task(name, splits, str(folder), fewshot=fewshot))
    return tasks
