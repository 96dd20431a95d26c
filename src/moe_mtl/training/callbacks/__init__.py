"""The training's callbacks, one job each, one file each; `CALLBACK_GROUPS`: those the `moe-mtl` command always has."""

from lightning.pytorch import Callback

from .clipping import GroupGradientClipping
from .expert_sparse import ExpertSparseUpdates
from .final_evaluation import FinalEvaluation
from .nan_guard import NanGuard
from .preemption import PreemptionCheckpoint
from .progress import StepProgressBar
from .routing_monitor import RoutingMonitor
from .temperature import TemperatureAnnealing, TemperaturePlan
from .two_stage import TwoStageTraining

# callbacks with a CLI group of their own (`--two_stage.switch_step`), always on: group → class. In this order in
# the trainer's callbacks: the clipping callback leaves its group norms for the NaN guard's check
CALLBACK_GROUPS: dict[str, type[Callback]] = {
    "two_stage": TwoStageTraining,
    "temperature": TemperatureAnnealing,
    "preemption": PreemptionCheckpoint,
    "clipping": GroupGradientClipping,
    "nan_guard": NanGuard,
    "expert_sparse_updates": ExpertSparseUpdates,
    "final_evaluation": FinalEvaluation,
}

__all__ = [
    "CALLBACK_GROUPS",
    "ExpertSparseUpdates",
    "FinalEvaluation",
    "GroupGradientClipping",
    "NanGuard",
    "PreemptionCheckpoint",
    "RoutingMonitor",
    "StepProgressBar",
    "TemperatureAnnealing",
    "TemperaturePlan",
    "TwoStageTraining",
]
