"""Fixtures of the data tests: small skill-suite sizes and a writer of JSON-lines task files."""

import json
from pathlib import Path

import pytest


@pytest.fixture
def small_skills() -> dict:
    """Skill-suite options that keep a data module to about a second."""
    return {"train_size": 16, "dev_size": 4, "test_size": 6, "shots": 4, "fewshot_seeds": [13, 42]}


def _write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture
def write_jsonl():
    """write_jsonl(path, rows): rows are dicts (written as JSON) or raw strings (written as they are)."""
    return _write_jsonl
