"""scripts/robust_mtl_studies.py: each of the second paper's three studies end to end on the tiny preset, its resume,
and the pure pieces of its report."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml


@pytest.fixture(scope="module")
def studies(load_script):
    return load_script("robust_mtl_studies")


def hparams(folder: Path) -> dict:
    return torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def table_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as file:
        return {row[next(iter(row))]: row for row in csv.DictReader(file)}


def check_outputs(out: Path, docs: Path, study: str, methods, extra=()) -> dict:
    record = json.loads((out / "tables" / f"{study}.json").read_text())
    assert record["study"] == study and record["minutes"] > 0 and record["cpu_minutes"] > 0
    assert record["command"].startswith(f"python scripts/robust_mtl_studies.py {study}")
    for name in (study, *extra):
        markdown = (docs / study / f"{name}.md").read_text()
        assert (docs / study / f"{name}.csv").is_file()
        if name == study:
            assert all(f"| {method} |" in markdown for method in methods), markdown
    assert (docs / study / f"{study}.png").stat().st_size > 0
    return record


@pytest.mark.slow
def test_the_transfer_study_trains_low_resource_targets_with_related_and_unrelated_tasks(studies, tmp_path):
    out, docs = tmp_path / "runs", tmp_path / "docs"
    args = ["transfer", "--preset", "tiny", "--out", str(out), "--docs", str(docs), "--seeds", "0", "1"]
    studies.main([*args, "--methods", "dense", "learned", "--jobs", "2"])
    check_outputs(out, docs, "transfer", ["dense", "learned", "single-task (dense, each target alone)"])
    rows = table_rows(docs / "transfer" / "transfer.csv")
    assert rows["learned"]["runs"] == "2"
    related = out / "transfer" / "related" / "learned" / "seed0"
    checkpoint = hparams(related)
    data = checkpoint["datamodule_hyper_parameters"]
    assert data["partition"]["train"] == [*studies.TARGETS, *studies.RELATED]
    assert data["skills"]["train_sizes"] == dict.fromkeys(studies.TARGETS, studies.PRESETS["tiny"]["low_resource"])
    control = hparams(out / "transfer" / "unrelated" / "learned" / "seed0")["datamodule_hyper_parameters"]
    assert control["partition"]["train"] == [*studies.TARGETS, *studies.UNRELATED_CONTROL]
    assert control["tokenizer"] == data["tokenizer"]  # one tokenizer: no difference of tokenisation
    scores = studies.dev_scores(related)
    assert set(studies.TARGETS) <= set(scores)
    single = out / "transfer" / "single" / studies.TARGETS[0] / "seed1"
    assert list(studies.dev_scores(single)) == [studies.TARGETS[0]]

    stamp = (related / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    studies.main([*args, "--methods", "dense", "learned"])  # finished: nothing is trained again
    assert (related / "checkpoints" / "last.ckpt").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_the_unseen_study_gives_zero_and_k_shot_scores_and_three_representations(studies, tmp_path):
    out, docs = tmp_path / "runs", tmp_path / "docs"
    args = ["unseen", "--preset", "tiny", "--out", str(out), "--docs", str(docs), "--seeds", "0"]
    studies.main([*args, "--methods", "learned", "token"])  # the two that route unseen tasks by `nearest`
    check_outputs(out, docs, "unseen", ["learned", "token"], extra=["representations"])
    rows = table_rows(docs / "unseen" / "unseen.csv")
    assert {"zero-shot mean", "k = 2 mean", "k = 4 mean"} <= set(rows["token"])
    assert set(table_rows(docs / "unseen" / "representations.csv")) == set(studies.REPRESENTATIONS)
    learned = out / "unseen" / "learned" / "seed0"
    for k in studies.PRESETS["tiny"]["ks"]:
        cells = list(csv.DictReader((learned / f"k{k}" / "fewshot.csv").open()))
        assert [row["task"] for row in cells] == list(studies.PRESETS["tiny"]["fewshot_tasks"])
    minilm = learned / "representation-minilm" / "k0"
    assert (out / "models" / "all-MiniLM-L6-v2" / "config.json").is_file() and list(minilm.glob("evaluation/*.json"))
    config = yaml.safe_load((minilm / "config.yaml").read_text())
    assert config["model"]["transfer"]["representation"].endswith("all-MiniLM-L6-v2")
    assert config["model"]["transfer"]["unseen_routes"] == "nearest"


@pytest.mark.slow
def test_the_robustness_study_trains_jointly_and_after_and_counts_experts_taken_over(studies, tmp_path):
    out, docs = tmp_path / "runs", tmp_path / "docs"
    studies.main(["robustness", "--preset", "tiny", "--out", str(out), "--docs", str(docs), "--seeds", "0"])
    check_outputs(out, docs, "robustness", studies.METHODS)
    rows = table_rows(docs / "robustness" / "robustness.csv")
    assert rows["dense"]["base experts taken over mean"] == "nan"  # one expert: nothing to take over
    assert 0 <= float(rows["learned"]["base experts taken over mean"]) <= 1
    joint = hparams(out / "robustness" / "joint" / "random" / "seed0")
    assert joint["global_step"] == studies.base_task_steps(studies.PRESETS["tiny"]["steps"])
    assert joint["hyper_parameters"]["task_names"] == [*studies.BASE_TASKS, *studies_unrelated()]
    sequential = out / "robustness" / "sequential" / "learned" / "seed0"
    after = hparams(sequential)
    data = after["datamodule_hyper_parameters"]
    assert data["partition"]["train"] == studies_unrelated() and data["partition"]["dev"] == list(studies.BASE_TASKS)
    assert after["hyper_parameters"]["transfer"]["init_from"] == str(out / "base" / "learned" / "seed0")
    scores = studies.dev_scores(sequential)  # the base tasks validated after training on the new family
    assert set(data["partition"]["dev"]) | set(studies_unrelated()) == set(scores)


def studies_unrelated() -> list[str]:
    from moe_mtl.data.sources.skills import UNRELATED

    return [spec.name for spec in UNRELATED]


def test_experts_taken_over_counts_base_experts_the_new_family_routes_to(studies):
    before = {"a": [0, 1], "b": [2, 1], "new": [0, 0]}
    after = {"a": [0, 1], "b": [2, 1], "new": [2, 1]}  # the new task moved onto b's experts in both layers
    assert studies.experts_taken_over(before, after, ["a", "b"], ["new"]) == (2, 3)
    assert studies.experts_taken_over(before, {"new": [1, 0]}, ["a", "b"], ["new"]) == (0, 3)
    assert studies.experts_taken_over({}, after, ["a"], ["new"]) == (0, 0)


def test_the_joint_run_gives_base_tasks_as_many_steps(studies):
    assert studies.base_task_steps(12) == 18 and studies.base_task_steps(1500) == 2250  # 12 base tasks, 6 new


def test_dev_scores_read_the_last_validation(studies, tmp_path):
    folder = tmp_path / "evaluation"
    folder.mkdir()
    for step, score in ((4, 0.5), (12, 0.75), (8, 0.25)):
        rows = [{"task": "t", "partition": "train", "score": score}]
        (folder / f"val-epoch0-step{step}.json").write_text(json.dumps({"step": step, "tasks": rows}))
    assert studies.dev_scores(tmp_path) == {"t": 0.75}
    with pytest.raises(FileNotFoundError, match="no validation"):
        studies.dev_scores(tmp_path / "none")
