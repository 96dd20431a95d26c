"""Task sources: each turns tasks on disk (or generated) into `Task` objects of one shape.

`load_tasks` is the one entry point: it reads a source, checks the names, applies the partition
and orders the tasks (seen first, then dev, then test), which fixes the task ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..tasks import DataError, Partition, Task, check_choice, check_unique_names, order_by_partition
from .crossfit import CrossFitOptions, crossfit_tasks
from .hf import HFTaskSpec, hf_tasks
from .jsonl import jsonl_tasks
from .skills import SkillSuiteOptions, skill_tasks

SOURCES = ("skills", "jsonl", "crossfit", "hf")


def load_tasks(
    source: str = "skills",
    *,
    data_dir: str | Path | None = None,
    partition: str | Path | Mapping[str, Sequence[str]] | None = None,
    task_info: str | Path | None = None,
    skills: SkillSuiteOptions | Mapping[str, Any] | None = None,
    hf: Sequence[HFTaskSpec | Mapping[str, Any]] | None = None,
    crossfit: CrossFitOptions | Mapping[str, Any] | None = None,
) -> list[Task]:
    """The tasks of a source, partitioned and ordered; list index = task id.

    source: "skills" (generated, `skills` options), "jsonl" or "crossfit" (`data_dir`, optional
    `task_info` file; "crossfit" also `crossfit` options) or "hf" (`hf` task specs). `partition`, a JSON
    file or mapping with "train", "dev", "test" task lists, selects tasks and overrides the partitions the
    source gives.
    """
    check_choice("`source`", source, SOURCES, "data module option")
    if source in ("jsonl", "crossfit") and data_dir is None:
        raise DataError(f"source {source!r} needs `data_dir`, the directory that holds the tasks")
    if source == "skills":
        tasks = skill_tasks(skills)
    elif source == "jsonl":
        tasks = jsonl_tasks(data_dir, task_info)
    elif source == "crossfit":
        tasks = crossfit_tasks(data_dir, task_info, crossfit)
    else:
        tasks = hf_tasks(list(hf or []))
    check_unique_names(tasks)
    if partition is not None:
        tasks = Partition.load(partition).apply(tasks, source)
    return order_by_partition(tasks)


__all__ = ["SOURCES", "CrossFitOptions", "HFTaskSpec", "SkillSuiteOptions", "load_tasks"]
