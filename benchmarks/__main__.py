"""MoE-BART against dense BART of the same shape: time, FLOPs and peak memory of each case, as ratios to dense.

    python -m benchmarks                       (or `make bench`; results.md names how long it took)
    python -m benchmarks --device cuda --bf16  (a GPU: the same cases under bf16 autocast)
    python -m benchmarks --quick               (a tiny shape, one repetition: checks that every case runs)

Writes OUT/results.json and OUT/results.md (default OUT: benchmarks/results). Every case of a family is compared
with the dense step of that family (training step, evaluation forward, greedy or beam-4 generation) at the same
shapes, in interleaved repetitions in one process: each repetition of a case against the dense one beside it, the
median and the interquartile range of those ratios reported, on per-thread CPU time with one torch thread (the
default; wall time beside it). A target the spread straddles is "within noise". Each training case is also set
against its own matmuls replayed alone, the machine's limit at its shapes (benchmarks/limit.py). Then the matmul
floor of the mixed-task cases (benchmarks/floor.py), and the scaling of the sparse stage one and of the mixed-task
evaluation forward in the number of experts E and of tasks, and the training step with `--model.compile` at the
quick start's shape (benchmarks/compiled.py). The other processes' load is printed before and after;
a run that starts beside a CPU-heavy process is refused, or with --allow-load marked in the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from .cases import SPARSE_STAGE_ONE, STAGE_TWO, TRAIN_VARIANTS, Bench, Shape, layer_calls_per_expert, one_task_batches
from .compiled import QUICK_START, measure_compile
from .floor import floor_steps, implied_floor
from .limit import fraction_of_limit, matmul_replay
from .load import LoadWatch, describe, other_load
from .measure import (
    count_flops,
    interleaved_times,
    paired_ratios,
    peak_memory,
    quartiles,
    ratio_clock,
    steady_allocator,
    verdict,
)

# (family, case) → the largest time ratio to dense the project holds itself to (issue 10)
TARGETS = {("training step", case): 1.15 for case in SPARSE_STAGE_ONE}
# family → the largest time × dense of its mixed-task case, as a multiple of that family's matmul floor (issue 22)
FLOOR_TARGETS = {"evaluation forward": 1.05, "greedy generation": 1.10, "beam-4 generation": 1.10}
# training case → the smallest fraction of its matmul limit it holds itself to (issue 22)
LIMIT_TARGETS = {"stage two (argmax routes)": 0.80}
# other processes' load (cores) above which a run is refused, or marked with --allow-load
BUSY_CORES = 0.25
QUICK = Shape(d_model=32, layers=1, tasks=4, batch=4, source_length=12, target_length=6, vocab=300)


# the mixed-task case as it ran before the grouped layer (models/grouped_layer.py): a layer call per used expert
PER_EXPERT_CALLS = "mixed-task, a layer call per expert"


def families(bench: Bench) -> dict[str, dict[str, object]]:
    """Every family's steps: "dense" first, then the MoE cases."""
    stage_two = bench.moe(**STAGE_TWO)
    train = {"dense": bench.train_step(bench.dense)}
    for name, options in TRAIN_VARIANTS.items():
        train[name] = bench.train_step(bench.moe(**options), bench.one_task)
    out = {"training step": train}
    mixed = bench.mixed_tasks
    calls = layer_calls_per_expert(bench.moe(**STAGE_TWO))
    forward = bench.forward_step(stage_two, mixed)
    out["evaluation forward"] = {
        "dense": bench.forward_step(bench.dense),
        "one-task": bench.forward_step(stage_two, bench.one_task),
        "mixed-task": forward,
        PER_EXPERT_CALLS: bench.forward_step(calls, mixed),
        "mixed-task rows as one-task batches, one after another": one_task_batches(forward, mixed),
    }
    for beams, family in ((1, "greedy generation"), (4, "beam-4 generation")):
        generate = bench.generate_step(stage_two, beams, mixed)
        out[family] = {
            "dense": bench.generate_step(bench.dense, beams),
            "one-task": bench.generate_step(stage_two, beams, bench.one_task),
            "mixed-task": generate,
            PER_EXPERT_CALLS: bench.generate_step(calls, beams, mixed),
            "mixed-task rows as one-task batches, one after another": one_task_batches(generate, mixed),
        }
    return out


