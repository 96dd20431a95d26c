"""The training step with `--model.compile` (models/compilation.py) against the same model eager, and against the
peer, dense transformers BART eager, at the quick start's shape (configs/quickstart.yaml: d_model 128, 2+2
layers, 3 whole-layer experts, batch 64; 40/12 tokens, about the skill suite's lengths).

Every case runs interleaved in one process, after one call that compiles (its time is reported apart). The
speed-up of a compiled case is its eager twin's time over its own, repetition by repetition.
"""

from __future__ import annotations

import copy
import time

import torch

from moe_mtl.models.compilation import compile_layers

from .cases import STAGE_TWO, Bench, Shape
from .measure import interleaved_times, paired_ratios, quartiles, ratio_clock

QUICK_START = Shape(
    d_model=128, layers=2, experts=3, tasks=48, batch=64, source_length=40, target_length=12, vocab=1024
)
MOE_CASES = {"stage one, gumbel_st (paper)": dict(routes="learned", selection="gumbel_st"), "stage two": STAGE_TWO}
SPEED_UP_TARGET = 1.25  # issue 22: the quick start's training step at least 1.25x faster than the same model eager
COMPILED = ", compiled"


def compiled_dense(bench: Bench):
    """A copy of the benchmark's dense BART with each of its layers compiled (`compile_layers` takes plain BART
    layers as they are)."""
    dense = copy.deepcopy(bench.dense)
    compile_layers(dense)
    return dense


def compile_steps(bench: Bench) -> dict:
    """ "dense" (the peer), then each case eager and compiled."""
    steps = {"dense": bench.train_step(bench.dense), f"dense{COMPILED}": bench.train_step(compiled_dense(bench))}
    for name, options in MOE_CASES.items():
        steps[name] = bench.train_step(bench.moe(**options), bench.one_task)
        compiled = bench.moe(**options)
        compile_layers(compiled)
        steps[f"{name}{COMPILED}"] = bench.train_step(compiled, bench.one_task)
    return steps


def measure_compile(shape: Shape, device: torch.device, bf16: bool, repeats: int) -> dict:
    """Each case's median time and time × dense eager (quartiles), each compiled case's seconds to compile (its
    first call) and its speed-up over its eager twin (quartiles)."""
    bench = Bench(shape, device, bf16)
    steps = compile_steps(bench)
    compile_seconds = {}
    for name, step in steps.items():
        if name.endswith(COMPILED):
            start = time.perf_counter()
            step()
            compile_seconds[name] = time.perf_counter() - start
    times = interleaved_times(steps, repeats, device)
    clock = ratio_clock(device)
    rows = {}
    for name in steps:
        row = {"seconds": quartiles(times[name][clock])[1], "clock": clock}
        row["time_ratio_quartiles"] = paired_ratios(times[name][clock], times["dense"][clock])
        if name.endswith(COMPILED):
            eager = name.removesuffix(COMPILED)
            row["compile_seconds"] = compile_seconds[name]
            row["speed_up_quartiles"] = paired_ratios(times[eager][clock], times[name][clock])
            row["target"] = SPEED_UP_TARGET if eager in MOE_CASES else None
        rows[name] = row
    return {"shape": shape.describe(), "rows": rows}
