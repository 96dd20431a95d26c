"""The optional extras, imported on first use, with an error that says how to get them:
`analysis` (scipy, matplotlib: `moe-mtl analyze`, route maps) and `represent` (the pretrained sentence encoder
all-MiniLM-L6-v2: `moe_mtl.representations.pretrained`)."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import UsageError

# extra → what needs it
EXTRAS = {"analysis": "route analysis", "represent": "the pretrained sentence encoder"}


class MissingExtra(UsageError, ImportError):
    """An optional extra is not installed: a usage error (one line, exit 2) that callers may catch as ImportError."""


def require(module: str, extra: str = "analysis") -> ModuleType:
    """Import `module` (e.g. "scipy.stats", "all_minilm_l6_v2"), or raise `MissingExtra` naming the extra
    (`EXTRAS`) that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        needed = f"{EXTRAS[extra]} needs {module.split('.')[0]} ({err})"
        raise MissingExtra(f"{needed}: pip install moe-mtl[{extra}]") from err


def available(module: str) -> bool:
    """Whether `module` can be imported (the RoutingMonitor draws no route map without matplotlib)."""
    try:
        require(module)
    except ImportError:
        return False
    return True
