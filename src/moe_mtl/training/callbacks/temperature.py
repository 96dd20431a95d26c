"""TemperatureAnnealing: the router's selection temperature τ on a schedule (Ye et al.'s stage one, and stage two)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from ...errors import UsageError
from ..schedules import TEMPERATURE_SCHEDULES, TemperatureSchedule, temperature_at
from .two_stage import stage_two_start


@dataclass
class TemperaturePlan:
    """A temperature schedule: `temperature_at(step, start, end, schedule, rate, total_steps)`."""

    start: float = 2.0
    end: float = 0.1
    schedule: TemperatureSchedule = "exp"
    rate: float = 3e-4
    total_steps: int | None = None

    def __post_init__(self) -> None:
        if self.schedule not in TEMPERATURE_SCHEDULES:
            raise UsageError(
                f"TemperatureAnnealing: schedule is {self.schedule!r}; allowed: {', '.join(TEMPERATURE_SCHEDULES)}"
            )
        if not (self.start > 0 and self.end > 0):
            raise UsageError(f"TemperatureAnnealing: start ({self.start}) and end ({self.end}) must be > 0")
        if self.rate < 0:
            raise UsageError(f"TemperatureAnnealing: rate is {self.rate}; it must be >= 0")

    def at(self, step: int, total_steps: int) -> float:
        return temperature_at(step, self.start, self.end, self.schedule, self.rate, self.total_steps or total_steps)


class TemperatureAnnealing(Callback):
    """Anneal the router's selection temperature τ, set before every optimizer step: step s (counted from 0)
    runs at τ(s), so after N steps the router holds τ(N − 1).

    Default (the paper's stage one): τ = max(2.0 · exp(−3e-4 · step), 0.1). "linear" and "cosine" go from
    `start` to `end` over `total_steps` (default: the run's training steps). With `stage_two`, a second
    schedule runs from the two-stage switch on (e.g. the paper's softmax τ 300 → 1.0, rate 1e-4); without
    it, the stage-two temperature set at the switch is kept. The switch step is the `TwoStageTraining` callback's
    (`stage_two_start`: planned, then taken), so that the switch step runs at the stage-two τ whichever of the two
    callbacks runs first. The module logs τ as train/temperature. Only
    learned task routes have a τ: with fixed routes or token routing the callback does nothing. The `moe-mtl`
    command always has it, in its `temperature` group (`--temperature.rate 0` keeps τ at `start`).

    Args:
        start: τ at step 0.
        end: τ at the end (linear, cosine) or its floor (exp).
        schedule: "exp", "linear" or "cosine".
        rate: r of the exp schedule.
        total_steps: Steps of a linear or cosine schedule; None: the trainer's estimated training steps.
        stage_two: Schedule after the two-stage switch, counted from the switch step.
    """

    def __init__(
        self,
        start: float = 2.0,
        end: float = 0.1,
        schedule: TemperatureSchedule = "exp",
        rate: float = 3e-4,
        total_steps: int | None = None,
        stage_two: TemperaturePlan | None = None,
    ):
        self.plan = TemperaturePlan(start, end, schedule, rate, total_steps)
        self.stage_two = stage_two
        self.temperature: float | None = None

    def temperature_for(self, trainer: Trainer, pl_module: LightningModule) -> float | None:
        """τ for the coming optimizer step (None: leave the module's τ alone)."""
        total = max(1, int(trainer.estimated_stepping_batches))
        switch = stage_two_start(trainer)
        if switch is not None and trainer.global_step >= switch:
            if self.stage_two is None:
                return None
            return self.stage_two.at(trainer.global_step - switch, max(1, total - switch))
        return self.plan.at(trainer.global_step, total)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.apply(trainer, pl_module)

    def apply(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Set τ for the coming optimizer step. Fixed routes and token routing have no τ: nothing to anneal."""
        router = pl_module.model.router
        if router is None or not router.learned:
            return
        temperature = self.temperature_for(trainer, pl_module)
        if temperature is not None:
            pl_module.model.set_temperature(temperature)
            self.temperature = temperature

    def state_dict(self) -> dict[str, Any]:
        stage_two = asdict(self.stage_two) if self.stage_two else None
        return {"plan": asdict(self.plan), "stage_two": stage_two, "temperature": self.temperature}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        mine = self.state_dict()
        if (state_dict["plan"], state_dict["stage_two"]) != (mine["plan"], mine["stage_two"]):
            rank_zero_warn(
                f"TemperatureAnnealing: the checkpoint's schedule {state_dict['plan']} (stage two: "
                f"{state_dict['stage_two']}) differs from this run's {mine['plan']} ({mine['stage_two']}); "
                "the resumed run follows this run's"
            )
        self.temperature = state_dict["temperature"]
