"""`python -m benchmarks`, as a user runs it: every case measured, ratios to dense, JSON and the markdown table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from benchmarks.__main__ import QUICK
from benchmarks.cases import STAGE_TWO, Bench
from benchmarks.floor import floor_steps, implied_floor, routed_projections
from benchmarks.limit import matmul_replay
from benchmarks.load import other_load
from benchmarks.measure import count_flops, paired_ratios, quartiles, verdict

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
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
        calls = "mixed-task, a layer call per expert"
        assert set(families[family]) == {"dense", "one-task", "mixed-task", calls, sequential}
        # the same rows: the same FLOPs as the mixed batch, whichever way they are batched or run
        flops = families[family]["mixed-task"]["flops"]
        assert families[family][calls]["flops"] == flops, family  # the grouped matmuls are counted
        assert abs(families[family][sequential]["flops"] - flops) <= 0.05 * flops, family
    assert report["clock"] == "cpu"  # one torch thread by default: ratios on per-thread CPU time
    for rows in families.values():
        assert rows["dense"]["time_ratio"] == rows["dense"]["flop_ratio"] == rows["dense"]["memory_ratio"] == 1.0
        assert rows["dense"]["time_ratio_quartiles"] == [1.0, 1.0, 1.0]
        for row in rows.values():
            assert row["seconds"] > 0 and row["flops"] > 0 and row["peak_bytes"] > 0
            assert row["seconds"] == row["cpu_quartiles"][1] and row["wall_quartiles"][1] > 0
    for case, row in families["training step"].items():  # each case beside its own matmuls, replayed alone
        assert row["matmul_flops"] == row["flops"], case  # the replay runs exactly the step's matmuls
        assert row["fraction_of_limit"] > 0 and row["limit_gflops"] > 0, case
    assert {"before", "during", "after", "marked"} <= set(report["load"])
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
    # the matmul floor of each mixed-task target: dense's projections against the experts' split of the same rows
    assert set(report["floor"]) == {"evaluation forward", "greedy generation", "beam-4 generation"}
    for family, floor in report["floor"].items():
        assert {"dense", "a matmul per expert"} <= set(floor["seconds"]), family
        assert all(seconds > 0 for seconds in floor["seconds"].values())
        assert floor["implied_time_ratio"] >= 1.0
        assert floor["measured_time_ratio"] == families[family]["mixed-task"]["time_ratio"]
        (target,) = [t for t in report["targets"] if (t["family"], t.get("case")) == (family, "mixed-task")]
        assert target["target"] == pytest.approx(floor["target_over_floor"] * floor["implied_time_ratio"])
        assert target["holds"] in {"yes", "no", "within noise"}
    assert report["floor"]["greedy generation"]["calls"] == 6  # the quick shape's target length
    # --model.compile: each MoE case compiled beside its eager twin, its speed-up against the 1.25x
    compiled = report["compile"]["rows"]
    assert set(compiled) == {
        "dense",
        "dense, compiled",
        "stage one, gumbel_st (paper)",
        "stage one, gumbel_st (paper), compiled",
        "stage two",
        "stage two, compiled",
    }
    for case in ("stage one, gumbel_st (paper), compiled", "stage two, compiled"):
        assert compiled[case]["compile_seconds"] > 0 and compiled[case]["speed_up_quartiles"][1] > 0
        (target,) = [t for t in report["targets"] if t.get("case") == case]
        assert target["speed_up_at_least"] == 1.25 and target["holds"] in {"yes", "no", "within noise"}
    table = (tmp_path / "results.md").read_text()
    assert "| training step | stage one, switch |" in table and "| beam-4 generation | mixed-task |" in table
    assert "--quick" in table and report["machine"] in table
    assert "| greedy generation | " in table.split("matmul floor")[1]
    assert "| stage two (argmax routes) | " in table.split("matmul limit")[1] and "Load: before" in table


def test_a_run_beside_a_cpu_heavy_process_is_refused(tmp_path):
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert other_load(1.0) > 0.5  # the spinning process is seen
        command = [sys.executable, "-m", "benchmarks", "--out", str(tmp_path)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    finally:
        busy.kill()
        busy.wait()
    assert done.returncode == 2, done.stderr[-2000:]
    assert "another CPU-heavy process would be measured too" in done.stderr and "--allow-load" in done.stderr
    assert not list(tmp_path.iterdir())


def test_a_ratio_whose_spread_straddles_its_target_is_within_noise():
    assert quartiles([3.0, 1.0, 2.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    # each repetition against the dense one beside it: a drift both share cancels
    assert paired_ratios([1.1, 2.2, 3.3], [1.0, 2.0, 3.0]) == pytest.approx((1.1, 1.1, 1.1))
    assert verdict((0.9, 1.0, 1.1), 1.15) == "yes"
    assert verdict((1.1, 1.14, 1.2), 1.15) == "within noise"
    assert verdict((1.2, 1.3, 1.4), 1.15) == "no"
    assert verdict((0.82, 0.85, 0.9), 0.80, at_most=False) == "yes"
    assert verdict((0.7, 0.82, 0.9), 0.80, at_most=False) == "within noise"
    assert verdict((0.6, 0.7, 0.75), 0.80, at_most=False) == "no"


def test_the_matmul_limit_replays_exactly_the_matmuls_of_a_training_step():
    bench = Bench(QUICK, torch.device("cpu"), bf16=False)
    step = bench.train_step(bench.moe(**STAGE_TWO), bench.one_task)
    replay = matmul_replay(step)
    assert count_flops(replay) == count_flops(step) > 0


def test_the_matmul_floor_splits_the_same_rows_as_dense_and_runs_only_what_a_step_runs():
    bench = Bench(QUICK, torch.device("cpu"), bf16=False)
    model = bench.moe(**STAGE_TWO)
    for beams in (None, 1, 4):
        steps = floor_steps(bench, model, beams)
        # the experts' parts are the dense rows, split: the same multiply-adds
        assert count_flops(steps["a matmul per expert"]) == count_flops(steps["dense"]) > 0, beams
    per_layer = {"encoder": 6, "decoder": 10}  # q k v out fc1 fc2, and the cross-attention's four
    everything = routed_projections(model, decode=False)
    assert len(everything) == QUICK.layers * (per_layer["encoder"] + per_layer["decoder"])
    # a decoding step runs neither the encoder nor the cached cross-attention keys and values
    assert len(routed_projections(model, decode=True)) == QUICK.layers * (per_layer["decoder"] - 2)
    assert implied_floor({"dense": 1.0, "split": 1.5}, calls=4, dense_step=10.0) == 1.2
    assert implied_floor({"dense": 1.0, "split": 0.9}, calls=4, dense_step=10.0) == 1.0
