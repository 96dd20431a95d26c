"""Fixtures of the command tests: the training tests' tiny skill-suite data folder (`moe-mtl analyze`'s run)."""

from ..training.conftest import skill_data_dir  # noqa: F401 (a fixture used by these tests)
