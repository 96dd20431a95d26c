"""Route analysis of a trained run (`moe-mtl analyze`): labelled route heatmaps and learning dynamics, the
correlation of task features with expert usage, route–skill agreement, and expert disabling. The task features
are read as the data wrote them, whatever their names (`features`): the grouping and the shared-skill feature are
options, chosen from the data when not given.

scipy and matplotlib are the optional extra `analysis` (`pip install moe-mtl[analysis]`); each module imports
them inside the functions that need them, so `import moe_mtl` works without them. The report and expert
disabling import the training package: import them from their modules (the command is `moe_mtl.commands.analyze`).
"""

from ..extras import require
from .agreement import route_agreement, route_skill_agreement
from .correlation import CorrelationResult, benjamini_hochberg, expert_usage, feature_usage_correlation

__all__ = [
    "CorrelationResult",
    "benjamini_hochberg",
    "expert_usage",
    "feature_usage_correlation",
    "require",
    "route_agreement",
    "route_skill_agreement",
]
