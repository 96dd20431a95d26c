"""`python -m benchmarks`, as a user runs it: every case measured, ratios to dense, JSON and the markdown table."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_benchmark_runs_every_case_and_writes_json_and_markdown(tmp_path):
    command = [sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path), "--tasks", "3", "30"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    families = report["families"]
    assert set(families["training step"]) == {
        "dense",
        "stage two (argmax routes)",
        "stage one, gumbel_st (paper)",
        "stage one, switch",
        "stage one, reinforce",
        "token top-1 (FFN experts)",
        "token top-2 (FFN experts)",
    }
    for family in ("evaluation forward", "greedy generation", "beam-4 generation"):
        sequential = "mixed-task rows as one-task batches, one after another"
        assert set(families[family]) == {"dense", "one-task", "mixed-task", sequential}
        # the same rows: the same FLOPs as the mixed batch, whichever way they are batched
        flops = families[family]["mixed-task"]["flops"]
        assert abs(families[family][sequential]["flops"] - flops) <= 0.05 * flops, family
    for rows in families.values():
        assert rows["dense"]["time_ratio"] == rows["dense"]["flop_ratio"] == rows["dense"]["memory_ratio"] == 1.0
        for row in rows.values():
            assert row["seconds"] > 0 and row["flops"] > 0 and row["peak_bytes"] > 0
    training = families["training step"]
    # what the counter sees: gumbel_st runs all 3 experts, the sparse selections one per example
    assert training["stage one, gumbel_st (paper)"]["flop_ratio"] > 2.0
    for case in ("stage one, switch", "stage one, reinforce", "stage two (argmax routes)"):
        assert training[case]["flop_ratio"] < 1.1, case
    for family in ("greedy generation", "beam-4 generation", "evaluation forward"):
        assert families[family]["mixed-task"]["flop_ratio"] < 1.1, family
    assert [row["tasks"] for row in report["scaling"]["tasks"]] == [3, 30]
    assert [row["experts"] for row in report["scaling"]["experts"]] == [1, 2]
    assert {(t["family"], t["case"]) for t in report["targets"]} >= {("evaluation forward", "mixed-task")}
    table = (tmp_path / "results.md").read_text()
    assert "| training step | stage one, switch |" in table and "| beam-4 generation | mixed-task |" in table
    assert "--quick" in table and report["machine"] in table