def measure_family(steps: dict, repeats: int, device: torch.device, profile_cost: bool, limit: bool = False) -> dict:
    """Each case's times (median and quartiles, both clocks), ratios to dense on the ratio clock with their spread,
    FLOPs and peak memory. `limit`: each case's matmuls are replayed beside it (benchmarks/limit.py) and the case's
    fraction of that limit is recorded."""
    replays = {f"{name} (matmuls)": matmul_replay(step) for name, step in steps.items()} if limit else {}
    times = interleaved_times({**steps, **replays}, repeats, device)
    clock = ratio_clock(device)
    rows = {}
    for name, step in steps.items():
        row = {"seconds": quartiles(times[name][clock])[1], "clock": clock}
        for which in ("wall", "cpu"):
            row[f"{which}_quartiles"] = quartiles(times[name][which])
        row["time_ratio_quartiles"] = paired_ratios(times[name][clock], times["dense"][clock])
        row["time_ratio"] = row["time_ratio_quartiles"][1]
        if profile_cost:
            row["flops"] = count_flops(step)
            row["peak_bytes"] = peak_memory(step, device)
        if limit:
            replay = f"{name} (matmuls)"
            row["matmul_seconds"] = quartiles(times[replay][clock])[1]
            row["matmul_flops"] = count_flops(replays[replay])
            row["limit_gflops"] = row["matmul_flops"] / row["matmul_seconds"] / 1e9
            if profile_cost:
                row["achieved_gflops"] = row["flops"] / row["seconds"] / 1e9
                # per repetition: the replay and the step ran side by side
                row["fraction_quartiles"] = quartiles(
                    [
                        fraction_of_limit(row["flops"], seconds, row["matmul_flops"], matmul)
                        for seconds, matmul in zip(times[name][clock], times[replay][clock], strict=True)
                    ]
                )
                row["fraction_of_limit"] = row["fraction_quartiles"][1]
        rows[name] = row
    dense = rows["dense"]
    for row in rows.values():
        for key, ratio in (("flops", "flop_ratio"), ("peak_bytes", "memory_ratio")):
            if key in row and dense.get(key):
                row[ratio] = row[key] / dense[key]
    return rows


