"""CrossFit's data layout (Ye, Lin & Ren 2021): `<data_dir>/<task>/<task>_<k>_<seed>_{train,dev,test}.tsv`.

Each line is `input<TAB>output[<TAB>more references]`; a column may also hold several references
separated by " [SEP] ". Train and dev files are k-shot samples per seed (they become
`Task.fewshot[seed]`); the test file is the same for every seed, so the one of the smallest seed
is read. Metrics come from `<data_dir>/tasks.json` or the `task_info` option, which may be
CrossFit's task_metrics.json.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..tasks import DataError, Example, Task, numbered_lines, read_utf8, task_info_for, where

FILE_NAME = re.compile(r"^(?P<task>.+)_(?P<k>\d+)_(?P<seed>\d+)_(?P<split>train|dev|test)\.tsv$")
REFERENCE_SEPARATOR = " [SEP] "


def read_tsv(path: Path) -> list[Example]:
    """The examples of one CrossFit file; a line without an output column is an error naming the line."""
    examples = []
    for number, line in numbered_lines(read_utf8(path)):
        if not line.strip():
            continue
        columns = line.split("\t")
        if len(columns) < 2:
            raise DataError(f"{where(path, number)}: expected input<TAB>output[<TAB>more references]")
        targets = tuple(ref for column in columns[1:] for ref in column.split(REFERENCE_SEPARATOR))
        examples.append(Example(columns[0], targets, origin=where(path, number)))
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


def crossfit_tasks(data_dir: str | Path, task_info: str | Path | None = None) -> list[Task]:
    """All tasks of a CrossFit data directory, sorted by name."""
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
        fewshot = {}
        for seed, by_split in files.items():
            missing = {"train", "dev"} - set(by_split)
            if missing:
                raise DataError(f"{folder}: seed {seed} lacks its {' and '.join(sorted(missing))} file")
            fewshot[seed] = {split: read_tsv(by_split[split]) for split in ("train", "dev")}
        tests = [by_split["test"] for _, by_split in sorted(files.items()) if "test" in by_split]
        splits = {"test": read_tsv(tests[0])} if tests else {}
        tasks.append(info[name].task(name, splits, str(folder), fewshot=fewshot))
    return tasks
