"""The evaluation and prediction files of a run."""

import csv
import json

import torch

from moe_mtl.evaluation.task_evaluation import TaskEvaluation
from moe_mtl.runs import evaluation_stem, write_evaluation, write_predictions


def test_evaluation_stem_names_a_checkpoint_evaluated_on_its_own(tmp_path):
    assert evaluation_stem(tmp_path, "val", 3, 120) == tmp_path / "val-epoch3-step120"
    assert (
        evaluation_stem(tmp_path, "test", 0, 0, "runs/x/checkpoints/best-step60.ckpt") == tmp_path / "test-best-step60"
    )


def test_write_evaluation_writes_a_row_per_task_and_the_average(tmp_path):
    evaluation = TaskEvaluation(num_tasks=2)
    evaluation.add(
        torch.tensor([0, 1]), torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]), [0, 0], ["a", "b"], [["a"], ["c"]]
    )
    result = evaluation.finish("val", lambda s: s, ["t0", "t1"], ["EM", "EM"], ["train", "train"])
    stem = tmp_path / "evaluation" / "val-epoch1-step7"
    write_evaluation(stem, result, epoch=1, step=7)
    with open(stem.with_suffix(".csv")) as file:
        rows = list(csv.DictReader(file))
    assert [(r["task"], float(r["score"])) for r in rows] == [("t0", 1.0), ("t1", 0.0), ("average", 0.5)]
    summary = json.loads(stem.with_suffix(".json").read_text())
    assert (summary["stage"], summary["epoch"], summary["step"]) == ("val", 1, 7)
    assert summary["average"] == {"loss": result.loss, "score": 0.5}
    assert summary["tasks"] == result.rows


def test_write_predictions_writes_one_jsonl_per_task(tmp_path):
    write_predictions(
        tmp_path / "predictions", {"t": [{"example_id": 0, "prediction": "x"}, {"example_id": 1, "prediction": "y"}]}
    )
    lines = (tmp_path / "predictions" / "t.jsonl").read_text().splitlines()
    assert [json.loads(line)["prediction"] for line in lines] == ["x", "y"]
