"""Fixtures of the analysis tests: the training tests' tiny skill-suite data and modules (one torch thread)."""

from ..training.conftest import _one_thread, data, skill_data_dir  # noqa: F401 (fixtures used by these tests)
