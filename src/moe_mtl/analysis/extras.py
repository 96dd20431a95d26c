"""Transitional: `moe_mtl.extras` is the home of these; kept until training/callbacks.py (RoutingMonitor) imports
them from there (the lead re-points it at merge), then deleted."""

from ..extras import EXTRA, available, require

__all__ = ["EXTRA", "available", "require"]
