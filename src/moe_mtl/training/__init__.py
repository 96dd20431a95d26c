"""Training: the LightningModule, optimizer groups and schedules, and the callbacks."""

from .callbacks import RoutingMonitor, TemperatureAnnealing, TemperaturePlan, TwoStageTraining
from .module import MoEMultiTaskModule

__all__ = ["MoEMultiTaskModule", "RoutingMonitor", "TemperatureAnnealing", "TemperaturePlan", "TwoStageTraining"]
