"""Shared test set-up: nothing may reach a hub, and every test starts from a fixed seed."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_ddp_environment(monkeypatch):
    """Lightning's spawn launcher leaves MASTER_PORT set in this process: every DDP test picks its own free port
    instead of reusing the first one. Spawned ranks run one thread each, as the test process's ranks share 2 cores."""
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
