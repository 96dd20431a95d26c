import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_mtl.data.encoding import EncodedSplit, SplitPart, collate, encode_split, truncation_counts
from moe_mtl.data.tasks import DataError, Example
from moe_mtl.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["sort: 3 8 1 4", "a b c d e f g h", "yes no"] * 30, vocab_size=300)


def parts():
    return [
        SplitPart(3, "short", [Example("sort: 3 8", ("3 8",)), Example("sort: 1", ("1", "one"), ("1", "2"))]),
        SplitPart(5, "long", [Example("a b c d e f g h", ("a b c d e f g h",)), Example("yes", ("no",))]),
    ]


def test_encode_rows_follow_parts(tokenizer, tmp_path):
    encoded, cached = encode_split("train", parts(), tokenizer, 6, 4, tmp_path)
    assert not cached
    split = EncodedSplit(encoded, [f"task{i}" for i in range(6)])
    assert split.task_ranges == [(3, 0, 2), (5, 2, 4)] and split.task_sizes == [2, 2]
    row = split[1]
    assert (row["task_id"], row["task_name"], row["example_id"]) == (3, "task3", 1)
    assert row["references"] == ["1", "one"] and row["options"] == ["1", "2"]
    assert row["input_ids"].tolist() == tokenizer("sort: 1")["input_ids"]
    assert row["labels"].tolist() == tokenizer("1")["input_ids"]


def test_long_examples_are_cut_keeping_special_tokens_and_counted(tokenizer, tmp_path):
    encoded, _ = encode_split("train", parts(), tokenizer, 6, 4, tmp_path)
    split = EncodedSplit(encoded, [f"task{i}" for i in range(6)])
    long_input = split[2]["input_ids"].tolist()
    assert len(long_input) == 6 and long_input[0] == 0 and long_input[-1] == 2
    assert len(split[2]["labels"]) == 4 and split[2]["labels"][-1] == 2
    assert split[2]["references"] == ["a b c d e f g h"]  # metrics see the full reference
    assert truncation_counts(encoded) == {3: (0, 0, 2), 5: (1, 1, 2)}


def test_second_encoding_is_read_from_the_cache(tokenizer, tmp_path):
    first, _ = encode_split("train", parts(), tokenizer, 6, 4, tmp_path)
    files = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    second, cached = encode_split("train", parts(), tokenizer, 6, 4, tmp_path)
    assert cached
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == files
    assert second["input_ids"] == first["input_ids"]
    _, cached = encode_split("train", parts(), tokenizer, 7, 4, tmp_path)
    assert not cached  # another maximum length is another fingerprint


@pytest.mark.parametrize(
    ("targets", "message"),
    [(("",), "target 1 of 1 is ''"), (("  ",), "target 1 of 1 is '  '"), (("ok", " \n"), r"target 2 of 2 is ' \\n'")],
)
def test_empty_target_names_its_origin(tokenizer, tmp_path, targets, message):
    bad = [SplitPart(0, "t", [Example("x", ("ok",)), Example("y", targets, origin="data/t.jsonl:2")])]
    with pytest.raises(DataError, match=rf"data/t\.jsonl:2: {message}; every target \(reference\) must hold text"):
        encode_split("test", bad, tokenizer, 8, 8, tmp_path)
    blank = [SplitPart(0, "t", [Example("y", targets)])]
    with pytest.raises(DataError, match=f"task 't' dev example 0: {message}"):
        encode_split("dev", blank, tokenizer, 8, 8, tmp_path)


@pytest.mark.parametrize(("max_input_length", "max_target_length", "option"), [(2, 8, "input"), (8, 1, "target")])
def test_maximum_lengths_leave_room_for_text(tokenizer, tmp_path, max_input_length, max_target_length, option):
    message = rf"option `max_{option}_length` is \d; it must be at least 3 \(the tokenizer's 2 special tokens"
    with pytest.raises(DataError, match=message):
        encode_split("train", parts(), tokenizer, max_input_length, max_target_length, tmp_path)


def test_the_shortest_maximum_lengths_keep_one_token_of_text(tokenizer, tmp_path):
    encoded, _ = encode_split("train", parts(), tokenizer, 3, 3, tmp_path)
    split = EncodedSplit(encoded, [f"task{i}" for i in range(6)])
    for row in range(len(split)):
        for column in ("input_ids", "labels"):
            ids = split[row][column].tolist()
            assert len(ids) == 3 and (ids[0], ids[-1]) == (0, 2) and ids[1] not in (0, 1, 2)
    assert truncation_counts(encoded) == {3: (2, 1, 2), 5: (1, 1, 2)}


def test_collate_pads_dynamically(tokenizer, tmp_path):
    encoded, _ = encode_split("train", parts(), tokenizer, 16, 16, tmp_path)
    split = EncodedSplit(encoded, [f"task{i}" for i in range(6)])
    batch = collate(split.__getitems__([0, 1]), pad_token_id=1)
    lengths = [len(tokenizer("sort: 3 8")["input_ids"]), len(tokenizer("sort: 1")["input_ids"])]
    assert batch["input_ids"].shape == (2, max(lengths)) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 1).all()
    label_lengths = [len(split[0]["labels"]), len(split[1]["labels"])]
    assert (batch["labels"] != -100).sum(1).tolist() == label_lengths
    assert batch["task_ids"].tolist() == [3, 3] and batch["example_ids"].tolist() == [0, 1]
    assert batch["references"] == [["3 8"], ["1", "one"]] and batch["task_names"] == ["task3", "task3"]
    np.testing.assert_array_equal(batch["labels"][0, : label_lengths[0]].numpy(), split[0]["labels"])


KILLED_PREPARATION = """
import os, signal, sys
from pathlib import Path
from moe_mtl.data import encoding
from moe_mtl.data.tokenizer import load_tokenizer
from tests.data.test_encoding import parts

def killed(*args, **kwargs):  # the process dies inside the tokenising map, as under `kill -9`
    os.kill(os.getpid(), signal.SIGKILL)

encoding._encode_batch = killed
encoding.encode_split("train", parts(), load_tokenizer(sys.argv[1]), 6, 4, Path(sys.argv[2]))
"""


def test_a_killed_preparation_leaves_no_cache_file_and_the_next_one_clears_what_it_left(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    cache = tmp_path / "cache"
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-c", KILLED_PREPARATION, str(tmp_path / "tokenizer"), str(cache)]
    killed = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (left,) = cache.iterdir()  # only its own work folder: no half-written .arrow, nothing tmp* in the cache itself
    assert left.name.startswith(".encoding-") and not list(cache.glob("*.arrow"))
    (cache / "tmpabc123").write_text("")  # what earlier versions left: the datasets library's temporary file
    elsewhere = cache / f".encoding-{killed_pid(left)}@another-host@0123abcd"  # a shared cache: not ours to judge
    elsewhere.mkdir()
    encoded, cached = encode_split("train", parts(), tokenizer, 6, 4, cache)
    assert not cached and len(encoded) == 4
    assert sorted(path.name for path in cache.iterdir() if path.suffix != ".arrow") == [elsewhere.name]
    assert len(list(cache.glob("*.arrow"))) == 1


def killed_pid(work: Path) -> str:
    """The process id a work folder `.encoding-<pid>@<host>@<random>` names."""
    return work.name.removeprefix(".encoding-").split("@")[0]
