"""`moe-mtl fewshot`: the lr selection and tables, and the runner end to end on the tiny skill suite, with resume."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from moe_mtl.cli import main
from moe_mtl.experiments.fewshot import Cell, cell_args, fewshot_rows, select_best, task_summary

TASK = "evens-count"  # a held-out skill task (partition "test")
SEEDS = (100, 13)
LRS = (1e-3, 3e-3)


def result(lr: float, dev: float, test: float, batch_size: int | None = None) -> dict:
    return {"lr": lr, "batch_size": batch_size, "dev_score": dev, "test_score": test}


# --- selection and tables -------------------------------------------------------------------------------


def test_select_best_takes_the_best_dev_score_and_the_earlier_grid_point_on_ties():
    assert select_best([result(1e-5, 0.2, 0.9), result(2e-5, 0.5, 0.1), result(5e-5, 0.4, 0.3)])["lr"] == 2e-5
    assert select_best([result(1e-5, 0.5, 0.9), result(2e-5, 0.5, 0.1)])["lr"] == 1e-5


def test_select_best_selects_nothing_from_part_of_the_grid():
    assert select_best([result(1e-5, 0.9, 0.9), None]) is None


def test_rows_and_summary_report_mean_and_population_std_over_seeds_and_count_incomplete_rows():
    results = {
        Cell("a", 1, 0.1): result(0.1, 0.5, 0.6),
        Cell("a", 1, 0.2): result(0.2, 0.7, 0.2),
        Cell("a", 2, 0.1): result(0.1, 0.3, 0.8),
        Cell("a", 2, 0.2): result(0.2, 0.1, 0.0),
        Cell("b", 1, 0.1): result(0.1, 0.4, 0.5),
        Cell("b", 1, 0.2): None,  # failed
        Cell("b", 2, 0.1): result(0.1, 0.0, 0.3),
        Cell("b", 2, 0.2): result(0.2, 0.2, 0.1),
    }
    rows = fewshot_rows(results, ["a", "b"], [1, 2], [(0.1, None), (0.2, None)])
    assert [(r["task"], r["seed"], r["lr"], r["test_score"], r["missing_cells"]) for r in rows] == [
        ("a", 1, 0.2, 0.2, ""),
        ("a", 2, 0.1, 0.8, ""),
        ("b", 1, None, None, "lr0.2"),
        ("b", 2, 0.2, 0.1, ""),
    ]
    a, b, average = task_summary(rows)
    assert (a["seeds"], a["missing_seeds"]) == (2, 0) and (b["seeds"], b["missing_seeds"]) == (1, 1)
    assert a["test_mean"] == pytest.approx(0.5) and a["test_std"] == pytest.approx(0.3)  # |0.2 - 0.8| / 2
    assert a["dev_mean"] == pytest.approx(0.5) and a["dev_std"] == pytest.approx(0.2)
    assert b["test_mean"] == pytest.approx(0.1) and b["test_std"] == 0.0
    assert average["task"] == "average" and average["test_mean"] == pytest.approx(0.3)
    assert average["missing_seeds"] == 1


def test_a_batch_size_grid_selects_the_batch_size_too_and_names_its_cells():
    results = {
        Cell("a", 1, 0.1, 2): result(0.1, 0.3, 0.4, 2),
        Cell("a", 1, 0.1, 4): result(0.1, 0.6, 0.1, 4),
        Cell("b", 1, 0.1, 2): result(0.1, 0.3, 0.4, 2),
    }
    rows = fewshot_rows(results, ["a", "b"], [1], [(0.1, 2), (0.1, 4)])
    assert (rows[0]["batch_size"], rows[0]["test_score"]) == (4, 0.1)
    assert (rows[1]["batch_size"], rows[1]["missing_cells"]) == (None, "lr0.1-bs4")
    assert Cell("a", 13, 2e-5, 8).folder(Path("out")) == Path("out/cells/a/seed13/lr2e-05-bs8")
    args = cell_args(["--config", "c.yaml"], Cell("a", 13, 2e-5, 8), Path("f"), "test", "up", None, None)
    assert args[:3] == ["fit", "--config", "c.yaml"]
    assert {
        "--data.fewshot_seed=13",
        "--model.optim.lr=2e-05",
        "--data.batch_size=8",
        "--model.transfer.init_from=up",
    } <= set(args)


# --- the command ----------------------------------------------------------------------------------------


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def cell_folder(out: Path, seed: int, lr: float) -> Path:
    return out / "cells" / TASK / f"seed{seed}" / f"lr{lr:g}"


def fewshot_command(config: str, upstream: Path, out: Path, *extra: str) -> list[str]:
    return [
        "fewshot",
        "--config",
        config,
        "--init_from",
        str(upstream),
        "--out",
        str(out),
        "--tasks",
        TASK,
        "--unseen_routes",
        "learned",
        *extra,
    ]


@pytest.fixture(scope="module")
def fewshot_run(fewshot_config, upstream, tmp_path_factory) -> tuple[Path, dict]:
    """One task × 2 seeds × 2 lrs from the upstream run; (out folder, TensorBoard files per cell after the run)."""
    out = tmp_path_factory.mktemp("fewshot") / "out"
    main(fewshot_command(fewshot_config, upstream, out, "--seeds", *map(str, SEEDS), "--lrs", *map(str, LRS)))
    events = {
        (seed, lr): sorted(p.name for p in cell_folder(out, seed, lr).glob("events.*")) for seed in SEEDS for lr in LRS
    }
    return out, events


@pytest.mark.slow
def test_each_cell_fine_tunes_the_upstream_model_on_one_seeds_k_shot_split(fewshot_run, upstream):
    out, _ = fewshot_run
    seen = [row["task"] for row in json.loads(next((upstream / "evaluation").glob("val-*.json")).read_text())["tasks"]]
    for seed in SEEDS:
        for lr in LRS:
            folder = cell_folder(out, seed, lr)
            config = yaml.safe_load((folder / "config.yaml").read_text())
            assert config["data"]["fewshot_seed"] == seed and config["model"]["optim"]["lr"] == lr
            assert config["model"]["transfer"]["init_from"] == str(upstream)
            partition = json.loads((folder / "partition.json").read_text())
            assert partition["test"] == [TASK] and partition["dev"] == [] and set(seen) <= set(partition["train"])
            # validated on the task's 2-shot dev split, tested on its test split, nothing else
            (val,) = json.loads(next((folder / "evaluation").glob("val-*.json")).read_text())["tasks"]
            (test,) = json.loads(next((folder / "evaluation").glob("test-*.json")).read_text())["tasks"]
            assert (val["task"], val["examples"], test["task"], test["examples"]) == (TASK, 2, TASK, 2)
            saved = json.loads((folder / "result.json").read_text())
            assert (saved["dev_score"], saved["test_score"]) == (val["score"], test["score"])


@pytest.mark.slow
def test_the_table_has_one_row_per_task_and_seed_with_the_lr_of_the_best_dev_score(fewshot_run):
    out, _ = fewshot_run
    rows = read_csv(out / "fewshot.csv")
    assert [(row["task"], int(row["seed"])) for row in rows] == [(TASK, seed) for seed in SEEDS]
    for row in rows:
        cells = [json.loads((cell_folder(out, int(row["seed"]), lr) / "result.json").read_text()) for lr in LRS]
        best_dev = max(cell["dev_score"] for cell in cells)
        chosen = next(cell for cell in cells if cell["dev_score"] == best_dev)  # the first lr of the grid on ties
        assert float(row["lr"]) == chosen["lr"] and float(row["test_score"]) == pytest.approx(chosen["test_score"])
        assert row["missing_cells"] == "" and row["batch_size"] == ""
    task, average = read_csv(out / "fewshot_summary.csv")
    tests = [float(row["test_score"]) for row in rows]
    assert task["task"] == TASK and int(task["seeds"]) == 2 and int(task["missing_seeds"]) == 0
    assert float(task["test_mean"]) == pytest.approx(sum(tests) / 2)
    assert float(task["test_std"]) == pytest.approx(abs(tests[0] - tests[1]) / 2)
    assert average["task"] == "average" and float(average["test_mean"]) == pytest.approx(float(task["test_mean"]))
    assert f"| {TASK} | 2 |" in (out / "fewshot_summary.md").read_text()


@pytest.mark.slow
def test_a_second_run_skips_finished_cells_and_reruns_a_half_finished_one_from_scratch(
    fewshot_run, fewshot_config, upstream
):
    out, events = fewshot_run
    redo = cell_folder(out, SEEDS[1], LRS[1])
    before = json.loads((redo / "result.json").read_text())
    weights = torch.load(redo / before["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    (redo / "result.json").unlink()  # as if interrupted after the fit
    main(fewshot_command(fewshot_config, upstream, out, "--seeds", *map(str, SEEDS), "--lrs", *map(str, LRS)))
    for (seed, lr), names in events.items():
        now = sorted(p.name for p in cell_folder(out, seed, lr).glob("events.*"))
        if cell_folder(out, seed, lr) == redo:
            assert now and not set(now) & set(names)  # the old run's files are gone: a fresh run
        else:
            assert now == names  # skipped
    after = json.loads((redo / "result.json").read_text())
    assert after == before  # deterministic by seed
    rerun = torch.load(redo / after["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    assert rerun.keys() == weights.keys()
    assert all(torch.equal(rerun[name], weights[name]) for name in weights)


@pytest.mark.slow
def test_a_failed_cell_is_recorded_the_next_still_runs_and_the_row_is_incomplete(
    fewshot_config, upstream, tmp_path, capsys
):
    out = tmp_path / "out"
    # no training step: each cell's fit is refused before it starts, and every cell fails
    with pytest.raises(SystemExit) as stopped:
        main(fewshot_command(fewshot_config, upstream, out, "--seeds", "100", "--lrs", *map(str, LRS), "--max_steps=0"))
    assert stopped.value.code == 1
    for lr in LRS:
        assert (
            "trainer.max_steps is 0: nothing would be trained" in (cell_folder(out, 100, lr) / "error.txt").read_text()
        )
        assert not (cell_folder(out, 100, lr) / "result.json").exists()
    (row,) = read_csv(out / "fewshot.csv")
    assert (row["lr"], row["test_score"], row["missing_cells"]) == ("", "", "lr0.001 lr0.003")
    assert "1 of 1 (task, seed) rows are incomplete" in (out / "fewshot_summary.md").read_text()
    assert "2 cell(s) failed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.optim.lr", "0.1"], "--model.optim.lr is set by the runner for each cell; use --lrs"),
        (["--tasks", "nope"], "--tasks names ['nope'], not tasks of partition 'test'"),
        (["--unseen_routes", "learned"], "--unseen_routes learned needs --init_from"),
        ([], "without --init_from, give the fit option data.tokenizer"),
    ],
)
def test_bad_options_are_usage_errors(fewshot_config, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as stopped:
        main(["fewshot", "--config", fewshot_config, "--out", str(tmp_path / "out"), *extra])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_relative_out_folder_works(fewshot_config, upstream, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Lightning reports absolute checkpoint paths; the cell folder was relative
    main(fewshot_command(fewshot_config, upstream, Path("out"), "--seeds", "100", "--lrs", str(LRS[0])))
    result = json.loads((cell_folder(tmp_path / "out", 100, LRS[0]) / "result.json").read_text())
    assert result["checkpoint"].startswith("checkpoints/best-step")
