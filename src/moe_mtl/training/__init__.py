"""Training: the LightningModule, optimizer groups and schedules, and the callbacks."""

from .callbacks import RoutingMonitor, TemperatureAnnealing, TemperaturePlan, TwoStageTraining
from .clipping import GroupGradientClipping
from .module import MoEMultiTaskModule
from .preemption import PreemptionCheckpoint

__all__ = [
    "GroupGradientClipping",
    "MoEMultiTaskModule",
    "PreemptionCheckpoint",
    "RoutingMonitor",
    "TemperatureAnnealing",
    "TemperaturePlan",
    "TwoStageTraining",
]
