"""Files of task representations: by task name or as a plain matrix in task order, and their errors."""

import json
import re

import numpy as np
import pytest
import torch

from moe_mtl.representations.files import load_representations, read_task_embeddings, save_representations


@pytest.mark.parametrize("suffix", [".pt", ".json"])
def test_named_files_round_trip_in_any_task_order(tmp_path, suffix):
    vectors = torch.arange(6.0).reshape(3, 2)
    path = tmp_path / f"vectors{suffix}"
    save_representations(path, ["a", "b", "c"], vectors, kind="text")
    torch.testing.assert_close(load_representations(path, ["c", "a", "b"], dim=2), vectors[[2, 0, 1]])


@pytest.mark.parametrize("suffix", [".pt", ".npy", ".json"])
def test_a_plain_matrix_is_read_in_task_order(tmp_path, suffix):
    vectors = torch.arange(6.0).reshape(3, 2)
    path = tmp_path / f"vectors{suffix}"
    if suffix == ".pt":
        torch.save(vectors, path)
    elif suffix == ".npy":
        np.save(path, vectors.numpy())
    else:
        path.write_text(json.dumps(vectors.tolist()))
    torch.testing.assert_close(load_representations(path, ["x", "y", "z"]), vectors)
    with pytest.raises(ValueError, match=r"shape \(3, 2\) without task names; .* one row per task: \(2, width\)"):
        load_representations(path, ["x", "y"])


def test_file_errors_name_the_file_and_what_is_allowed(tmp_path):
    path = tmp_path / "vectors.pt"
    save_representations(path, ["a", "b"], torch.ones(2, 4))
    with pytest.raises(ValueError, match=re.escape(f"{path} holds vectors of width 4; expected width 8")):
        load_representations(path, ["a", "b"], dim=8)
    with pytest.raises(ValueError, match=re.escape(f"{path} has no vector for tasks c; it has: a, b")):
        load_representations(path, ["a", "b", "c"])
    with pytest.raises(
        ValueError, match=re.escape(f"{path} names tasks the data does not have: b; the data's tasks: a")
    ):
        load_representations(path, ["a"])
    with pytest.raises(ValueError, match=r"missing\.pt does not exist"):
        load_representations(tmp_path / "missing.pt", ["a"])
    (tmp_path / "vectors.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"suffix '.csv'; allowed: .pt, .json, .npy"):
        load_representations(tmp_path / "vectors.csv", ["a"])
    (tmp_path / "bad.json").write_text(json.dumps({"a": "not a vector"}))
    with pytest.raises(ValueError, match=r"bad.json holds dict; expected"):
        load_representations(tmp_path / "bad.json", ["a"])
    (tmp_path / "nan.json").write_text('{"a": [NaN, 1.0]}')
    with pytest.raises(ValueError, match="non-finite"):
        load_representations(tmp_path / "nan.json", ["a"])
    with pytest.raises(ValueError, match=r"vectors of shape \(3, 4\) for 2 task names"):
        save_representations(path, ["a", "b"], torch.ones(3, 4))


def test_a_model_without_task_names_reads_a_plain_matrix_by_task_id(tmp_path):
    vectors = torch.randn(3, 4)
    torch.save(vectors, tmp_path / "v.pt")
    assert torch.equal(load_representations(tmp_path / "v.pt", 3), vectors)
    with pytest.raises(ValueError, match=r"v.pt holds a matrix of shape \(3, 4\) without task names"):
        load_representations(tmp_path / "v.pt", 2)
    save_representations(tmp_path / "named.pt", ["a", "b", "c"], vectors)
    with pytest.raises(ValueError, match=r"named.pt gives vectors by task name, but the model was built without"):
        load_representations(tmp_path / "named.pt", 3)
    with pytest.raises(ValueError, match=r"MoE option `task_embeddings`: representation file .*missing.pt does not"):
        read_task_embeddings(tmp_path / "missing.pt", 3)
