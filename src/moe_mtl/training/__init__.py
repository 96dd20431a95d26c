"""Training: the LightningModule, optimizer groups and schedules, and the callbacks."""

from .callbacks import (
    ExpertSparseUpdates,
    GroupGradientClipping,
    NanGuard,
    PreemptionCheckpoint,
    RoutingMonitor,
    TemperatureAnnealing,
    TemperaturePlan,
    TwoStageTraining,
)
from .module import MoEMultiTaskModule

__all__ = [
    "ExpertSparseUpdates",
    "GroupGradientClipping",
    "MoEMultiTaskModule",
    "NanGuard",
    "PreemptionCheckpoint",
    "RoutingMonitor",
    "TemperatureAnnealing",
    "TemperaturePlan",
    "TwoStageTraining",
]
