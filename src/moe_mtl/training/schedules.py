"""Step schedules: the routing temperature (Ye et al.'s annealing) and the learning-rate warmup/decay."""

from __future__ import annotations

import math
from typing import Literal

from ..errors import UsageError

TEMPERATURE_SCHEDULES = ("exp", "linear", "cosine")
TemperatureSchedule = Literal["exp", "linear", "cosine"]


def temperature_at(
    step: int,
    start: float,
    end: float,
    schedule: TemperatureSchedule = "exp",
    rate: float = 3e-4,
    total_steps: int | None = None,
) -> float:
    """The selection temperature τ after `step` optimizer steps.

    exp: max(start · exp(−rate · step), end) (the paper's; `end` is the floor). linear and cosine go
    from `start` to `end` over `total_steps` and stay at `end` after it.
    """
    if step < 0:
        raise UsageError(f"step is {step}; it must be >= 0")
    if schedule == "exp":
        return max(start * math.exp(-rate * step), end)
    if schedule not in TEMPERATURE_SCHEDULES:
        raise UsageError(f"temperature schedule is {schedule!r}; allowed: {', '.join(TEMPERATURE_SCHEDULES)}")
    if not total_steps or total_steps < 1:
        raise UsageError(f"the {schedule!r} temperature schedule needs total_steps >= 1, got {total_steps}")
    progress = min(step / total_steps, 1.0)
    if schedule == "linear":
        return start + (end - start) * progress
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupLinearDecay:
    """Learning-rate factor: linear warmup from 0 to 1 over `warmup_steps`, then linear decay to 0 at
    `total_steps`, both counted from `start_step` (a restarted schedule, e.g. at a training stage switch).

    A callable object rather than a function, so `LambdaLR.state_dict` saves its fields and a resumed
    run continues the same schedule, restarts included.
    """

    def __init__(self, warmup_steps: int, total_steps: int, start_step: int = 0):
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise UsageError(
                f"need 0 <= warmup_steps <= total_steps and total_steps >= 1; got {warmup_steps}, {total_steps}"
            )
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.start_step = start_step

    def __call__(self, step: int) -> float:
        step = step - self.start_step
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))

    def restart(self, start_step: int, total_steps: int, warmup_steps: int) -> None:
        """Begin a new warmup/decay at `start_step` (lasting `total_steps`)."""
        self.__init__(warmup_steps, total_steps, start_step)


def warmup_steps_for(warmup: float, total_steps: int) -> int:
    """`warmup` as steps: a fraction of `total_steps` when below 1 (the paper's 6 %), else a step count."""
    if warmup < 0:
        raise UsageError(f"`warmup` is {warmup}; give a fraction of the steps in [0, 1) or a step count >= 1")
    steps = round(warmup * total_steps) if warmup < 1 else int(warmup)
    return min(steps, total_steps)