def medians(steps: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each step on the ratio clock."""
    clock = ratio_clock(device)
    return {name: quartiles(t[clock])[1] for name, t in interleaved_times(steps, repeats, device).items()}


def matmul_floor(bench: Bench, families_: dict, repeats: int) -> dict[str, dict]:
    """The projections of each mixed-task target family alone (benchmarks/floor.py), and the lowest time × dense
    they leave for the family's mixed-task case."""
    model = bench.moe(**STAGE_TWO)
    out = {}
    for family, beams in (("evaluation forward", None), ("greedy generation", 1), ("beam-4 generation", 4)):
        # a few milliseconds a step: more repetitions for the same steadiness
        seconds = medians(floor_steps(bench, model, beams), 5 * repeats, bench.device)
        calls = 1 if beams is None else bench.shape.target_length
        out[family] = {
            "seconds": seconds,
            "calls": calls,
            "implied_time_ratio": implied_floor(seconds, calls, families_[family]["dense"]["seconds"]),
            "measured_time_ratio": families_[family]["mixed-task"]["time_ratio"],
            "target_over_floor": FLOOR_TARGETS[family],
        }
    return out


def scaling(shape: Shape, device, bf16: bool, repeats: int, selection: str, axis: str, values) -> list[dict]:
    """Time ratio to dense (quartiles of the paired repetitions) of the sparse stage-one step and the mixed-task
    evaluation forward, along one axis."""
    rows = []
    clock = ratio_clock(device)
    for value in values:
        bench = Bench(Shape(**{**vars(shape), axis: value}), device, bf16)
        moe_train = bench.moe(routes="learned", selection=selection)
        moe_eval = bench.moe(**STAGE_TWO)
        steps = {
            "dense train": bench.train_step(bench.dense),
            "stage one": bench.train_step(moe_train, bench.one_task),
            "dense eval": bench.forward_step(bench.dense),
            "mixed eval": bench.forward_step(moe_eval, bench.mixed_tasks),
        }
        times = {name: t[clock] for name, t in interleaved_times(steps, repeats, device).items()}
        rows.append(
            {
                axis: value,
                "stage_one_time_ratio": paired_ratios(times["stage one"], times["dense train"]),
                "mixed_eval_time_ratio": paired_ratios(times["mixed eval"], times["dense eval"]),
                "seconds": {name: quartiles(values_)[1] for name, values_ in times.items()},
            }
        )
        del bench, moe_train, moe_eval, steps
        gc.collect()  # the next row's models into the memory this one's leave
    return rows


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {cores} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def ratio(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


def spread(quartiles_: list[float], scale: float = 1.0, unit: str = "") -> str:
    """A median with its interquartile range: "1.04× (1.02–1.07)"."""
    first, median, third = (value * scale for value in quartiles_)
    digits = 1 if unit == " ms" else 2
    return f"{median:.{digits}f}{unit} ({first:.{digits}f}–{third:.{digits}f})"


def targets(report: dict) -> dict[tuple[str, str], float]:
    """Every (family, case)'s largest time ratio to dense: TARGETS, and each mixed-task case's multiple of the
    floor its family measured in this run."""
    floor = {
        (family, "mixed-task"): row["target_over_floor"] * row["implied_time_ratio"]
        for family, row in report["floor"].items()
    }
    return {**TARGETS, **floor}


def answer(spread, target: float | None, at_most: bool = True) -> str:
    if target is None:
        return ""
    said = verdict(spread, target, at_most)
    return "**no**" if said == "no" else said


def markdown(report: dict) -> str:
    clock = "per-thread CPU time" if report["clock"] == "cpu" else "wall time"
    load, limits = report["load"], targets(report)
    lines = [
        f"Machine: {report['machine']}. Shape: {report['shape']}. Precision: {report['precision']}. "
        f"Allocator: {report['allocator']}.",
        f"Command: `{report['command']}` ({report['repeats']} interleaved repetitions; medians with the interquartile "
        f"range in brackets; ratios to dense on {clock}, each repetition against the dense one beside it; "
        f"{report['minutes']:.1f} min).",
        f"Load: before {describe(report['load']['before'])}; during the run {describe(report['load']['during'])}; "
        f"after {describe(report['load']['after'])}." + (" **Measured beside other load.**" if load["marked"] else ""),
        "",
        "| family | case | wall time | CPU time | time × dense | FLOPs × dense | peak memory × dense | target | "
        "holds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for family, rows in report["families"].items():
        for case, row in rows.items():
            target = limits.get((family, case))
            lines.append(
                f"| {family} | {case} | {spread(row['wall_quartiles'], 1e3, ' ms')} | "
                f"{spread(row['cpu_quartiles'], 1e3, ' ms')} | {spread(row['time_ratio_quartiles'], unit='×')} | "
                f"{ratio(row.get('flop_ratio'))} | {ratio(row.get('memory_ratio'))} | "
                f"{'' if target is None else f'≤ {target:.2f}×'} | {answer(row['time_ratio_quartiles'], target)} |"
            )
    lines += [
        "",
        "The matmul limit of each training case: its own matmuls (forward and backward, recorded from the step) "
        f"replayed alone on fresh tensors (benchmarks/limit.py), on {clock}; FLOP/s are FlopCounterMode's FLOPs "
        "over the median time:",
        "",
        "| case | step GFLOP | step GFLOP/s | matmuls alone GFLOP/s (the limit) | fraction of the limit | target | "
        "holds |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, row in report["families"]["training step"].items():
        first, median, third = row["fraction_quartiles"]
        target = LIMIT_TARGETS.get(case)
        lines.append(
            f"| {case} | {row['flops'] / 1e9:.2f} | {row['achieved_gflops']:.1f} | {row['limit_gflops']:.1f} | "
            f"{median:.0%} ({first:.0%}–{third:.0%}) | {'' if target is None else f'≥ {target:.0%}'} | "
            f"{answer(row['fraction_quartiles'], target, at_most=False)} |"
        )
    lines += [
        "",
        "The matmul floor of the mixed-task targets: the projections alone (a forward, or one decoding step), each "
        "expert on its own rows, against dense's on the whole batch (benchmarks/floor.py):",
        "",
        "| family | dense matmuls | a matmul per expert | grouped matmul | calls | floor time × dense | measured | "
        "target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for family, row in report["floor"].items():
        ms = {name: f"{seconds * 1e3:.2f} ms" for name, seconds in row["seconds"].items()}
        lines.append(
            f"| {family} | {ms['dense']} | {ms['a matmul per expert']} | {ms.get('grouped matmul', '–')} | "
            f"{row['calls']} | {ratio(row['implied_time_ratio'])} | {ratio(row['measured_time_ratio'])} | "
            f"≤ {row['target_over_floor']:.2f} × floor = {row['target_over_floor'] * row['implied_time_ratio']:.2f}× |"
        )
    lines += [
        "",
        f"`--model.compile` (models/compilation.py, benchmarks/compiled.py) at {report['compile']['shape']}: the "
        "training step compiled against the same model eager, and against dense BART eager (the peer):",
        "",
        "| case | time | time × dense eager | speed-up over eager | compile time | target | holds |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, row in report["compile"]["rows"].items():
        target, speed_up = row.get("target"), row.get("speed_up_quartiles")
        compiling = f"{row['compile_seconds']:.0f} s" if "compile_seconds" in row else ""
        lines.append(
            f"| {case} | {row['seconds'] * 1e3:.1f} ms | {spread(row['time_ratio_quartiles'], unit='×')} | "
            f"{spread(speed_up, unit='×') if speed_up else ''} | {compiling} | "
            f"{'' if target is None else f'≥ {target:.2f}×'} | "
            f"{'' if target is None else answer(speed_up, target, at_most=False)} |"
        )
    for axis, rows in report["scaling"].items():
        lines += [
            "",
            f"Scaling in {axis} (stage one: selection `{report['scaling_selection']}`; time × dense, median "
            f"(interquartile range) of {report['scaling_repeats']} paired repetitions):",
            "",
            f"| {axis} | " + " | ".join(str(row[axis]) for row in rows) + " |",
            "|---|" + "---|" * len(rows),
            "| stage-one step | " + " | ".join(spread(row["stage_one_time_ratio"], unit="×") for row in rows) + " |",
            "| mixed-task eval forward | "
            + " | ".join(spread(row["mixed_eval_time_ratio"], unit="×") for row in rows)
            + " |",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (the GPU setting)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions per case (after one warm-up)")
    parser.add_argument("--scaling-repeats", type=int, default=5)
    parser.add_argument("--experts", type=int, nargs="+", help="E of the scaling table (default 1 2 4 8 16)")
    parser.add_argument("--tasks", type=int, nargs="+", help="tasks of the scaling table (default 10 100 1000)")
    parser.add_argument("--scaling-selection", default="switch", choices=["switch", "reinforce"])
    parser.add_argument("--quick", action="store_true", help="a tiny shape, one repetition: every case runs")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: the ratios are then per-thread CPU time)"
    )
    parser.add_argument(
        "--allow-load", action="store_true", help="run beside other CPU-heavy processes (the table is marked)"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    steady = steady_allocator()
    before = other_load()
    print(f"load before: {describe(before)}", flush=True)
    busy = before is not None and before > BUSY_CORES
    if busy and not args.allow_load and not args.quick:
        parser.exit(
            2,
            f"python -m benchmarks: error: {describe(before)} (over {BUSY_CORES}): another CPU-heavy "
            "process would be measured too. Wait for it, or pass --allow-load to mark the table.\n",
        )
    watch = LoadWatch().start()
    shape = QUICK if args.quick else Shape()
    repeats, scaling_repeats = (1, 1) if args.quick else (args.repeats, args.scaling_repeats)
    experts = args.experts or ([1, 2] if args.quick else [1, 2, 4, 8, 16])
    tasks = args.tasks or ([2, 8] if args.quick else [10, 100, 1000])

    start = time.perf_counter()
    bench = Bench(shape, device, args.bf16)
    report = {
        "machine": machine(device),
        "shape": shape.describe(),
        "precision": "bf16 autocast" if args.bf16 else "fp32",
        "command": " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)]),
        "repeats": repeats,
        "clock": ratio_clock(device),
        "families": {
            family: measure_family(steps, repeats, device, profile_cost=True, limit=family == "training step")
            for family, steps in families(bench).items()
        },
        "scaling_selection": args.scaling_selection,
        "scaling_repeats": scaling_repeats,
        "allocator": "freed memory kept (glibc mallopt)" if steady else "the platform's default",
    }
    report["floor"] = matmul_floor(bench, report["families"], repeats)
    del bench
    report["compile"] = measure_compile(QUICK if args.quick else QUICK_START, device, args.bf16, repeats)
    report["scaling"] = {
        "experts": scaling(shape, device, args.bf16, scaling_repeats, args.scaling_selection, "experts", experts),
        "tasks": scaling(shape, device, args.bf16, scaling_repeats, args.scaling_selection, "tasks", tasks),
    }
    report["minutes"] = (time.perf_counter() - start) / 60
    during = watch.others()
    after = other_load()
    print(f"load after: {describe(after)}", flush=True)
    marked = busy or any(load is not None and load > BUSY_CORES for load in (during, after))
    report["load"] = {"before": before, "during": during, "after": after, "marked": marked}
    report["targets"] = (
        [
            {
                "family": family,
                "case": case,
                "target": target,
                "time_ratio": report["families"][family][case]["time_ratio"],
                "holds": verdict(report["families"][family][case]["time_ratio_quartiles"], target),
            }
            for (family, case), target in targets(report).items()
        ]
        + [
            {
                "family": "training step",
                "case": case,
                "fraction_of_limit_at_least": target,
                "fraction_of_limit": report["families"]["training step"][case]["fraction_of_limit"],
                "holds": verdict(
                    report["families"]["training step"][case]["fraction_quartiles"], target, at_most=False
                ),
            }
            for case, target in LIMIT_TARGETS.items()
        ]
        + [
            {
                "family": "compiled training step",
                "case": case,
                "speed_up_at_least": row["target"],
                "speed_up": row["speed_up_quartiles"][1],
                "holds": verdict(row["speed_up_quartiles"], row["target"], at_most=False),
            }
            for case, row in report["compile"]["rows"].items()
            if row.get("target") is not None
        ]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "results.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
