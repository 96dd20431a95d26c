"""TaskEvaluation and gather_predictions under real DDP (2 gloo processes): the same as one process."""

import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_mtl.evaluation.task_evaluation import TaskEvaluation, gather_predictions

pytestmark = pytest.mark.distributed

TASKS, METRICS, PARTITIONS = ["qa", "cls", "gen"], ["QA-F1", "ACC", "Rouge-L"], ["train", "dev", "test"]
# (task id, example id, prediction, references, nll, tokens): text that JSON, UTF-8 and padding must keep exact
EXAMPLES = [
    (0, 3, "the Eiffel Tower", ["Eiffel Tower", "la tour Eiffel"], 4.0, 3.0),
    (1, 0, "positive", ["Positive"], 1.5, 1.0),
    (2, 1, "Ça va\nbien, 日本語 ✓", ["ça va bien", "\tça  va"], 9.0, 6.0),
    (0, 1, "", ["nothing", ""], 2.0, 2.0),
    (1, 2, "negative [SEP] neutral", ["negative [SEP] neutral"], 0.5, 1.0),
    (0, 0, 'a "quoted" \\ answer', ['a "quoted" \\ answer'], 3.0, 4.0),
    (2, 0, "\u2028line\u2029sep\r\n", ["line sep"], 7.0, 5.0),
    (1, 1, "négatif", ["negative", "négatif"], 1.0, 1.0),
]


def _evaluate(batches: list[list[tuple]], reduce_sum) -> tuple:
    evaluation = TaskEvaluation(num_tasks=len(TASKS))
    rows = []
    for batch in batches:
        tasks, examples, predictions, references, nll, tokens = zip(*batch, strict=True)
        evaluation.add(torch.tensor(tasks), torch.tensor(nll), torch.tensor(tokens), examples, predictions, references)
        rows += [
            {"task": TASKS[t], "example_id": e, "prediction": p, "references": r}
            for t, e, p, r in zip(tasks, examples, predictions, references, strict=True)
        ]
    result = evaluation.finish("test", reduce_sum, TASKS, METRICS, PARTITIONS)
    return result, gather_predictions(rows)


def _all_reduce_sum(sums: torch.Tensor) -> torch.Tensor:
    sums = sums.clone()
    dist.all_reduce(sums)
    return sums


# rank 0 and rank 1's batches: both ranks hold examples of every task; then rank 1 has no batch at all
SPLITS = [
    [[EXAMPLES[0:2], EXAMPLES[4:5]], [EXAMPLES[2:4], EXAMPLES[5:8]]],
    [[EXAMPLES[0:3], EXAMPLES[3:8]], []],
]


def _rank(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    results = [_evaluate(batches_by_rank[rank], _all_reduce_sum) for batches_by_rank in SPLITS]
    with open(f"{out_dir}/rank{rank}.pkl", "wb") as file:
        pickle.dump(results, file)
    dist.destroy_process_group()


def test_ddp_gathers_the_outputs_and_scores_of_one_process(tmp_path):
    # forked, not spawned: the ranks inherit the imported torch and torchmetrics (seconds per test)
    mp.start_processes(_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork")
    expected_result, expected_predictions = _evaluate([EXAMPLES], lambda sums: sums)
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.pkl", "rb") as file:
            results = pickle.load(file)
        for split, (result, predictions) in enumerate(results):
            assert result.rows == expected_result.rows, (rank, split)
            assert result.metrics == pytest.approx(expected_result.metrics), (rank, split)
            assert (result.loss, result.score) == pytest.approx((expected_result.loss, expected_result.score))
            assert predictions == expected_predictions, (rank, split)
    assert [row["examples"] for row in expected_result.rows] == [3, 3, 2]
    assert [r["example_id"] for r in expected_predictions["qa"]] == [0, 1, 3]
    assert expected_predictions["gen"][1]["prediction"] == "Ça va\nbien, 日本語 ✓"
