import json
import logging
import re

import pytest

from moe_mtl.data.sources import load_tasks
from moe_mtl.data.sources.crossfit import CrossFitOptions, crossfit_tasks
from moe_mtl.data.tasks import DataError

NO_PREFIX = {"task_prefix": False}


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
    sst, squad = crossfit_tasks(data_dir, options=NO_PREFIX)
    assert (sst.name, sst.metric, squad.metric) == ("glue-sst2", "Classification-F1", "QA-F1")
    assert list(sst.fewshot) == [100, 13]  # file-name order, as CrossFit's loaders read the seeds
    train = sst.fewshot[100]["train"]
    assert train[0].input == "glue-sst2 train 100 a" and train[0].targets == ("x",)
    assert train[1].targets == ("y", "z")
    assert train[2].targets == ("r1 [SEP] r2",)
    assert train[2].origin == f"{data_dir}/glue-sst2/glue-sst2_16_100_train.tsv:3"
    assert sst.splits["test"][0].input == "glue-sst2 test 13 a"  # the test file of the smallest seed
    assert sst.examples("dev", fewshot_seed=13)[0].input == "glue-sst2 dev 13 a"


MULTIRC = [
    "question: Who came? (A) Ann (B) Bo (C) Cy context: Ann and Cy came.\tAnn [SEP] Cy",
    "question: Who left? (A) Ann (B) Bo context: Nobody left.\tNO ANSWER!",
    "question: Who sang? (A) Bo context: Bo sang. \tBo\tBo [SEP] Bo",
]


def test_sep_inside_an_answer_belongs_to_it_and_tabs_separate_answers(tmp_path):
    write_task(tmp_path, "superglue-multirc", k=32, seeds=(13,), lines=MULTIRC)
    (task,) = crossfit_tasks(tmp_path, options=NO_PREFIX)
    for examples in (task.fewshot[13]["train"], task.fewshot[13]["dev"], task.splits["test"]):
        assert [(e.input, e.targets) for e in examples] == [
            ("question: Who came? (A) Ann (B) Bo (C) Cy context: Ann and Cy came.", ("Ann [SEP] Cy",)),
            ("question: Who left? (A) Ann (B) Bo context: Nobody left.", ("NO ANSWER!",)),
            ("question: Who sang? (A) Bo context: Bo sang. ", ("Bo", "Bo [SEP] Bo")),
        ]


def test_lines_are_stripped_at_both_ends_then_split_at_tabs_as_crossfit_does(tmp_path):
    # CrossFit: d = line.strip().split("\t"); input d[0], outputs d[1:]; white space inside stays
    lines = ["  in put \t a \t b\t ", "\t q\tr\t\t", "\x85q\u2028\tr\u2028", "q\t\tr"]
    write_task(tmp_path, "t", seeds=(13,), lines=lines)
    (task,) = crossfit_tasks(tmp_path, options=NO_PREFIX)
    parsed = [(e.input, e.targets) for e in task.fewshot[13]["train"]]
    assert parsed == [
        ("in put ", (" a ", " b")),
        ("q", ("r",)),
        ("q\u2028", ("r",)),
        ("q", ("", "r")),  # an empty answer: the encoder rejects it, naming the line
    ]
    assert parsed == [(d[0], tuple(d[1:])) for d in (line.strip().split("\t") for line in lines)]


def test_task_prefix_starts_every_input_of_every_split_and_seed(data_dir):
    sst, squad = crossfit_tasks(data_dir)
    assert CrossFitOptions().task_prefix is True
    for task in (sst, squad):
        examples = [*task.splits["test"]] + [e for seed in task.fewshot.values() for s in seed.values() for e in s]
        assert len(examples) == 15 and all(e.input.startswith(f" [{task.name}] ") for e in examples)
    assert sst.fewshot[100]["train"][0].input == " [glue-sst2] glue-sst2 train 100 a"  # CrossFit's " [{}] {}"
    assert sst.fewshot[100]["train"][0].targets == ("x",)  # outputs stay as they are
    (plain,) = load_tasks("crossfit", data_dir=data_dir, partition={"train": ["glue-sst2"]}, crossfit=NO_PREFIX)
    assert plain.fewshot[100]["train"][0].input == "glue-sst2 train 100 a"


def test_invalid_options():
    with pytest.raises(DataError, match=r"unknown `crossfit` options \['prefix'\]; allowed: task_prefix"):
        CrossFitOptions.from_dict({"prefix": True})
    with pytest.raises(DataError, match="`crossfit` option `task_prefix` is 'yes'; it must be true or false"):
        CrossFitOptions(task_prefix="yes")


def test_blank_lines_are_skipped_and_named(tmp_path, caplog):
    write_task(tmp_path, "t", seeds=(13,), lines=["a\tb", "", "  ", "c\td", ""])
    with caplog.at_level(logging.WARNING):
        (task,) = crossfit_tasks(tmp_path, options=NO_PREFIX)
    assert [e.origin.rsplit(":", 1)[1] for e in task.fewshot[13]["train"]] == ["1", "4"]
    path = tmp_path / "t" / "t_16_13_train.tsv"
    assert f"{path}: skipped 3 blank line(s) (line numbers 2, 3, 5)" in caplog.messages
    path.write_text("a\tb\n" + "\n" * 12)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        crossfit_tasks(tmp_path)
    assert f"{path}: skipped 12 blank line(s) (line numbers 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, … (12 in all))" in (
        caplog.messages
    )


def test_task_metrics_file_as_task_info(data_dir, tmp_path):
    metrics = tmp_path / "task_metrics.json"
    metrics.write_text(json.dumps({"glue-sst2": "ACC", "squad-no_context": "EM", "other": "Rouge-L"}))
    assert [t.metric for t in crossfit_tasks(data_dir, metrics)] == ["ACC", "EM"]


def test_partition_selects_tasks(data_dir):
    tasks = load_tasks("crossfit", data_dir=data_dir, partition={"train": ["squad-no_context"], "test": []})
    assert [(t.name, t.partition) for t in tasks] == [("squad-no_context", "train")]


def test_unicode_line_separators_inside_cells_stay_in_their_line(tmp_path):
    lines = ["question one\x85 part two\tanswer A", "who wrote it?\tJane Doe\u2028(editor)\tJ. Doe", "q\ra\tb"]
    folder = write_task(tmp_path, "t", seeds=(13,), lines=lines)
    (folder / "t_16_13_dev.tsv").write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    (task,) = crossfit_tasks(tmp_path, options=NO_PREFIX)
    for split in ("train", "dev"):
        examples = task.fewshot[13][split]
        assert [(e.input, e.targets) for e in examples] == [
            ("question one\x85 part two", ("answer A",)),
            ("who wrote it?", ("Jane Doe\u2028(editor)", "J. Doe")),
            ("q\ra", ("b",)),  # a lone carriage return stays too (Python's universal newlines would end the line)
        ]
        assert examples[2].origin.endswith(f"t_16_13_{split}.tsv:3")


@pytest.mark.parametrize("line", ["just an input", "an input\t", "\tan output", "an input\t \t"])
def test_line_without_output_column(tmp_path, line):
    write_task(tmp_path, "t", seeds=(13,), lines=["a\tb", line])
    message = f"t_16_13_train.tsv:2: no output in {line!r}; expected input<TAB>output[<TAB>more outputs]"
    with pytest.raises(DataError, match=re.escape(message)):
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
