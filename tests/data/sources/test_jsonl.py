import json
import logging

import pytest

from moe_mtl.data.sources import load_tasks
from moe_mtl.data.sources.jsonl import jsonl_tasks
from moe_mtl.data.tasks import DataError, Example


@pytest.fixture
def data_dir(tmp_path, write_jsonl):
    """Task "qa" in one file with a split per line, task "nli" as a folder of split files."""
    root = tmp_path / "tasks"
    write_jsonl(
        root / "qa.jsonl",
        [
            {"input": "q: 1+1", "target": "2", "split": "train"},
            {"input": "q: capital of France", "target": ["Paris", "paris"], "split": "dev"},
            {"input": "q: pick", "target": "b", "options": ["a", "b"], "split": "test", "id": 7},
        ],
    )
    write_jsonl(root / "nli" / "train.jsonl", [{"input": "p h", "target": "yes"}, "", {"input": "p2", "target": "no"}])
    write_jsonl(root / "nli" / "test.jsonl", [{"input": "p3", "target": "no", "split": "test"}])
    return root


def test_both_layouts(data_dir):
    qa, nli = sorted(jsonl_tasks(data_dir), key=lambda t: t.name, reverse=True)
    assert qa.name == "qa" and nli.name == "nli"
    assert qa.splits["dev"] == [Example("q: capital of France", ("Paris", "paris"), (), f"{data_dir}/qa.jsonl:2")]
    assert qa.splits["test"][0].options == ("a", "b")
    assert [e.input for e in nli.splits["train"]] == ["p h", "p2"]
    assert nli.splits["train"][1].origin == f"{data_dir}/nli/train.jsonl:3"
    assert list(nli.splits) == ["train", "test"]


def test_without_tasks_json_defaults_are_applied_and_logged(data_dir, caplog):
    with caplog.at_level(logging.WARNING):
        tasks = jsonl_tasks(data_dir)
    assert {(t.metric, t.partition) for t in tasks} == {("EM", "train")}
    assert all(t.features == {} for t in tasks)
    assert f"no task information file {data_dir}/tasks.json" in caplog.text


def test_tasks_json_gives_metric_features_partition(data_dir):
    info = {"qa": {"metric": "QA-F1", "features": {"type": "qa"}, "partition": "test"}, "nli": "ACC"}
    (data_dir / "tasks.json").write_text(json.dumps(info))
    tasks = {t.name: t for t in load_tasks("jsonl", data_dir=data_dir)}
    assert (tasks["qa"].metric, tasks["qa"].features, tasks["qa"].partition) == ("QA-F1", {"type": "qa"}, "test")
    assert tasks["nli"].metric == "ACC"
    assert [t.name for t in load_tasks("jsonl", data_dir=data_dir)] == ["nli", "qa"]  # seen tasks first


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"target": "x", "split": "train"}, r"bad\.jsonl:2: 'input' is missing or not a string"),
        ({"input": "x", "split": "train"}, r"bad\.jsonl:2: 'target' is missing or invalid"),
        ({"input": "x", "target": [], "split": "train"}, r"bad\.jsonl:2: 'target' is missing or invalid"),
        ({"input": "x", "target": "y", "split": "val"}, r"bad\.jsonl:2: 'split' is 'val'; allowed: 'train'"),
        ({"input": "x", "target": "y"}, r"bad\.jsonl:2: 'split' is None"),
        ({"input": "x", "target": "y", "options": "a", "split": "dev"}, r"bad\.jsonl:2: 'options' must be a list"),
        ('{"input": "x", "target": "y",', r"bad\.jsonl:2: invalid JSON"),
        ('["x", "y"]', r"bad\.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, write_jsonl, line, message):
    write_jsonl(tmp_path / "bad.jsonl", [{"input": "ok", "target": "ok", "split": "train"}, line])
    with pytest.raises(DataError, match=message):
        jsonl_tasks(tmp_path)


def test_unicode_line_separators_inside_strings_stay_in_their_line(tmp_path):
    text = "first\u2028second\u2029third\x85fourth"
    lines = [
        json.dumps({"input": text, "target": "ok", "split": "train"}, ensure_ascii=False),
        json.dumps({"input": "x", "target": "y", "split": "dev"}),
        '{"input": "x"',
    ]
    (tmp_path / "t.jsonl").write_text("\r\n".join(lines[:2]) + "\r\n", encoding="utf-8")
    (task,) = jsonl_tasks(tmp_path)
    assert task.splits["train"][0].input == text and task.splits["dev"][0].origin == f"{tmp_path}/t.jsonl:2"
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"t\.jsonl:3: invalid JSON"):  # the separators do not shift line numbers
        jsonl_tasks(tmp_path)


def test_folder_split_field_must_agree(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "t" / "dev.jsonl", [{"input": "x", "target": "y", "split": "train"}])
    with pytest.raises(DataError, match=r"dev\.jsonl:1: 'split' is 'train' in dev\.jsonl; expected 'dev'"):
        jsonl_tasks(tmp_path)


def test_non_utf8_bytes(tmp_path):
    (tmp_path / "t.jsonl").write_bytes(b'{"input": "ok", "target": "ok", "split": "train"}\n{"input": "\xff"}\n')
    with pytest.raises(DataError, match=r"t\.jsonl:2: not UTF-8"):
        jsonl_tasks(tmp_path)


def test_missing_directory_and_empty_task(tmp_path):
    with pytest.raises(DataError, match="nowhere: data directory not found"):
        jsonl_tasks(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"no <task>\.jsonl files"):
        jsonl_tasks(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: empty task file"):
        jsonl_tasks(tmp_path)


def test_folder_without_split_files(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.json").write_text("{}")
    with pytest.raises(DataError, match=r"t: task folder without train\.jsonl"):
        jsonl_tasks(tmp_path)


def test_duplicate_task_names(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "a.jsonl", [{"input": "x", "target": "y", "split": "train"}])
    write_jsonl(tmp_path / "a" / "train.jsonl", [{"input": "x", "target": "y"}])
    with pytest.raises(DataError, match=r"duplicate task name 'a': .*a and .*a\.jsonl"):
        load_tasks("jsonl", data_dir=tmp_path)


def test_unknown_metric_in_tasks_json(data_dir):
    (data_dir / "tasks.json").write_text('{\n  "qa": "EM",\n  "nli": {"metric": "accuracy"}\n}\n')
    with pytest.raises(DataError, match=r"tasks\.json:3: the metric of task 'nli' is 'accuracy'"):
        jsonl_tasks(data_dir)


def test_partition_naming_an_unknown_task(data_dir):
    with pytest.raises(DataError, match="partition 'test' names task 'squad', which source 'jsonl' does not have"):
        load_tasks("jsonl", data_dir=data_dir, partition={"train": ["qa"], "test": ["squad"]})


def test_source_needs_data_dir():
    with pytest.raises(DataError, match="source 'jsonl' needs `data_dir`"):
        load_tasks("jsonl")
    with pytest.raises(DataError, match="`source` is 'csv'"):
        load_tasks("csv")
