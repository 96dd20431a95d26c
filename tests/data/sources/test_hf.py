import json

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value

from moe_mtl.data.sources import load_tasks
from moe_mtl.data.sources.hf import HFTaskSpec, hf_tasks
from moe_mtl.data.tasks import DataError


@pytest.fixture
def saved_dataset(tmp_path):
    """A `save_to_disk` DatasetDict with a class-label target."""
    features = Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    rows = {"sentence": ["good", "bad", "fine"], "label": [1, 0, 1]}
    path = tmp_path / "sst"
    DatasetDict(
        {"train": Dataset.from_dict(rows, features=features), "validation": Dataset.from_dict(rows, features=features)}
    ).save_to_disk(str(path))
    return path


@pytest.fixture
def json_files(tmp_path):
    """JSON-lines files read by `load_dataset("json")`, with a nested list of answers."""
    rows = [
        {"question": "who", "context": "Ann ran", "answers": {"text": ["Ann", "ann"]}},
        {"question": "what", "context": "ran", "answers": {"text": ["ran"]}},
    ]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return {split: str(tmp_path / f"{split}.jsonl") for split in ("train", "test")}


def test_saved_dataset_with_class_labels(saved_dataset):
    (task,) = hf_tasks([{"name": "sst2", "path": str(saved_dataset), "input": "sentence", "target": "label"}])
    assert sorted(task.splits) == ["dev", "train"]
    assert [(e.input, e.targets) for e in task.splits["train"]] == [
        ("good", ("positive",)),
        ("bad", ("negative",)),
        ("fine", ("positive",)),
    ]


def saved(tmp_path, features, **splits):
    """A `save_to_disk` folder of the given splits (name → columns); returns its path."""
    path = tmp_path / "saved"
    DatasetDict({name: Dataset.from_dict(rows, features=features) for name, rows in splits.items()}).save_to_disk(path)
    return str(path)


def test_unlabeled_class_label_names_the_row(tmp_path):
    """GLUE's test splits mark every row unlabeled with -1, which used to become the last class name."""
    features = Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    spec = {
        "name": "sst2",
        "path": saved(
            tmp_path, features, train={"sentence": ["good"], "label": [1]}, test={"sentence": ["meh"], "label": [-1]}
        ),
        "input": "sentence",
        "target": "label",
    }
    message = r"saved\[test\] row 0: class label -1 of column 'label' is not one of 0\.\.1 \(negative, positive\)"
    with pytest.raises(DataError, match=message + ".*leave such a split out with the task's `splits`"):
        hf_tasks([spec])
    (task,) = hf_tasks([{**spec, "splits": {"train": "train"}}])
    assert task.splits["train"][0].targets == ("positive",)


@pytest.mark.parametrize("template", ["sentence", "s: {sentence}"])
def test_null_input_names_the_row(tmp_path, template):
    features = Features({"sentence": Value("string"), "label": Value("string")})
    path = saved(tmp_path, features, train={"sentence": ["good", None], "label": ["a", "b"]})
    with pytest.raises(DataError, match=r"saved\[train\] row 1: column 'sentence' is null"):
        hf_tasks([{"name": "t", "path": path, "input": template, "target": "label"}])


def test_lists_of_class_labels_become_label_names(tmp_path):
    topics = ClassLabel(names=["sports", "politics", "tech"])
    features = Features({"text": Value("string"), "labels": List(topics), "answer": {"label": topics}})
    rows = {"text": ["x"], "labels": [[0, 2]], "answer": [{"label": 1}]}
    spec = {"name": "t", "path": saved(tmp_path, features, train=rows), "input": "text"}
    (task,) = hf_tasks([{**spec, "target": "labels"}])
    assert task.splits["train"][0].targets == ("sports", "tech")
    (task,) = hf_tasks([{**spec, "target": "answer.label"}])
    assert task.splits["train"][0].targets == ("politics",)


def test_load_dataset_json_with_template_and_nested_references(json_files):
    spec = HFTaskSpec(
        name="squad",
        path="json",
        data_files=json_files,
        splits={"train": "train", "test": "test"},
        input="question: {question} context: {context}",
        target="answers.text",
        metric="QA-F1",
        partition="test",
    )
    (task,) = load_tasks("hf", hf=[spec])
    assert (task.metric, task.partition) == ("QA-F1", "test")
    first = task.splits["test"][0]
    assert first.input == "question: who context: Ann ran" and first.targets == ("Ann", "ann")


def test_missing_column_names_row_and_columns(saved_dataset):
    with pytest.raises(DataError, match=r"\[train\] row 0: no column 'text'; columns: sentence, label"):
        hf_tasks([{"name": "sst2", "path": str(saved_dataset), "input": "text", "target": "label"}])
    with pytest.raises(DataError, match="the input template names column 'premise'"):
        hf_tasks([{"name": "sst2", "path": str(saved_dataset), "input": "{premise}", "target": "label"}])


def test_absent_split_and_bad_spec(saved_dataset):
    spec = {"name": "sst2", "path": str(saved_dataset), "input": "sentence", "target": "label"}
    with pytest.raises(DataError, match=r"has no split \['test'\]; it has \['train', 'validation'\]"):
        hf_tasks([{**spec, "splits": {"test": "test"}}])
    with pytest.raises(DataError, match=r"unknown keys \['column'\], missing keys \['path'\]"):
        hf_tasks([{"name": "x", "column": "y"}])
    with pytest.raises(DataError, match="needs the `hf` option"):
        load_tasks("hf")


def test_duplicate_names(saved_dataset):
    spec = {"name": "sst2", "path": str(saved_dataset), "input": "sentence", "target": "label"}
    with pytest.raises(DataError, match="duplicate task name 'sst2'"):
        load_tasks("hf", hf=[spec, spec])
