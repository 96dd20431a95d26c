"""Step schedules: the routing temperature (Ye et al.'s annealing), the learning-rate warmup/decay and the random
seed of each training micro-batch."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable
from typing import Literal

import numpy as np
import torch
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_info
from torch.optim.lr_scheduler import LRScheduler

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


def recompute_learning_rates(schedulers: Iterable[LRScheduler]) -> None:
    """Set this step's learning rates again after the schedules' factors changed (a restart): each scheduler had
    set them already."""
    for scheduler in schedulers:
        # `LRScheduler.step` computes the lr of step `last_epoch + 1`, sets it and what `get_last_lr()` reports
        scheduler.last_epoch -= 1
        with warnings.catch_warnings():  # at fit start no optimizer step has run yet, which it would warn about
            warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"), UserWarning)
            scheduler.step()


def step_seed(seed: int, step: int, micro_batch: int, rank: int) -> int:
    """The torch seed of one training micro-batch: a hash of the run's seed, the optimizer step, the micro-batch
    in the accumulation window and the rank, so the draws are fresh everywhere and a resume repeats them."""
    state = np.random.SeedSequence([seed % 2**64, step, micro_batch, rank]).generate_state(2, np.uint64)
    return int(state[0]) % 2**63


class StepSeeds:
    """The random draws of training (Gumbel noise, dropout): each micro-batch seeds torch with `step_seed` of the
    run's seed, so a run resumed from any checkpoint continues exactly as an uninterrupted one."""

    def __init__(self) -> None:
        self.base = 0  # the run's seed, set at train start; saved in checkpoints
        self.resumed: int | None = None  # a checkpoint's seed, until train start takes it

    def start(self, strategy: Strategy) -> None:
        """The checkpoint's seed when resuming, else the run's (`seed_everything`; rank 0's, so all ranks agree
        even without it)."""
        seed = self.resumed
        if seed is None:
            seed = strategy.broadcast(torch.initial_seed(), src=0)
        elif seed != torch.initial_seed():
            rank_zero_info(f"resumed: random draws continue the checkpoint's seed {seed}, not {torch.initial_seed()}")
        self.base, self.resumed = int(seed), None

    def seed(self, step: int, micro_batch: int, rank: int) -> None:
        torch.manual_seed(step_seed(self.base, step, micro_batch, rank))
