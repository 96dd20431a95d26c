"""Fixtures of the training tests: a tiny skill-suite data module and tiny MoE multi-task modules over it.

    def test_something(data, tmp_path):
        module = tiny_module(data, moe={"selection": "softmax"}, lr=1e-2)
        Trainer(**tiny_trainer(tmp_path, max_steps=3)).fit(module, datamodule=data)

`data` is a fresh `MultiTaskDataModule` per test (the skill suite's 48 tasks, 34 of them trained on; 4
examples a batch); the tokenizer and the tokenised splits are made once per session and shared, so a data
module costs milliseconds. `tiny_module` links the data's facts into the module as the CLI does, and builds
a d_model-16 BART with 2 + 2 layers, each routed to 2 whole-layer experts, no dropout (runs are deterministic
by seed). Every test here runs torch on one thread (see `_one_thread`).
"""

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import seed_everything

from moe_mtl import MoEOptions
from moe_mtl.data.datamodule import MultiTaskDataModule
from moe_mtl.training import MoEMultiTaskModule

from ..models.conftest import TINY_BART

TINY_SKILLS = {"train_size": 20, "dev_size": 4, "test_size": 4}


def tiny_data(output_dir: str | Path, **overrides: Any) -> MultiTaskDataModule:
    """A skill-suite data module: 20 train / 4 dev / 4 test examples per task, vocabulary 300, batch 4."""
    options = dict(skills=TINY_SKILLS, vocab_size=300, batch_size=4, max_target_length=16, output_dir=str(output_dir))
    return MultiTaskDataModule(**{**options, **overrides})


def tiny_module(
    data: MultiTaskDataModule,
    moe: dict[str, Any] | None = None,
    bart: dict[str, Any] | None = None,
    seed: int | None = 0,
    **hparams: Any,
) -> MoEMultiTaskModule:
    """A `MoEMultiTaskModule` over `data` with `TINY_BART` sizes.

    moe: `MoEOptions` fields over num_experts=2, task_dim=8 (num_tasks comes from the data).
    bart: `BartConfig` fields over `TINY_BART`.
    seed: `seed_everything` right before building, so two calls give the same weights (None: no seeding).
    hparams: module options over lr=1e-3 and num_beams=1 (greedy generation keeps validation fast).
    """
    if seed is not None:
        seed_everything(seed, verbose=False)
    options = MoEOptions(**{"num_experts": 2, "task_dim": 8, **(moe or {}), "num_tasks": data.num_tasks})
    defaults = dict(lr=1e-3, num_beams=1)
    return MoEMultiTaskModule(
        bart={**TINY_BART, **(bart or {})}, moe=options, **linked_options(data), **{**defaults, **hparams}
    )


def linked_options(data: MultiTaskDataModule) -> dict[str, Any]:
    """The module options the CLI links from the data module (`MoEMTLCLI`), set by hand."""
    return dict(
        task_names=data.task_names,
        task_metrics=data.task_metrics,
        task_partitions=data.task_partitions,
        tokenizer_size=data.vocab_size,
        pad_token_id=data.pad_token_id,
        tokenizer_path=data.tokenizer_path,
        max_target_length=data.hparams.max_target_length,
    )


def tiny_trainer(root: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Trainer arguments of a quiet CPU run without validation, logger or checkpoints (override any); files go
    under `root` (None: Lightning's default, the working directory)."""
    options = dict(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    if root is not None:
        options["default_root_dir"] = str(root)
    return {**options, **overrides}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared machine: intra-op threads only contend (one thread runs them ~100x faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def skill_data_dir(tmp_path_factory) -> Path:
    """The session's data folder: tokenizer trained and splits tokenised once, reused by every `data`."""
    directory = tmp_path_factory.mktemp("skill_data")
    tiny_data(directory).prepare_data()
    return directory


@pytest.fixture
def data(skill_data_dir: Path) -> MultiTaskDataModule:
    """A fresh tiny data module (see `tiny_data`) over the session's tokenizer and cache."""
    return tiny_data(skill_data_dir)
