"""Fixtures of the training tests: a tiny skill-suite data module and tiny MoE multi-task modules over it.

    def test_something(data, tmp_path):
        module = tiny_module(data, moe={"selection": "softmax"}, optim={"lr": 1e-2})
        Trainer(**tiny_trainer(tmp_path, max_steps=3)).fit(module, datamodule=data)

`data` is a fresh `MultiTaskDataModule` per test (the skill suite's 48 tasks, 34 of them trained on; 4
examples a batch); the tokenizer and the tokenised splits are made once per session and shared, so a data
module costs milliseconds. `tiny_module` links the data's facts into the module as the CLI does, and builds
a d_model-16 BART with 2 + 2 layers, each routed to 2 whole-layer experts, no dropout (runs are deterministic
by seed). Every test here runs torch on one thread (see `_one_thread`).
"""

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.loggers import Logger

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
    optim: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
    **hparams: Any,
) -> MoEMultiTaskModule:
    """A `MoEMultiTaskModule` over `data` with `TINY_BART` sizes.

    moe: `MoEOptions` fields over num_experts=2, task_dim=8 (num_tasks comes from the data).
    bart: `BartConfig` fields over `TINY_BART`.
    seed: `seed_everything` right before building, so two calls give the same weights (None: no seeding).
    optim, evaluation: option-group fields over optim.lr=1e-3 and evaluation.num_beams=1 (greedy generation keeps
        validation fast).
    hparams: other module options (e.g. loss, transfer).
    """
    if seed is not None:
        seed_everything(seed, verbose=False)
    options = MoEOptions(**{"num_experts": 2, "task_dim": 8, **(moe or {}), "num_tasks": data.num_tasks})
    return MoEMultiTaskModule(
        bart={**TINY_BART, **(bart or {})},
        moe=options,
        optim={"lr": 1e-3, **(optim or {})},
        evaluation={"num_beams": 1, **(evaluation or {})},
        **linked_options(data),
        **hparams,
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


class MetricsLogger(Logger):
    """Keeps every logged value: metrics[name] is the list of values, in logging order."""

    def __init__(self):
        super().__init__()
        self.metrics: dict[str, list[float]] = defaultdict(list)

    @property
    def name(self) -> str:
        return "metrics"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        for key, value in metrics.items():
            self.metrics[key].append(value)


class PoisonGrad(Callback):
    """After the backward pass of optimizer step `index`, one gradient entry becomes NaN (the loss stays finite)."""

    def __init__(self, index: int):
        self.index = index

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.index:
            pl_module.model.model.shared.weight.grad[5, 0] = math.nan
            self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.index + 1:
            self.after = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


# --- a two-task data module and module (test_module.py and the callbacks' tests) ----------------------


TASKS = ["is_sorted", "count"]
SIZES = {"train_size": 8, "dev_size": 4, "test_size": 4}


def make_data(output_dir, **overrides) -> MultiTaskDataModule:
    options = dict(
        skills=SIZES,
        partition={"train": TASKS},
        output_dir=str(output_dir),
        batch_size=4,
        vocab_size=300,
        max_target_length=16,
        test_partitions="train",
    )
    return MultiTaskDataModule(**{**options, **overrides})


def make_module(
    data: MultiTaskDataModule,
    moe: dict | None = None,
    optim: dict | None = None,
    evaluation: dict | None = None,
    **overrides,
) -> MoEMultiTaskModule:
    """A tiny module over `data`, its data facts linked by hand as the CLI would; `optim` and `evaluation` fields
    over lr=1e-2, weight_decay=0.1, warmup=0 and num_beams=1."""
    options = {"num_experts": 2, "task_dim": 8, "router_hidden": 8, "num_tasks": data.num_tasks, **(moe or {})}
    hparams = dict(
        bart=TINY_BART,
        moe=MoEOptions(**options),
        optim={"lr": 1e-2, "weight_decay": 0.1, "warmup": 0, **(optim or {})},
        evaluation={"num_beams": 1, **(evaluation or {})},
        **linked_options(data),
    )
    return MoEMultiTaskModule(**{**hparams, **overrides})


def make_trainer(**overrides) -> L.Trainer:
    return L.Trainer(**tiny_trainer(**{"max_steps": 4, **overrides}))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Tokenizer and tokenised splits, made once for the module's tests."""
    path = tmp_path_factory.mktemp("data")
    make_data(path).prepare_data()
    return path


@pytest.fixture
def two_tasks(data_dir) -> MultiTaskDataModule:
    """A fresh data module of the two tasks (conftest's `data` has all the seen tasks)."""
    return make_data(data_dir)


def f32(value: float) -> float:
    """`value` as Lightning logs it: through a float32 tensor."""
    return torch.tensor(value, dtype=torch.float32).item()


def expert_names(module: MoEMultiTaskModule) -> list[tuple[str, int]]:
    return [
        (layer, e) for layer in module.model.routed_layer_names for e in range(module.model.moe_options.num_experts)
    ]


def expert_state(module: MoEMultiTaskModule) -> dict[tuple[str, int], list[torch.Tensor]]:
    return {
        (layer, e): [p.detach().clone() for p in module.model.expert_parameters(layer, e)]
        for layer, e in expert_names(module)
    }


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def pin_routes(module: MoEMultiTaskModule, expert_of_task: list[int]) -> None:
    """Make the learned MLP router pick `expert_of_task[t]` in every layer for task t, by a logit margin
    (~170) that no Gumbel sample can overturn; gumbel_st then gives exactly 0 weight to the others."""
    router = module.model.router
    with torch.no_grad():
        table = module.model.task_table.embedding.weight
        table.zero_()
        for task in range(len(expert_of_task)):
            table[task, task] = 1.0
        for mlp in router.network.layers:
            first, last = mlp[0], mlp[2]
            for param in (*first.parameters(), *last.parameters()):
                param.zero_()
            for task, expert in enumerate(expert_of_task):
                first.weight[task, task] = 1.0  # hidden unit t = GELU(1) for task t, GELU(0) = 0 otherwise
                last.weight[expert, task] = 200.0
