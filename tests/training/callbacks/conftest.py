"""Helpers of the callback tests: a `Recorder` placed after the callbacks under test snapshots the module at the
start of every training batch, i.e. what the coming optimizer step runs with; `steps[s]` is the state before
optimizer step s + 1.
"""

from dataclasses import dataclass

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from transformers import BartConfig, BartForConditionalGeneration

from moe_mtl.models.conversion import dense_name
from moe_mtl.training import TwoStageTraining

from ..conftest import TINY_BART, tiny_trainer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's hints about workers and logging

SWITCH = 2  # the stage switch of the two-stage runs
STEPS = 5


@dataclass
class Snapshot:
    step: int
    tasks: list[int]  # task ids of the batch
    stage: int
    selection: str | None  # None without a task router (token routing)
    temperature: float | None
    lrs: dict[str, float]  # per optimizer group name ("backbone", "router.no_decay", …)
    weights: dict[str, torch.Tensor]
    trainable: set[str]  # names of the parameters with requires_grad
    with_state: set[str]  # names of the parameters that have optimizer state


class Recorder(Callback):
    """Snapshots of the module at the start of every training batch."""

    def __init__(self):
        self.steps: list[Snapshot] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        optimizer = trainer.optimizers[0]
        params = dict(pl_module.model.named_parameters())
        router = pl_module.model.router
        self.steps.append(
            Snapshot(
                step=trainer.global_step,
                tasks=batch["task_ids"].unique().tolist(),
                stage=next((c.stage for c in trainer.callbacks if isinstance(c, TwoStageTraining)), 1),
                selection=None if router is None else router.selection,
                temperature=None if router is None else router.temperature.item(),
                lrs={group["name"]: group["lr"] for group in optimizer.param_groups},
                weights={name: p.detach().clone() for name, p in params.items()},
                trainable={name for name, p in params.items() if p.requires_grad},
                with_state={name for name, p in params.items() if optimizer.state.get(p)},
            )
        )


def routing_names(module) -> set[str]:
    return {name for name, _ in module.model.named_parameters() if ".router." in name or ".task_table." in name}


def fit(module, data, root, callbacks, **trainer_options) -> Recorder:
    recorder = Recorder()
    options = tiny_trainer(root, **{"max_steps": STEPS, **trainer_options}, callbacks=[*callbacks, recorder])
    Trainer(**options).fit(module, datamodule=data)
    return recorder


@pytest.fixture
def dense_dir(data, tmp_path) -> str:
    """A saved dense BART of the tiny modules' sizes and vocabulary (the stage-two re-initialisation source)."""
    config = BartConfig(vocab_size=data.vocab_size, pad_token_id=data.pad_token_id, **TINY_BART)
    BartForConditionalGeneration(config).save_pretrained(tmp_path / "dense")
    return str(tmp_path / "dense")


def assert_dense_weights(module, dense_dir: str, where: dict[str, torch.Tensor] | None = None) -> None:
    """Every MoE weight with a dense counterpart (every expert, embeddings, layer norms) equals it."""
    dense = BartForConditionalGeneration.from_pretrained(dense_dir).state_dict()
    weights = where if where is not None else dict(module.model.named_parameters())
    compared = 0
    for name, tensor in weights.items():
        if dense_name(name) in dense:
            assert torch.equal(tensor, dense[dense_name(name)]), name
            compared += 1
    assert compared == len(weights) - len(routing_names(module))
