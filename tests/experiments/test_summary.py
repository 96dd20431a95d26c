"""`moe-mtl summarize`: ARG and mean ± std, the table with its notes on missing pieces, and the command on real
tiny run folders."""

import csv
import json
import math
import shutil
from pathlib import Path

import pytest

from moe_mtl.cli import main
from moe_mtl.evaluation.metrics import average_relative_gain
from moe_mtl.experiments.summary import (
    RunResults,
    build_table,
    format_value,
    mean_std,
    render_markdown,
)

# --- statistics -----------------------------------------------------------------------------------------


def test_mean_std_is_the_population_std():
    assert mean_std([0.2, 0.4, 0.9]) == pytest.approx((0.5, math.sqrt((0.09 + 0.01 + 0.16) / 3)))
    assert mean_std([0.7]) == (0.7, 0.0)
    with pytest.raises(ValueError, match="no values"):
        mean_std([])


def test_arg_is_the_mean_of_per_task_relative_gains_not_the_gain_of_the_means():
    # task a: +50 %, task b: −20 %; the means (0.55 vs 0.5) would give +10 %
    assert average_relative_gain({"a": 0.3, "b": 0.8}, {"a": 0.2, "b": 1.0}) == pytest.approx((0.5 - 0.2) / 2)


def test_arg_over_a_zero_baseline_is_infinite_or_nan_as_in_the_released_code():
    assert average_relative_gain({"a": 0.5, "b": 0.5}, {"a": 0.0, "b": 0.5}, zero_baseline=True) == math.inf
    assert math.isnan(average_relative_gain({"a": 0.0}, {"a": 0.0}, zero_baseline=True))


def test_arg_needs_the_same_tasks_on_both_sides():
    with pytest.raises(ValueError, match=r"only in method: \['c'\], only in baseline: \[\]"):
        average_relative_gain({"a": 0.5, "c": 0.1}, {"a": 0.4})


# --- the table ------------------------------------------------------------------------------------------


def run(method: str, seed: int, seen: float | None, zeroshot: dict | None, fewshot: dict | None) -> RunResults:
    return RunResults(method, Path(f"{method}/seed{seed}"), seen, zeroshot, fewshot)


def test_rows_average_per_run_then_report_mean_and_std_over_runs_with_arg_against_the_baseline_mean():
    runs = [
        run("vanilla", 1, 0.6, {"a": 0.2, "b": 0.4}, {"a": 0.5, "b": 0.5}),
        run("vanilla", 2, 0.8, {"a": 0.4, "b": 0.4}, {"a": 0.5, "b": 0.7}),
        run("moe", 1, 0.7, {"a": 0.6, "b": 0.4}, {"a": 0.5, "b": 0.6}),
        run("moe", 2, 0.9, {"a": 0.3, "b": 0.6}, {"a": 0.5, "b": 0.6}),
    ]
    (vanilla, moe), notes = build_table(runs, "vanilla")
    assert [vanilla.method, moe.method] == ["vanilla", "moe"] and moe.runs == 2
    assert moe.values["seen_dev"] == pytest.approx([0.7, 0.9])
    assert moe.values["zeroshot"] == pytest.approx([0.5, 0.45])
    # the baseline per task, averaged over its runs: zero-shot a 0.3, b 0.4; few-shot a 0.5, b 0.6
    assert moe.values["arg_zeroshot"] == pytest.approx([100 * (1 + 0) / 2, 100 * (0 + 0.5) / 2])
    assert moe.values["arg_fewshot"] == pytest.approx([0.0, 0.0])
    assert vanilla.values["arg_zeroshot"] == pytest.approx([100 * (-1 / 3 + 0) / 2, 100 * (1 / 3 + 0) / 2])
    assert notes == []
    assert format_value(moe.values["seen_dev"], 3) == "0.800 ± 0.100"


def test_a_baseline_scoring_0_makes_the_released_arg_undefined_and_the_scored_tasks_column_leaves_it_out():
    runs = [
        run("vanilla", 1, 0.6, {"a": 0.0, "b": 0.4}, {"a": 0.5, "b": 0.5}),
        run("moe", 1, 0.7, {"a": 0.1, "b": 0.6}, {"a": 0.5, "b": 0.6}),
    ]
    (vanilla, moe), notes = build_table(runs, "vanilla")
    assert moe.values["arg_zeroshot"] == [float("inf")]  # as the released compute_arg.py gives
    assert moe.values["arg_zeroshot_scored"] == pytest.approx([50.0])  # task b only: 0.6 / 0.4 − 1
    assert vanilla.values["arg_zeroshot_scored"] == pytest.approx([0.0])
    assert moe.values["arg_fewshot_scored"] == pytest.approx(moe.values["arg_fewshot"])  # no zero: the same
    assert notes == [
        "baseline 'vanilla' scores 0 on zeroshot tasks ['a']: their relative gain, and so the zeroshot ARG, is ±inf "
        "or NaN (as the released ARG code gives); the 'tasks the baseline scores' column averages the other 1 of 2 "
        "tasks"
    ]


