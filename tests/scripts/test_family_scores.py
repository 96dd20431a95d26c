"""scripts/family_scores.py: the scores of an evaluation file per skill family and output type."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "family_scores.py"


@pytest.fixture(scope="module")
def family_scores():
    spec = importlib.util.spec_from_file_location("family_scores", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.family_scores


def test_family_scores_average_each_family_over_its_tasks(family_scores):
    rows = [{"task": "max", "score": 1.0}, {"task": "reverse", "score": 0.0}, {"task": "evens-sum", "score": 0.5}]
    result = family_scores({"tasks": rows, "average": {"score": 0.5}})
    # max: aggregate → number; reverse: order → sequence; evens-sum: filter + aggregate → number
    assert result["family"] == {"aggregate": (0.75, 2), "filter": (0.5, 1), "order": (0.0, 1)}
    assert result["output_type"] == {"number": (0.75, 2), "sequence": (0.0, 1)}
