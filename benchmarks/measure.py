"""How a step is measured: interleaved repetitions by wall and per-thread CPU clocks, their spread, FLOPs, and peak
memory allocated during the step."""

from __future__ import annotations

import ctypes
import ctypes.util
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


def interleaved_times(steps: dict[str, Step], repeats: int, device: torch.device) -> dict[str, dict[str, list]]:
    """Seconds of every repetition of each step, by two clocks: "wall" (perf_counter) and "cpu", this thread's CPU
    time (thread_time), which other processes on the machine do not inflate; with one torch thread it is the whole
    step's compute. Each repetition runs every step once, in turn, so that the machine's drift (other load, clock
    changes) reaches all steps alike instead of whichever ran last. One warm-up round first."""
    times: dict[str, dict[str, list]] = {name: {"wall": [], "cpu": []} for name in steps}
    for round_ in range(repeats + 1):
        for name, step in steps.items():
            synchronize(device)
            wall, cpu = time.perf_counter(), time.thread_time()
            step()
            synchronize(device)
            if round_:
                times[name]["wall"].append(time.perf_counter() - wall)
                times[name]["cpu"].append(time.thread_time() - cpu)
    return times


def steady_allocator() -> bool:
    """Keep freed memory in the process (glibc: no trimming, no mmap per large block) and say whether it could.

    By default glibc hands large freed blocks back to the system, so a step that follows a smaller one (the first
    case of each interleaved round, after the last) faults all its activations in again, and is charged for it as
    CPU time: order, not the case, then decides its time. A training loop repeats one step and stays warm; so
    does every case once the heap keeps its memory."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim, mmap = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD of malloc.h
        return bool(libc.mallopt(trim, 1 << 30)) and bool(libc.mallopt(mmap, 1 << 30))
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl without mallopt)
        return False


def ratio_clock(device: torch.device) -> str:
    """The clock the ratios are taken on: per-thread CPU time when one CPU thread does all the work (immune to other
    load), wall time otherwise (several threads, or a GPU, whose work no CPU clock sees)."""
    return "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); all three the value itself for a single repetition."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    first, median, third = statistics.quantiles(values, n=4, method="inclusive")
    return first, median, third


def paired_ratios(times: list[float], dense: list[float]) -> tuple[float, float, float]:
    """Quartiles of the per-repetition ratios to dense: repetition i of a case against repetition i of dense, which
    ran beside it, so that drift between repetitions cancels instead of widening the spread."""
    return quartiles([case / base for case, base in zip(times, dense, strict=True)])


def verdict(spread: tuple[float, float, float], target: float, at_most: bool = True) -> str:
    """ "yes" when the whole interquartile range meets the target (at most `target`, or at least it), "no" when the
    whole range misses it, else "within noise": the spread straddles the target, and this run cannot tell."""
    first, _, third = spread if at_most else (-spread[2], 0.0, -spread[0])
    bound = target if at_most else -target
    return "yes" if third <= bound else "no" if first > bound else "within noise"


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
