import json
import logging
import math
import re

import numpy as np
import pytest

from moe_mtl.data.tasks import (
    METRICS,
    DataError,
    Example,
    Partition,
    Task,
    check_unique_names,
    feature_table,
    numbered_lines,
    order_by_partition,
    read_task_info,
    read_utf8,
    task_info_for,
)


def task(name, partition="train", **kwargs):
    return Task(name, {"train": [Example("x", ("y",))]}, partition=partition, **kwargs)


def test_metric_names_are_crossfits_and_strict_em():
    assert METRICS == (
        "EM",
        "ACC",
        "Classification-F1",
        "QA-F1",
        "Rouge-L",
        "Matthew-Correlation",
        "Pearson-Correlation",
        "Strict-EM",
    )


def test_unknown_metric_names_task_and_allowed_metrics():
    with pytest.raises(DataError, match=r"f\.jsonl: the metric of task 'a' is 'BLEU'; allowed: 'EM', 'ACC'"):
        task("a", metric="BLEU", origin="f.jsonl")


def test_empty_task_is_an_error():
    with pytest.raises(DataError, match="task 'a' has no examples"):
        Task("a", {"train": []}, origin="a.jsonl")


def test_examples_prefers_the_fewshot_split_of_the_seed():
    full, shot = [Example("full", ("1",))], [Example("shot", ("2",))]
    t = Task("a", {"train": full, "test": full}, fewshot={13: {"train": shot, "dev": shot}})
    assert t.examples("train") == full
    assert t.examples("train", fewshot_seed=13) == shot
    assert t.examples("test", fewshot_seed=13) == full


def test_all_seeds_concatenates_the_fewshot_splits_in_seed_order_keeping_repeats():
    a, b, c = (Example(text, ("1",)) for text in "abc")
    t = Task("t", {"test": [c]}, fewshot={100: {"train": [a, b], "dev": [c]}, 13: {"train": [b], "dev": [a]}})
    assert t.examples("train", fewshot_seed="all") == [a, b, b]
    assert t.examples("dev", fewshot_seed="all") == [c, a]
    assert t.examples("test", fewshot_seed="all") == [c]
    seen = Task("s", {"train": [a], "dev": [b]})  # no k-shot splits: its own
    assert seen.examples("train", fewshot_seed="all") == [a]


def test_missing_split_error_points_to_fewshot_seed():
    t = Task("a", {"test": [Example("x", ("y",))]}, fewshot={13: {"train": [Example("x", ("y",))]}})
    message = (
        "no 'train' examples; it has k-shot train splits for seeds [13]: set `fewshot_seed` (one of them, or 'all')"
    )
    with pytest.raises(DataError, match=re.escape(message)):
        t.examples("train")


def write(tmp_path, name, value):
    path = tmp_path / name
    path.write_text(json.dumps(value, indent=1))
    return path


def test_partition_file_orders_and_assigns_partitions(tmp_path):
    path = write(tmp_path, "p.json", {"train": ["b", "a"], "test": ["c"], "all": ["a", "b", "c"]})
    tasks = Partition.load(path).apply([task("a"), task("b"), task("c"), task("d")], "jsonl")
    assert [(t.name, t.partition) for t in tasks] == [("b", "train"), ("a", "train"), ("c", "test")]


def test_partition_naming_unknown_task_names_file_and_line(tmp_path):
    path = write(tmp_path, "p.json", {"train": ["a"], "dev": ["zzz"]})
    with pytest.raises(DataError, match=r"p\.json:6: partition 'dev' names task 'zzz', which source 'jsonl'"):
        Partition.load(path).apply([task("a")], "jsonl")


def test_partition_with_a_task_twice_or_unknown_keys(tmp_path):
    with pytest.raises(DataError, match="task 'a' is in both 'train' and 'test'"):
        Partition.load({"train": ["a"], "test": ["a"]})
    with pytest.raises(DataError, match=r"unknown partition keys \['seen'\]"):
        Partition.load({"seen": ["a"]})


def test_partition_file_with_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{\n"train": ["a",]\n}')
    with pytest.raises(DataError, match=r"p\.json:2: invalid JSON"):
        Partition.load(path)


def test_missing_partition_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: file not found"):
        Partition.load(tmp_path / "nope.json")


def test_duplicate_task_names_name_both_origins():
    with pytest.raises(DataError, match=r"duplicate task name 'a': one/a\.jsonl and two/a"):
        check_unique_names([task("a", origin="one/a.jsonl"), task("a", origin="two/a")])


def test_order_by_partition_is_stable():
    tasks = [task("t1", "test"), task("s1"), task("d1", "dev"), task("s2")]
    assert [t.name for t in order_by_partition(tasks)] == ["s1", "s2", "d1", "t1"]


def test_task_info_accepts_crossfit_metric_maps_and_objects(tmp_path):
    path = write(
        tmp_path,
        "tasks.json",
        {"a": "Rouge-L", "b": {"metric": "ACC", "features": {"kind": "qa"}, "partition": "test"}},
    )
    info = read_task_info(path)
    assert info["a"].metric == "Rouge-L" and info["a"].partition == "train"
    assert (info["b"].metric, info["b"].features, info["b"].partition) == ("ACC", {"kind": "qa"}, "test")


def test_task_info_unknown_metric_names_file_and_line(tmp_path):
    path = write(tmp_path, "tasks.json", {"a": "EM", "b": {"metric": "F2"}})
    with pytest.raises(DataError, match=r"tasks\.json:3: the metric of task 'b' is 'F2'; allowed: 'EM'"):
        read_task_info(path)


def test_task_info_unknown_keys(tmp_path):
    path = write(tmp_path, "tasks.json", {"a": {"metrics": "EM"}})
    with pytest.raises(DataError, match=r"unknown keys \['metrics'\]"):
        read_task_info(path)


def test_task_info_defaults_are_logged(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        info = task_info_for(tmp_path, ["a"], None)
    assert info["a"].metric == "EM"
    assert "no task information file" in caplog.text and "metric EM" in caplog.text
    write(tmp_path, "tasks.json", {"a": "ACC"})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        info = task_info_for(tmp_path, ["a", "b"], None)
    assert (info["a"].metric, info["b"].metric) == ("ACC", "EM")
    assert "no entry for 1 task(s) ['b']" in caplog.text


def test_non_utf8_names_file_line_and_byte(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"a": 1}\n{"input": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"t\.jsonl:2: not UTF-8 \(byte 0xe9"):
        read_utf8(path)


def test_lines_end_at_newline_only():
    text = "a\u2028b\tc\x85d\u2029e\x1cf\r\nsecond\n\nfourth"
    assert list(numbered_lines(text)) == [(1, "a\u2028b\tc\x85d\u2029e\x1cf"), (2, "second"), (3, ""), (4, "fourth")]


def test_feature_table_expands_strings_and_lists():
    tasks = [
        task("a", features={"skills": ["sort", "sum"], "output": "number", "depth": 2}),
        task("b", features={"skills": ["sort"], "output": "label"}),
    ]
    columns, table = feature_table(tasks)
    assert columns == ["depth", "output=label", "output=number", "skills=sort", "skills=sum"]
    np.testing.assert_array_equal(table[0], [2, 0, 1, 1, 1])
    assert math.isnan(table[1, 0])
    np.testing.assert_array_equal(table[1, 1:], [1, 0, 1, 0])


def test_feature_table_rejects_nested_values():
    with pytest.raises(DataError, match="feature 'x' of task 'a'"):
        feature_table([task("a", features={"x": {"y": 1}})])


def test_task_info_entries_of_no_task_are_named_not_dropped(tmp_path, caplog):
    write(tmp_path, "tasks.json", {"qa": "ACC", "q_a": "QA-F1"})  # a typo of a task name: its entry would go unread
    with caplog.at_level(logging.WARNING):
        info = task_info_for(tmp_path, ["qa"], None)
    assert info["qa"].metric == "ACC"
    assert "entries for 1 name(s) that are no task in" in caplog.text and "ignored: ['q_a']" in caplog.text
