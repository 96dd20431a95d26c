"""How a step is measured: interleaved wall-clock repetitions, FLOPs, and peak memory allocated during the step."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

Step = Callable[[], object]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(steps: dict[str, Step], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per step. Each repetition runs every step once, in turn, so that the machine's drift (other
    load, clock changes) reaches all steps alike instead of whichever ran last. One warm-up round first."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(repeats + 1):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def count_flops(step: Step) -> int:
    """FLOPs of one step as torch's FlopCounterMode counts them (matmuls, convolutions, attention)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def peak_memory(step: Step, device: torch.device) -> int:
    """Bytes allocated at the step's peak beyond what was live before it (activations, gradients, caches).

    CUDA: the caching allocator's peak. CPU: the running sum of every operator's own allocations and frees, in
    order, from torch's profiler (CPU tensors have no allocator statistics)."""
    synchronize(device)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak
