"""STAND-IN (branch `training` only): the owners branch's `evaluation/routes.py` holds `route_heatmap_figure`; take
theirs at the merge. Here it re-exports the analysis figure so that the RoutingMonitor imports it from evaluation."""

from ..analysis.plots import route_heatmap_figure

__all__ = ["route_heatmap_figure"]
