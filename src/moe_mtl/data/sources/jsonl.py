"""The bring-your-own-data format: a directory of JSON-lines task files.

Layouts (both may be mixed in one directory):

- one file per task, `<data_dir>/<task>.jsonl`, each line with a "split" of "train", "dev" or "test";
- one folder per task, `<data_dir>/<task>/{train,dev,test}.jsonl` (any subset of the three files).

Each line is a JSON object `{"input": str, "target": str | [str, ...], "options"?: [str, ...]}`;
other keys are kept out of the model and ignored. `<data_dir>/tasks.json` (or the `task_info`
option) gives metric, features and partition per task (see `read_task_info`).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..tasks import (
    SPLITS,
    DataError,
    Example,
    Task,
    check_choice,
    numbered_lines,
    read_utf8,
    task_info_for,
    where,
)


def parse_line(line: str, path: Path, number: int) -> tuple[Example, str | None]:
    """One JSON line → (example, its "split" field or None). Errors name the file and line."""
    location = where(path, number)
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{location}: invalid JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{location}: expected a JSON object with 'input' and 'target'")
    if not isinstance(record.get("input"), str):
        raise DataError(f"{location}: 'input' is missing or not a string; each line needs 'input': str")
    target = record.get("target")
    targets = [target] if isinstance(target, str) else target
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise DataError(
            f"{location}: 'target' is missing or invalid; each line needs 'target': str or a non-empty list of str"
        )
    options = record.get("options", [])
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise DataError(f"{location}: 'options' must be a list of strings")
    example = Example(record["input"], tuple(targets), tuple(options), origin=location)
    return example, record.get("split")


def read_jsonl(path: Path, split: str | None = None) -> dict[str, list[Example]]:
    """The examples of one file by split. With `split` (folder layout) every line belongs to it and a
    "split" field, if present, must agree; without it each line must name its split."""
    splits: dict[str, list[Example]] = {}
    for number, line in numbered_lines(read_utf8(path)):
        if not line.strip():
            continue
        example, line_split = parse_line(line, path, number)
        if split is None:
            check_choice("'split'", line_split, SPLITS, where(path, number))
        elif line_split not in (None, split):
            raise DataError(f"{where(path, number)}: 'split' is {line_split!r} in {split}.jsonl; expected {split!r}")
        splits.setdefault(split or line_split, []).append(example)
    if not splits:
        raise DataError(f"{path}: empty task file; it must hold at least one example line")
    return splits


def jsonl_tasks(data_dir: str | Path, task_info: str | Path | None = None) -> list[Task]:
    """All tasks of a JSON-lines directory, sorted by name (`load_tasks` checks that names are unique)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory not found (source 'jsonl')")
    found: list[tuple[str, Path, dict[str, list[Example]]]] = []
    for entry in sorted(data_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix == ".jsonl":
            found.append((entry.stem, entry, read_jsonl(entry)))
        elif entry.is_dir():
            files = {split: entry / f"{split}.jsonl" for split in SPLITS if (entry / f"{split}.jsonl").is_file()}
            if not files:
                raise DataError(f"{entry}: task folder without train.jsonl, dev.jsonl or test.jsonl")
            found.append((entry.name, entry, {split: read_jsonl(path, split)[split] for split, path in files.items()}))
    if not found:
        raise DataError(f"{data_dir}: no <task>.jsonl files or <task>/ folders (source 'jsonl')")
    info = task_info_for(data_dir, [name for name, _, _ in found], task_info)
    return [info[name].task(name, splits, str(path)) for name, path, splits in found]
