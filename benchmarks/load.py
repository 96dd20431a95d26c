"""What else the machine is doing: a benchmark beside another CPU-heavy process measures that process too.

Linux's /proc/stat counts the CPU time of every process; the benchmark's own (all its threads) comes from
os.times(). Busy time that is not ours, per second of wall time, is the other processes' load in cores.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

STAT = Path("/proc/stat")
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
IDLE_FIELDS = (3, 4)  # idle, iowait in the "cpu" line's fields after the label


def busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have used since boot; None where /proc/stat is missing."""
    try:
        fields = [int(v) for v in STAT.read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    # guest time is already inside user and nice
    return sum(v for i, v in enumerate(fields[:8]) if i not in IDLE_FIELDS) / TICK


def own_seconds() -> float:
    times = os.times()
    return times.user + times.system


class LoadWatch:
    """Other processes' average load (cores) between `start()` and each `others()`."""

    def start(self) -> LoadWatch:
        self.wall, self.busy, self.own = time.perf_counter(), busy_seconds(), own_seconds()
        return self

    def others(self) -> float | None:
        busy = busy_seconds()
        if busy is None or self.busy is None:
            return None
        wall = time.perf_counter() - self.wall
        return max(0.0, (busy - self.busy) - (own_seconds() - self.own)) / wall


def other_load(seconds: float = 2.0) -> float | None:
    """Other processes' load over a short idle sample of `seconds`, in cores."""
    watch = LoadWatch().start()
    time.sleep(seconds)
    return watch.others()


def describe(load: float | None) -> str:
    return "unknown (no /proc/stat)" if load is None else f"{load:.2f} cores busy besides the benchmark"
