"""Transitional: route statistics moved to `evaluation.routes`, route-table files to `moe_mtl.runs`, and the one
route heatmap is `evaluation.routes.route_heatmap_figure`. Kept only until training/callbacks.py (RoutingMonitor)
is re-pointed at merge; then deleted."""

from ..runs import route_table_record, write_route_table
from .routes import expert_utilisation, route_entropy


def route_heatmap(routes, cell: int = 8):
    """Gone: the route map is the matplotlib figure `evaluation.routes.route_heatmap_figure`."""
    raise ImportError(
        "the route map needs matplotlib (evaluation.routes.route_heatmap_figure): pip install moe-mtl[analysis]"
    )


__all__ = ["expert_utilisation", "route_entropy", "route_heatmap", "route_table_record", "write_route_table"]
