"""Per-task bookkeeping of one evaluation epoch (validation or test) and of one predict epoch.

`TaskEvaluation` collects what each batch gives: token NLL sums and counts per task id, and every generated
output with its references. `finish` reduces the sums over ranks, gathers the outputs of every rank, scores
each task by its CrossFit metric and returns the rows and the logged metrics. The module only calls it from
its Lightning hooks; the files are written by `moe_mtl.runs` (`write_evaluation`, `write_predictions`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from .metrics import score

ROW_FIELDS = ("task", "partition", "metric", "score", "loss", "examples")


def gather_objects(obj: Any) -> list[Any]:
    """`obj` of every rank (a list with only `obj` outside distributed runs)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


@dataclass
class EvaluationResult:
    """One evaluation: a row per evaluated task (`ROW_FIELDS`), the averages and the metrics to log."""

    stage: str
    rows: list[dict[str, Any]]
    loss: float  # token-weighted mean NLL over every evaluated task
    score: float  # mean of the task scores (CrossFit's average)
    metrics: dict[str, float] = field(default_factory=dict)


class TaskEvaluation:
    """Sums and generated outputs of one evaluation epoch, per task id.

    No collectives and no task-dependent log keys while batches come in: ranks may hold different tasks
    (see SequentialTaskBatchSampler); everything is reduced once, in `finish`.
    """

    def __init__(self, num_tasks: int, device: torch.device | str = "cpu"):
        self.nll = torch.zeros(num_tasks, dtype=torch.float64, device=device)
        self.tokens = torch.zeros(num_tasks, dtype=torch.float64, device=device)
        self.records: list[tuple[int, int, str, list[str]]] = []  # (task id, example id, prediction, references)

    def add(
        self,
        task_ids: torch.Tensor,
        nll: torch.Tensor,
        tokens: torch.Tensor,
        example_ids: Sequence[int],
        predictions: Sequence[str],
        references: Sequence[Sequence[str]],
    ) -> None:
        """One batch: per-example NLL sums and target token counts (B,), and the generated outputs."""
        self.nll.index_add_(0, task_ids, nll.double())
        self.tokens.index_add_(0, task_ids, tokens.double())
        for task, example, prediction, refs in zip(
            task_ids.tolist(), list(example_ids), predictions, references, strict=True
        ):
            self.records.append((task, example, prediction, list(refs)))

    def finish(
        self,
        stage: str,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor],
        task_names: Sequence[str],
        task_metrics: Sequence[str],
        task_partitions: Sequence[str],
    ) -> EvaluationResult:
        """Reduce over ranks (`reduce_sum`, e.g. the strategy's sum), gather the outputs and score every task."""
        nll, tokens = reduce_sum(self.nll), reduce_sum(self.tokens)
        by_task: dict[int, list[tuple]] = defaultdict(list)
        for records in gather_objects(self.records):
            for task, example, prediction, references in records:
                by_task[task].append((example, prediction, references))
        rows = []
        for task in sorted(by_task):
            examples = sorted(by_task[task])
            rows.append(
                {
                    "task": task_names[task],
                    "partition": task_partitions[task],
                    "metric": task_metrics[task],
                    "score": score(task_metrics[task], [e[1] for e in examples], [e[2] for e in examples]),
                    "loss": (nll[task] / tokens[task]).item() if tokens[task] > 0 else math.nan,
                    "examples": len(examples),
                }
            )
        mean_loss = (nll.sum() / tokens.sum().clamp_min(1)).item()
        average = sum(r["score"] for r in rows) / len(rows) if rows else math.nan
        metrics = {f"{stage}/loss": mean_loss, f"{stage}/score": average}
        for row in rows:
            metrics[f"{stage}/score/{row['task']}"] = row["score"]
            metrics[f"{stage}/loss/{row['task']}"] = row["loss"]
        return EvaluationResult(stage, rows, mean_loss, average, metrics)


def gather_predictions(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Predict rows of every rank, by task, each task's rows in example order."""
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for records in gather_objects(rows):
        for row in records:
            by_task[row["task"]].append(row)
    return {task: sorted(task_rows, key=lambda r: r["example_id"]) for task, task_rows in by_task.items()}
