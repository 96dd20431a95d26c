"""TaskEvaluation: per-task sums and outputs of one evaluation epoch, reduced and scored once."""

import math

import pytest
import torch

from moe_mtl.evaluation.task_evaluation import TaskEvaluation, gather_predictions


def test_finish_scores_each_task_by_its_metric_and_weights_the_loss_by_tokens():
    evaluation = TaskEvaluation(num_tasks=3)
    # task 0: two examples over two batches, task 2: one; task 1 is never evaluated
    evaluation.add(
        torch.tensor([0, 2]), torch.tensor([2.0, 9.0]), torch.tensor([4.0, 3.0]), [1, 0], ["b", "x"], [["b"], ["y"]]
    )
    evaluation.add(torch.tensor([0]), torch.tensor([6.0]), torch.tensor([4.0]), [0], ["a"], [["z"]])
    result = evaluation.finish(
        "val", lambda sums: sums, ["t0", "t1", "t2"], ["EM", "EM", "EM"], ["train", "dev", "test"]
    )
    assert [row["task"] for row in result.rows] == ["t0", "t2"]
    t0, t2 = result.rows
    assert (t0["score"], t0["examples"], t0["partition"]) == (0.5, 2, "train")
    assert t0["loss"] == pytest.approx(8.0 / 8.0) and t2["loss"] == pytest.approx(3.0)
    assert result.loss == pytest.approx(17.0 / 11.0)  # token-weighted over every task, not a mean of means
    assert result.score == pytest.approx(0.25)
    assert result.metrics == {
        "val/loss": result.loss,
        "val/score": result.score,
        "val/score/t0": 0.5,
        "val/loss/t0": t0["loss"],
        "val/score/t2": 0.0,
        "val/loss/t2": t2["loss"],
    }


def test_reduce_sum_is_applied_to_the_sums_before_scoring():
    evaluation = TaskEvaluation(num_tasks=1)
    evaluation.add(torch.tensor([0]), torch.tensor([3.0]), torch.tensor([2.0]), [0], ["a"], [["a"]])
    doubled_nll = evaluation.finish(
        "test", lambda sums: sums * torch.tensor([2.0], dtype=sums.dtype), ["t"], ["EM"], ["test"]
    )
    assert doubled_nll.loss == pytest.approx(1.5)  # (2·3)/(2·2): both sums go through the reduction


def test_a_task_without_target_tokens_has_a_nan_loss_and_no_examples_give_nan_average():
    evaluation = TaskEvaluation(num_tasks=1)
    evaluation.add(torch.tensor([0]), torch.tensor([0.0]), torch.tensor([0.0]), [0], ["a"], [["a"]])
    assert math.isnan(evaluation.finish("val", lambda s: s, ["t"], ["EM"], ["train"]).rows[0]["loss"])
    assert math.isnan(
        TaskEvaluation(num_tasks=2).finish("val", lambda s: s, ["a", "b"], ["EM"] * 2, ["train"] * 2).score
    )


def test_gather_predictions_groups_by_task_in_example_order():
    rows = [{"task": "b", "example_id": 2}, {"task": "a", "example_id": 1}, {"task": "b", "example_id": 0}]
    assert gather_predictions(rows) == {
        "b": [{"task": "b", "example_id": 0}, {"task": "b", "example_id": 2}],
        "a": [{"task": "a", "example_id": 1}],
    }
