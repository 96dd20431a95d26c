"""Per-task bookkeeping of one evaluation epoch (validation or test) and of one predict epoch.

`TaskEvaluation` collects what each batch gives: token NLL sums and counts per task id, and every generated
output with its references. `finish` reduces the sums over ranks, gathers the outputs of every rank (a
torchmetrics `GeneratedOutputs` state), scores each task by its CrossFit metric and returns the rows and the
logged metrics. The module only calls it from its Lightning hooks; the files are written by `moe_mtl.runs`
(`write_evaluation`, `write_predictions`).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from .metrics import score

ROW_FIELDS = ("task", "partition", "metric", "score", "loss", "examples")


class GeneratedOutputs(Metric):
    """JSON records (generated outputs with what identifies them) of one epoch, gathered from every rank.

    `compute()` returns the records of every rank, rank by rank, each rank's in the order it added them.
    """

    # States must be tensors: each `update` appends its records as one uint8 chunk of JSON lines. One list state
    # of one dtype, reduced by "cat", is one padded all-gather per epoch; JSON keeps any text and the references'
    # nesting exact, where token ids would not survive a tokenizer round trip.
    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_state("jsonl", default=[], dist_reduce_fx="cat")

    def update(self, records: Sequence[Any]) -> None:
        """Append `records` (JSON-serialisable); an empty update still appends a chunk: see `TaskEvaluation`."""
        text = "".join(json.dumps(record) + "\n" for record in records)  # ASCII: json escapes "\n" and the rest
        data = bytearray(text.encode("ascii"))
        chunk = torch.frombuffer(data, dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
        self.jsonl.append(chunk.to(self.device))

    def compute(self) -> list[Any]:
        data = dim_zero_cat(self.jsonl).cpu().numpy().tobytes()
        return [json.loads(line) for line in data.split(b"\n") if line]


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
        self.outputs = GeneratedOutputs().to(device)  # [task id, example id, prediction, references] records

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
        records = zip(task_ids.tolist(), list(example_ids), predictions, map(list, references), strict=True)
        self.outputs.update(list(records))

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
        # a rank without batches still sends a uint8 chunk (torchmetrics would send a float one for an empty
        # list state) and compute() knows the epoch was seen
        self.outputs.update([])
        by_task: dict[int, list[tuple]] = defaultdict(list)
        for task, example, prediction, references in self.outputs.compute():
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


def gather_predictions(
    rows: list[dict[str, Any]], device: torch.device | str = "cpu"
) -> dict[str, list[dict[str, Any]]]:
    """Predict rows of every rank, by task, each task's rows in example order (`device`: where the collective
    runs, the module's device)."""
    outputs = GeneratedOutputs().to(device)
    outputs.update(rows)
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in outputs.compute():
        by_task[row["task"]].append(row)
    return {task: sorted(task_rows, key=lambda r: r["example_id"]) for task, task_rows in by_task.items()}


def prediction_rows(
    batch: Mapping[str, Any], inputs: Sequence[str], predictions: Sequence[str], task_names: Sequence[str]
) -> list[dict[str, Any]]:
    """One predict row per example of `batch` (its "task_ids", "example_ids" and "references"): the task's name,
    the example id, the decoded input and the generated prediction, as `moe-mtl predict` writes them."""
    return [
        {
            "task": task_names[task],
            "example_id": example,
            "input": text,
            "prediction": prediction,
            "references": list(references),
        }
        for task, example, text, prediction, references in zip(
            batch["task_ids"].tolist(),
            batch["example_ids"].tolist(),
            inputs,
            predictions,
            batch["references"],
            strict=True,
        )
    ]
