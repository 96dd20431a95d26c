"""The optional extra `analysis` (scipy, matplotlib): imported on first use, with an error that says how to get it."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA = "moe-mtl[analysis]"


def require(module: str) -> ModuleType:
    """Import `module` (e.g. "scipy.stats", "matplotlib.figure"), or raise an ImportError naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"route analysis needs {module.split('.')[0]} ({err}): pip install {EXTRA}") from err


def available(module: str) -> bool:
    """Whether `module` can be imported (the RoutingMonitor draws no route map without matplotlib)."""
    try:
        require(module)
    except ImportError:
        return False
    return True