def test_missing_pieces_are_dashes_and_each_is_counted_in_a_note():
    runs = [
        run("vanilla", 1, 0.6, {"a": 0.2, "b": 0.4}, None),
        run("moe", 1, None, {"a": 0.6}, {"a": 0.5, "b": 0.6}),  # zero-shot lacks task b
        run("moe", 2, 0.9, {"a": 0.3, "b": 0.6}, {"a": 0.5, "b": 0.6}),
    ]
    runs[0].notes.append("few-shot: no few-shot summary vanilla/seed1/fewshot/fewshot_summary.csv")
    (vanilla, moe), notes = build_table(runs, "vanilla")
    assert moe.values["seen_dev"] == [0.9] and moe.values["zeroshot"] == pytest.approx([0.45])
    assert vanilla.values["fewshot"] == [] and moe.values["arg_fewshot"] == []
    text = render_markdown([vanilla, moe], notes, "vanilla")
    assert "| vanilla | 1 | 0.600 | 0.300 | — | 0.0 | — | 0.0 | — |" in text
    # ARG (0.3/0.2 − 1 + 0.6/0.4 − 1) / 2
    assert "| moe | 2 | 0.900 | 0.450 | 0.550 ± 0.000 | 50.0 | — | 50.0 | — |" in text
    assert "moe (moe/seed1): zeroshot lacks tasks ['b']" in notes
    assert "baseline 'vanilla' has no complete fewshot results: no fewshot ARG" in notes
    assert "moe: Seen dev avg from 1 of 2 runs" in notes
    assert "moe: Few-shot ARG (%) from 0 of 2 runs" in notes
    assert f"{len(notes)} note(s) on missing, substituted or undefined values" in text
    assert all(f"- {note}\n" in text for note in notes)


def test_an_unknown_baseline_is_an_error_naming_the_methods():
    with pytest.raises(ValueError, match="--baseline is 'dense', which is not a method here; methods: moe"):
        build_table([run("moe", 1, 0.5, None, None)], "dense")


# --- the command on real run folders --------------------------------------------------------------------


@pytest.fixture(scope="module")
def methods(upstream, fewshot_config, tmp_path_factory) -> Path:
    """vanilla/seed1, vanilla/seed2: the upstream run with zero-shot and few-shot results; moe/seed1: the same
    run without few-shot results."""
    root = tmp_path_factory.mktemp("methods")
    seed1 = root / "vanilla" / "seed1"
    shutil.copytree(upstream, seed1)
    few = ["--init_from", str(seed1), "--out", str(seed1 / "fewshot"), "--tasks", "evens-count", "--seeds", "100"]
    main(["fewshot", "--config", fewshot_config, *few, "--lrs", "1e-3", "--unseen_routes", "learned"])
    shutil.copytree(seed1, root / "vanilla" / "seed2")
    shutil.copytree(upstream, root / "moe" / "seed1")
    return root


def test_summarize_reads_dev_zero_shot_and_few_shot_results_and_counts_what_is_missing(methods, upstream, capsys):
    out = methods / "tables" / "table"
    main(
        [
            "summarize",
            str(methods / "vanilla"),
            str(methods / "moe" / "seed1"),
            "--baseline",
            "vanilla",
            "--out",
            str(out),
        ]
    )
    (val,) = (upstream / "evaluation").glob("val-*.json")  # one validation: the best checkpoint's
    seen = [row["score"] for row in json.loads(val.read_text())["tasks"] if row["partition"] == "train"]
    (test,) = (upstream / "zeroshot" / "evaluation").glob("test-*.json")
    unseen = [row["score"] for row in json.loads(test.read_text())["tasks"]]
    with open(methods / "vanilla/seed1/fewshot/fewshot_summary.csv", newline="") as file:
        few = next(row for row in csv.DictReader(file) if row["task"] == "evens-count")
    with open(out.with_suffix(".csv"), newline="") as file:
        vanilla, moe = list(csv.DictReader(file))
    assert (vanilla["method"], vanilla["runs"], moe["method"], moe["runs"]) == ("vanilla", "2", "moe", "1")
    assert float(vanilla["seen_dev_mean"]) == pytest.approx(sum(seen) / len(seen)) and vanilla["seen_dev_n"] == "2"
    assert float(moe["zeroshot_mean"]) == pytest.approx(sum(unseen) / len(unseen))
    assert float(vanilla["fewshot_mean"]) == pytest.approx(float(few["test_mean"])) and vanilla["fewshot_n"] == "2"
    assert (moe["fewshot_mean"], moe["fewshot_n"]) == ("", "0")
    table = out.with_suffix(".md").read_text()
    assert f"moe ({methods / 'moe' / 'seed1'}): few-shot: no few-shot summary" in table
    assert "moe: Unseen few-shot avg from 0 of 1 runs" in table
    if not all(unseen):  # a 2-step model scores 0 on some tasks: the ARG over them is undefined, and said so
        assert "baseline 'vanilla' scores 0 on zeroshot tasks" in table
    assert "2 methods" in capsys.readouterr().out


def test_summarize_of_a_folder_that_is_no_run_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["summarize", str(tmp_path), "--out", str(tmp_path / "table")])
    assert stopped.value.code == 2
    assert f"{tmp_path} is neither a run folder" in capsys.readouterr().err
