"""The files of an evaluation or predict run, in the run folder (`MoEMultiTaskModule.run_dir`).

evaluation/<stage>-epoch<e>-step<s>.{csv,json}   one row per task, then the average (during fit)
evaluation/<stage>-<checkpoint stem>.{csv,json}  a checkpoint evaluated on its own
predictions/<task>.jsonl                         generated outputs, in example order
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..atomic_files import atomic_path
from .task_evaluation import ROW_FIELDS, EvaluationResult


def evaluation_stem(folder: Path, stage: str, epoch: int, step: int, checkpoint: str | None = None) -> Path:
    """The path (no suffix) of one evaluation's files: named by the checkpoint evaluated on its own, else by
    the epoch and step of the fit."""
    if checkpoint:
        return folder / f"{stage}-{Path(checkpoint).stem}"
    return folder / f"{stage}-epoch{epoch}-step{step}"


def write_evaluation(stem: Path, result: EvaluationResult, epoch: int, step: int) -> None:
    """`stem`.csv (a row per task, then "average") and `stem`.json (the same, with stage, epoch and step)."""
    with atomic_path(stem.with_suffix(".csv")) as temp, open(temp, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(ROW_FIELDS))
        writer.writeheader()
        writer.writerows(result.rows)
        writer.writerow({"task": "average", "score": result.score, "loss": result.loss})
    average = {"loss": result.loss, "score": result.score}
    summary = {"stage": result.stage, "epoch": epoch, "step": step, "average": average, "tasks": result.rows}
    with atomic_path(stem.with_suffix(".json")) as temp:
        temp.write_text(json.dumps(summary, indent=1) + "\n")


def write_predictions(folder: Path, by_task: Mapping[str, list[dict[str, Any]]]) -> None:
    """`folder`/<task>.jsonl, one JSON row per example, in the given order."""
    for task, rows in by_task.items():
        with atomic_path(folder / f"{task}.jsonl") as temp, open(temp, "w") as file:
            for row in rows:
                file.write(json.dumps(row) + "\n")
