import json

import pytest

from moe_mtl.data.sources import load_tasks
from moe_mtl.data.sources.crossfit import crossfit_tasks
from moe_mtl.data.tasks import DataError


def write_task(root, name, k=16, seeds=(13, 100), lines=None):
    folder = root / name
    folder.mkdir(parents=True)
    for seed in seeds:
        for split in ("train", "dev", "test"):
            rows = lines or [f"{name} {split} {seed} a\tx", f"{name} {split} {seed} b\ty\tz", "q\tr1 [SEP] r2"]
            (folder / f"{name}_{k}_{seed}_{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "crossfit"
    write_task(root, "glue-sst2")
    write_task(root, "squad-no_context", k=32)
    (root / "tasks.json").write_text(json.dumps({"glue-sst2": "Classification-F1", "squad-no_context": "QA-F1"}))
    return root


def test_layout_references_and_fewshot_seeds(data_dir):
    sst, squad = crossfit_tasks(data_dir)
    assert (sst.name, sst.metric, squad.metric) == ("glue-sst2", "Classification-F1", "QA-F1")
    assert sorted(sst.fewshot) == [13, 100]
    train = sst.fewshot[100]["train"]
    assert train[0].input == "glue-sst2 train 100 a" and train[0].targets == ("x",)
    assert train[1].targets == ("y", "z")
    assert train[2].targets == ("r1", "r2")
    assert train[2].origin == f"{data_dir}/glue-sst2/glue-sst2_16_100_train.tsv:3"
    assert sst.splits["test"][0].input == "glue-sst2 test 13 a"  # the test file of the smallest seed
    assert sst.examples("dev", fewshot_seed=13)[0].input == "glue-sst2 dev 13 a"


def test_task_metrics_file_as_task_info(data_dir, tmp_path):
    metrics = tmp_path / "task_metrics.json"
    metrics.write_text(json.dumps({"glue-sst2": "ACC", "squad-no_context": "EM", "other": "Rouge-L"}))
    assert [t.metric for t in crossfit_tasks(data_dir, metrics)] == ["ACC", "EM"]


def test_partition_selects_tasks(data_dir):
    tasks = load_tasks("crossfit", data_dir=data_dir, partition={"train": ["squad-no_context"], "test": []})
    assert [(t.name, t.partition) for t in tasks] == [("squad-no_context", "train")]


def test_unicode_line_separators_inside_cells_stay_in_their_line(tmp_path):
    lines = ["question one\x85 part two\tanswer A", "who wrote it?\tJane Doe\u2028(editor)\tJ. Doe", "q\ta"]
    folder = write_task(tmp_path, "t", seeds=(13,), lines=lines)
    (folder / "t_16_13_dev.tsv").write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    (task,) = crossfit_tasks(tmp_path)
    for split in ("train", "dev"):
        examples = task.fewshot[13][split]
        assert [(e.input, e.targets) for e in examples] == [
            ("question one\x85 part two", ("answer A",)),
            ("who wrote it?", ("Jane Doe\u2028(editor)", "J. Doe")),
            ("q", ("a",)),
        ]
        assert examples[2].origin.endswith(f"t_16_13_{split}.tsv:3")


def test_line_without_output_column(tmp_path):
    write_task(tmp_path, "t", seeds=(13,), lines=["a\tb", "just an input"])
    with pytest.raises(DataError, match=r"t_16_13_train\.tsv:2: expected input<TAB>output"):
        crossfit_tasks(tmp_path)


def test_unexpected_file_name(tmp_path):
    folder = write_task(tmp_path, "t", seeds=(13,))
    (folder / "t_train.tsv").write_text("a\tb\n")
    with pytest.raises(DataError, match=r"t_train\.tsv: expected a file named t_<k>_<seed>_<train\|dev\|test>\.tsv"):
        crossfit_tasks(tmp_path)


def test_empty_file_and_empty_folder(tmp_path):
    folder = write_task(tmp_path, "t", seeds=(13,))
    (folder / "t_16_13_train.tsv").write_text("")
    with pytest.raises(DataError, match=r"t_16_13_train\.tsv: empty file"):
        crossfit_tasks(tmp_path)
    (tmp_path / "u").mkdir()
    (folder / "t_16_13_train.tsv").write_text("a\tb\n")
    with pytest.raises(DataError, match="u: empty task folder"):
        crossfit_tasks(tmp_path)


def test_seed_without_train_file(tmp_path):
    folder = write_task(tmp_path, "t", seeds=(13,))
    (folder / "t_16_13_train.tsv").unlink()
    with pytest.raises(DataError, match="seed 13 lacks its train file"):
        crossfit_tasks(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match="data directory not found"):
        crossfit_tasks(tmp_path / "nope")
